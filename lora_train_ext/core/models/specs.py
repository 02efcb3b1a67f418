"""The model table: the real SD1.5 / SD2.1 / SDXL UNet and VAE configs, and tiny look-alikes.

A `real` spec is exactly the reference config (SD1.5 `v1-inference.yaml`, SD2.1
`v2-inference-v.yaml`, SDXL `sd_xl_base.yaml`), so a model built from it has the checkpoint's
names and shapes. A `tiny` spec keeps the structure (levels, blocks, transformer depths, every
module name) and shrinks only widths, so tests can run the real code paths in milliseconds on a
CPU. Build real models on the `meta` device unless the memory is really wanted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .unet import UNetModel
from .vae import AutoencoderKL


@dataclass(frozen=True)
class UNetSpec:
    """ldm `openaimodel.UNetModel` arguments, with the yaml's names where they exist.

    attention_resolutions: downsampling factors (1, 2, 4, ...) whose levels get transformers.
    transformer_depth: blocks per transformer, one per level (as in the yaml; a level not in
        `attention_resolutions` has none whatever its entry says; see `level_depths`).
    transformer_depth_middle: the middle block's depth; None means the last level's entry.
    num_heads / num_head_channels: exactly one is set (SD1: 8 heads; SD2/SDXL: 64 per head).
    use_linear: proj_in/proj_out are Linear (SD2, SDXL) instead of 1x1 Conv2d (SD1).
    adm_in_channels: width of the vector `y` added to the time embedding (SDXL: pooled text
        embedding 1280 + 6 size/crop Fourier features of 256 = 2816); None: no `label_emb`.
    norm_groups: GroupNorm groups everywhere (32 in the real models; it must divide every width).
    """

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    context_dim: int
    num_heads: int | None = None
    num_head_channels: int | None = None
    use_linear: bool = False
    transformer_depth_middle: int | None = None
    adm_in_channels: int | None = None
    norm_groups: int = 32
    in_channels: int = 4
    out_channels: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError("UNetSpec: set exactly one of num_heads and num_head_channels")
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError("UNetSpec: transformer_depth needs one entry per channel_mult level")
        for mult in (1, *self.channel_mult):
            ch = self.model_channels * mult
            if ch % self.norm_groups:
                raise ValueError(f"UNetSpec: norm_groups {self.norm_groups} does not divide {ch}")
            heads, dim_head = self.heads_for(ch)
            if heads * dim_head != ch:
                raise ValueError(f"UNetSpec: {heads} heads do not split width {ch} evenly")

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def level_depths(self) -> tuple[int, ...]:
        """Transformer blocks per level as built: 0 where the level has no attention."""
        return tuple(
            depth if 2 ** level in self.attention_resolutions else 0
            for level, depth in enumerate(self.transformer_depth)
        )

    @property
    def middle_depth(self) -> int:
        if self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        return self.transformer_depth[-1]

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) of a transformer at this width, as ldm picks them.

        With num_head_channels, heads = channels // num_head_channels; tiny widths below one head's
        width still get one head (then dim_head = channels).
        """
        if self.num_heads is not None:
            heads = self.num_heads
        else:
            heads = max(1, channels // self.num_head_channels)
        return heads, channels // heads


@dataclass(frozen=True)
class VAESpec:
    """ldm `AutoencoderKL` ddconfig + embed_dim. `scale_factor` maps posterior samples to the
    latents the UNet sees (latents = sample * scale_factor)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    norm_groups: int = 32
    scale_factor: float = 0.18215
    dropout: float = 0.0

    def __post_init__(self):
        for mult in self.ch_mult:
            if (self.ch * mult) % self.norm_groups:
                raise ValueError(
                    f"VAESpec: norm_groups {self.norm_groups} does not divide {self.ch * mult}")

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along one side (8 for every SD VAE)."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ArchSpec:
    unet: UNetSpec
    vae: VAESpec


# Tiny widths: model_channels 16 (levels 16/32/64/64; SDXL 16/32/64) with norm_groups 8, so
# every group has 2+ channels and the 1x1 deepest level (8x8 latents) keeps 8 channels per group.
# Smaller widths barely help: a tiny forward is bound by the ~1000 ops the structure needs.
# Heads: SD1 2 heads, SD2/SDXL 8 channels per head. Context widths follow the tiny text encoders
# (hidden 32 each; SDXL concatenates two: 64), deliberately unlike the UNet widths so that a
# swapped projection fails on shapes. SDXL's tiny adm: pooled 32 + 6 size/crop features x 16 = 128.
_TINY_VAE = dict(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=8)

SPECS: dict[str, dict[str, ArchSpec]] = {
    "sd1": {
        "real": ArchSpec(
            unet=UNetSpec(
                model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                attention_resolutions=(4, 2, 1), transformer_depth=(1, 1, 1, 1),
                context_dim=768, num_heads=8, use_linear=False,
            ),
            vae=VAESpec(scale_factor=0.18215),
        ),
        "tiny": ArchSpec(
            unet=UNetSpec(
                model_channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                attention_resolutions=(4, 2, 1), transformer_depth=(1, 1, 1, 1),
                context_dim=32, num_heads=2, use_linear=False, norm_groups=8,
            ),
            vae=VAESpec(scale_factor=0.18215, **_TINY_VAE),
        ),
    },
    "sd2": {
        "real": ArchSpec(
            unet=UNetSpec(
                model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                attention_resolutions=(4, 2, 1), transformer_depth=(1, 1, 1, 1),
                context_dim=1024, num_head_channels=64, use_linear=True,
            ),
            vae=VAESpec(scale_factor=0.18215),
        ),
        "tiny": ArchSpec(
            unet=UNetSpec(
                model_channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                attention_resolutions=(4, 2, 1), transformer_depth=(1, 1, 1, 1),
                context_dim=32, num_head_channels=8, use_linear=True, norm_groups=8,
            ),
            vae=VAESpec(scale_factor=0.18215, **_TINY_VAE),
        ),
    },
    "sdxl": {
        "real": ArchSpec(
            unet=UNetSpec(
                model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2,
                attention_resolutions=(4, 2), transformer_depth=(1, 2, 10),
                context_dim=2048, num_head_channels=64, use_linear=True,
                adm_in_channels=2816,
            ),
            vae=VAESpec(scale_factor=0.13025),
        ),
        "tiny": ArchSpec(
            unet=UNetSpec(
                model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=2,
                attention_resolutions=(4, 2), transformer_depth=(1, 2, 10),
                context_dim=64, num_head_channels=8, use_linear=True,
                adm_in_channels=128, norm_groups=8,
            ),
            vae=VAESpec(scale_factor=0.13025, **_TINY_VAE),
        ),
    },
}


def arch_spec(arch: str, size: str = "tiny") -> ArchSpec:
    if arch not in SPECS:
        raise UserError("arch", f"unknown architecture {arch!r}; expected one of {sorted(SPECS)}")
    if size not in SPECS[arch]:
        raise UserError("size", f"unknown model size {size!r}; expected 'tiny' or 'real'")
    return SPECS[arch][size]


def _build(make, device, seed: int | None, dtype: torch.dtype | None) -> torch.nn.Module:
    """Run `make()` under a private RNG seeded with `seed` (None: 0), so the weights depend only on
    the seed and the caller's global RNG is left as it was. Weights are drawn on the CPU and then
    moved, so a seed gives the same weights on every device; `meta` allocates nothing."""
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"):
            model = make()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else seed)
            model = make()
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def build_unet(arch: str, size: str = "tiny", device: str | torch.device = "cpu",
               seed: int | None = None, dtype: torch.dtype | None = None) -> UNetModel:
    """A `UNetModel` with the WebUI's LDM module names (`model.diffusion_model.` + state-dict key
    is the checkpoint key); random weights from `seed` (None: 0), in eval mode."""
    spec = arch_spec(arch, size).unet
    return _build(lambda: UNetModel(spec), device, seed, dtype)


def build_vae(arch: str, size: str = "tiny", device: str | torch.device = "cpu",
              seed: int | None = None, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """An `AutoencoderKL` with the LDM names (`first_stage_model.` + key); random weights from
    `seed` (None: 0), in eval mode."""
    spec = arch_spec(arch, size).vae
    return _build(lambda: AutoencoderKL(spec), device, seed, dtype)
