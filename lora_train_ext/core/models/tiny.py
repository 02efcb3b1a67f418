"""Stable-Diffusion-shaped models made in code, as a ModelBundle and as a WebUI-style checkpoint.

`build_bundle(arch, size='tiny')` gives a model with every module name and block of SD1.5, SD2.1
or SDXL base and small widths (the demo and the tests); `size='real'` gives the real widths (the
benchmark). Weights are random but fixed by `seed`.

Conditioning is read the way the WebUI's models read it:
- SD1: CLIP-L's last hidden state after its final layer norm, (B, 77, 768).
- SD2: OpenCLIP ViT-H's penultimate block output, then `ln_final`, (B, 77, 1024).
- SDXL: `crossattn` = CLIP-L's penultimate hidden state (no final norm, (B, 77, 768)) next to
  OpenCLIP bigG's ((B, 77, 1280)) = (B, 77, 2048); `vector` = bigG's pooled embedding (1280) next to
  sinusoidal embeddings (256 each) of original size (h, w), crop (top, left) and target size (h, w)
  = (B, 2816). Tiny: 32 + 32 = 64 and 32 + 6 x 16 = 128, as in specs.py.
"""

from __future__ import annotations

import hashlib
import os

import torch

from .. import keys
from ..bundle import ModelBundle
from ..errors import UserError
from ..lora_file import atomic_save_safetensors
from .clip import build_clip_text, tokenize
from .openclip import OPENCLIP_SPECS, build_openclip_text
from .specs import arch_spec, build_unet, build_vae
from .unet import timestep_embedding

PREDICTIONS = ("epsilon", "v")
SIZE_FIELDS = 6  # orig_h, orig_w, crop_top, crop_left, target_h, target_w
OPENCLIP_PAD_ID = 0  # open_clip pads after the end token with 0; CLIP repeats the end token


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> torch.Tensor:
    """The 'scaled linear' schedule every SD1/SD2/SDXL model uses; (steps,) float64."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def default_prediction(arch: str) -> str:
    """SD2 stands for SD2.1-768 (`v2-inference-v.yaml`): v; the others: epsilon."""
    return "v" if arch == "sd2" else "epsilon"


def default_resolution(arch: str, size: str, prediction: str) -> int:
    if size == "tiny":
        return 64
    if arch == "sdxl":
        return 1024
    return 768 if arch == "sd2" and prediction == "v" else 512


def build_text_encoders(arch: str, size: str = "tiny", seed: int = 0,
                        device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """The arch's text encoders by kohya prefix part: SD1 {'te': CLIP-L}, SD2 {'te': OpenCLIP
    ViT-H}, SDXL {'te1': CLIP-L, 'te2': OpenCLIP bigG}; seeds seed, seed + 1."""
    if arch == "sd1":
        return {"te": build_clip_text("sd1", size, seed=seed, device=device)}
    if arch == "sd2":
        return {"te": build_openclip_text("sd2", size, seed=seed, device=device)}
    if arch == "sdxl":
        return {"te1": build_clip_text("sdxl", size, seed=seed, device=device),
                "te2": build_openclip_text("sdxl", size, seed=seed + 1, device=device)}
    raise UserError("arch", f"unknown architecture {arch!r}; expected sd1, sd2 or sdxl")


def size_embedding(sizes: torch.Tensor, dim: int) -> torch.Tensor:
    """SDXL's size/crop conditioning: sizes (B, 6) -> (B, 6 * dim) float32, each number through
    the same sinusoidal embedding as timesteps (sgm `ConcatTimestepEmbedderND`), in the order
    original size (h, w), crop (top, left), target size (h, w)."""
    b = sizes.shape[0]
    return timestep_embedding(sizes.reshape(-1), dim).reshape(b, sizes.shape[1] * dim)


def build_bundle(arch: str = "sd1", size: str = "tiny", seed: int = 0,
                 device: str | torch.device = "cpu", prediction: str | None = None) -> ModelBundle:
    """A bundle of in-code models. prediction: 'epsilon' or 'v' (None: the arch's default, v for
    SD2 (SD2.1-768), epsilon otherwise)."""
    arch_spec(arch, size)
    device = torch.device(device)
    unet = build_unet(arch, size, device=device, seed=seed)
    vae = build_vae(arch, size, device=device, seed=seed + 1)
    text_encoders = build_text_encoders(arch, size, seed=seed + 2, device=device)
    prediction = prediction or default_prediction(arch)
    digest = hashlib.sha256(f"{arch}-{size}-{seed}-{prediction}".encode()).hexdigest()
    prefix = "tiny" if size == "tiny" else "random"
    return assemble_bundle(
        arch, size, unet, vae, text_encoders, prediction=prediction, device=device,
        model_name=f"{prefix}-{arch}{'-v' if arch == 'sd2' and prediction == 'v' else ''}-seed{seed}",
        model_hash=digest[:10], vae_id=f"{arch}-{size}-vae-{seed}",
        extras={"size": size, "seed": seed})


def assemble_bundle(arch: str, size: str, unet: torch.nn.Module, vae: torch.nn.Module,
                    text_encoders: dict[str, torch.nn.Module], *, prediction: str | None,
                    device: str | torch.device = "cpu", model_name: str = "", model_hash: str = "",
                    vae_id: str = "", extras: dict | None = None, tokenizer=None) -> ModelBundle:
    """A ModelBundle around built models of `arch` at `size` (its spec gives the VAE's scale and
    SDXL's size-embedding widths): the encode / condition / denoise callables as the WebUI's
    models read them. tokenizer: None for the offline stand-in (tiny vocabularies), else a CLIP
    tokenizer (`clip.clip_bpe_tokenizer()` for real-size text encoders)."""
    spec = arch_spec(arch, size)
    prediction = prediction or default_prediction(arch)
    if prediction not in PREDICTIONS:
        raise UserError("prediction", f"{prediction!r}; expected one of {', '.join(PREDICTIONS)}")
    device = torch.device(device)
    for m in (unet, vae, *text_encoders.values()):
        m.eval().requires_grad_(False)
    scale = spec.vae.scale_factor
    resolution = default_resolution(arch, size, prediction)

    def ids(captions: list[str], pad_id: int | None = None) -> torch.Tensor:
        return tokenize(captions, pad_id=pad_id, tokenizer=tokenizer).to(device)

    def encode(images: torch.Tensor) -> torch.Tensor:
        posterior = vae.encode(images.to(device=device, dtype=_dtype(vae)))
        return posterior.mode() * scale

    if arch == "sd1":
        te = text_encoders["te"]

        def condition(captions: list[str], sizes=None) -> torch.Tensor:
            return te(ids(captions)).last_hidden_state

        def denoise(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return unet(x, t, context=cond)

    elif arch == "sd2":
        te = text_encoders["te"]

        def condition(captions: list[str], sizes=None) -> torch.Tensor:
            return te.encode(ids(captions, OPENCLIP_PAD_ID), layer="penultimate",
                             final_norm=True)[0]

        def denoise(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return unet(x, t, context=cond)

    else:
        te1, te2 = text_encoders["te1"], text_encoders["te2"]
        pooled_dim = OPENCLIP_SPECS[("sdxl", size)].embed
        size_dim, rest = divmod(spec.unet.adm_in_channels - pooled_dim, SIZE_FIELDS)
        if rest:
            raise ValueError(f"adm_in_channels {spec.unet.adm_in_channels} - pooled {pooled_dim} "
                             f"does not split into {SIZE_FIELDS} size embeddings")

        def condition(captions: list[str], sizes=None) -> dict[str, torch.Tensor]:
            h1 = te1(ids(captions), output_hidden_states=True).hidden_states[-2]
            h2, pooled = te2.encode(ids(captions, OPENCLIP_PAD_ID), layer="penultimate",
                                    final_norm=False, pooled=True)
            if sizes:
                if len(sizes) != len(captions):
                    raise ValueError(f"{len(sizes)} sizes for {len(captions)} captions")
                table = torch.tensor([list(s) for s in sizes], dtype=torch.float32, device=device)
            else:
                table = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                     dtype=torch.float32, device=device).expand(len(captions), -1)
            vector = torch.cat([pooled.float(), size_embedding(table, size_dim)], dim=-1)
            return {"crossattn": torch.cat([h1, h2.to(h1.dtype)], dim=-1),
                    "vector": vector.to(h1.dtype)}

        def denoise(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
            return unet(x, t, context=cond["crossattn"], y=cond["vector"])

    return ModelBundle(
        arch=arch, unet=unet, text_encoders=text_encoders, vae=vae, encode=encode,
        condition=condition, denoise=denoise, prediction=prediction,
        alphas_cumprod=sd_alphas_cumprod(), model_name=model_name, model_hash=model_hash,
        resolution=resolution, device=device, vae_id=vae_id,
        extras={"size": size, "vae_scale": scale, **(extras or {})},
    )


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _parts(bundle: ModelBundle) -> list[tuple[str, torch.nn.Module]]:
    return [("unet", bundle.unet), ("vae", bundle.vae), *bundle.text_encoders.items()]


def _is_clip(arch: str, part: str) -> bool:
    return part not in ("unet", "vae") and keys.te_family(arch, part) == "clip"


def checkpoint_key(arch: str, part: str, key: str) -> str | None:
    """The checkpoint's name for a part's state-dict key (`keys.checkpoint_prefix` + key), or
    None for a key that is no weight (CLIP's `position_ids` buffer: real checkpoints mostly omit
    it, some hold it in another dtype)."""
    if key.endswith("position_ids"):
        return None
    if _is_clip(arch, part) and not key.startswith("text_model."):
        key = "text_model." + key  # transformers 5 drops the level; files keep it
    return keys.checkpoint_prefix(arch, part) + key


def checkpoint_keys(arch: str, parts: list[tuple[str, torch.nn.Module]]):
    """(part, state-dict key, checkpoint key, tensor) of every weight of `parts`."""
    for part, module in parts:
        for key, t in module.state_dict(keep_vars=True).items():
            full = checkpoint_key(arch, part, key)
            if full is not None:
                yield part, key, full, t


def checkpoint_state_dict(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The bundle's weights under a WebUI checkpoint's LDM key names (`keys.checkpoint_prefix`)."""
    return {full: t.detach().contiguous().cpu()
            for _, _, full, t in checkpoint_keys(bundle.arch, _parts(bundle))}


def load_checkpoint_state_dict(bundle: ModelBundle, state: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's tensors (LDM names, as `checkpoint_state_dict` writes them) into the
    bundle's modules in place. Every weight of the bundle must be there; other keys are ignored."""
    for part, module in _parts(bundle):
        missing = []
        with torch.no_grad():
            for _, _, full, t in checkpoint_keys(bundle.arch, [(part, module)]):
                if full not in state:
                    missing.append(full)
                    continue
                t.copy_(state[full].to(t.dtype))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} {part} tensors (e.g. {missing[:2]})")


def write_checkpoint(bundle: ModelBundle, path: str) -> str:
    """Save as a `.safetensors` checkpoint the WebUI (and our merge tools) can read. Its
    metadata names the prediction type (`modelspec.prediction_type`, as kohya's tools write it),
    which `train --checkpoint` reads where no `--prediction` is given."""
    atomic_save_safetensors(checkpoint_state_dict(bundle),
                            {"format": "pt", "modelspec.prediction_type": bundle.prediction}, path)
    return os.path.abspath(path)
