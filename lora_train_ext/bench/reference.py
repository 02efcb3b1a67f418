"""diffusers' UNet on our UNet's very weights, and a peft LoRA on it: the benchmark's reference.

Both packages are optional (never runtime dependencies): `diffusers_unet()` and `add_peft_lora()`
raise `Unavailable` with the reason and the pip command when a package or an API is missing.

The diffusers model is built on the `meta` device from the config diffusers derives from the LDM
yaml (`create_unet_diffusers_config_from_ldm`, fed a yaml-like dict written from our spec) and
takes diffusers' own conversion of our LDM-named state dict (`convert_ldm_unet_checkpoint`) by
assignment: it shares our tensors, so real-size weights stay in memory once. The tiny specs need
the two config entries the yaml cannot carry (GroupNorm groups; SDXL's added conditioning at a
width diffusers does not recognise), as tests/test_reference_models.py explains.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import torch
from torch import nn

from ..core.models.openclip import OPENCLIP_SPECS
from ..core.models.specs import arch_spec
from ..core.models.tiny import size_embedding

# kohya's UNet LoRA targets (networks/targets.py) under diffusers' module names: every
# transformer's proj_in / proj_out and its blocks' attention projections and feed-forward
PEFT_TARGETS = (r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
                r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))")


class Unavailable(RuntimeError):
    """The reference cannot be built here; the message says why."""


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def ldm_unet_config(arch: str, size: str) -> dict:
    """The LDM / sgm yaml's UNet and VAE sections, as the dict diffusers' config mapping reads."""
    u = arch_spec(arch, size).unet
    unet = dict(in_channels=u.in_channels, out_channels=u.out_channels,
                model_channels=u.model_channels,
                attention_resolutions=list(u.attention_resolutions),
                num_res_blocks=u.num_res_blocks, channel_mult=list(u.channel_mult),
                use_linear_in_transformer=u.use_linear, transformer_depth=list(u.transformer_depth),
                context_dim=u.context_dim)
    if u.num_heads is not None:
        unet["num_heads"] = u.num_heads
    else:
        unet["num_head_channels"] = u.num_head_channels
    if u.adm_in_channels is not None:
        unet.update(num_classes="sequential", adm_in_channels=u.adm_in_channels)
    v = arch_spec(arch, size).vae  # diffusers reads the VAE's downscale from here
    ddconfig = dict(double_z=True, z_channels=v.z_channels, resolution=256,
                    in_channels=v.in_channels, out_ch=v.out_ch, ch=v.ch, ch_mult=list(v.ch_mult),
                    num_res_blocks=v.num_res_blocks, attn_resolutions=[], dropout=0.0)
    key = "network_config" if arch == "sdxl" else "unet_config"
    return {"model": {"params": {
        "scale_factor": v.scale_factor, key: {"params": unet},
        "first_stage_config": {"params": {"embed_dim": v.embed_dim, "ddconfig": ddconfig}}}}}


def pooled_width(arch: str, size: str) -> int:
    """SDXL: the pooled text embedding's width inside `y` (the rest are 6 size embeddings)."""
    return OPENCLIP_SPECS[(arch, size)].embed


def diffusers_unet(unet: nn.Module, arch: str, size: str) -> nn.Module:
    """diffusers' UNet2DConditionModel sharing `unet`'s tensors (frozen, eval)."""
    try:
        with _quiet():
            import diffusers
            from diffusers.loaders import single_file_utils as sfu
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    except ImportError as e:
        raise Unavailable(f"diffusers is not installed or lacks single-file loading ({e}); "
                          "pip install diffusers") from None
    for name in ("create_unet_diffusers_config_from_ldm", "convert_ldm_unet_checkpoint"):
        if not hasattr(sfu, name):
            raise Unavailable(f"diffusers {diffusers.__version__} has no single_file_utils.{name}")
    checkpoint = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    spec = arch_spec(arch, size).unet
    with _quiet():
        config = sfu.create_unet_diffusers_config_from_ldm(
            ldm_unet_config(arch, size), checkpoint, image_size=64 if size == "tiny" else None)
        if size == "tiny":
            config["norm_num_groups"] = spec.norm_groups
            if spec.adm_in_channels is not None:
                config.update(class_embed_type=None, addition_embed_type="text_time",
                              addition_time_embed_dim=(spec.adm_in_channels
                                                       - pooled_width(arch, size)) // 6,
                              projection_class_embeddings_input_dim=spec.adm_in_channels)
        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(config)
        model.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, config), strict=True,
                              assign=True)
    return model.eval().requires_grad_(False)


def diffusers_inputs(arch: str, size: str, batch: int, generator: torch.Generator,
                     resolution: int) -> tuple[torch.Tensor | None, dict | None]:
    """(our `y`, diffusers' added_cond_kwargs) for the same SDXL conditioning; (None, None)
    for SD1 / SD2. `y` = pooled embedding next to the size/crop embeddings of `time_ids`."""
    spec = arch_spec(arch, size).unet
    if spec.adm_in_channels is None:
        return None, None
    pooled_dim = pooled_width(arch, size)
    pooled = torch.randn(batch, pooled_dim, generator=generator)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                            dtype=torch.float32).expand(batch, -1)
    size_dim = (spec.adm_in_channels - pooled_dim) // 6
    y = torch.cat([pooled, size_embedding(time_ids, size_dim)], dim=-1)
    return y, {"text_embeds": pooled, "time_ids": time_ids}


def add_peft_lora(model: nn.Module, rank: int, alpha: float) -> tuple[list[nn.Parameter], str]:
    """A peft LoRA (rank, alpha, no dropout) on kohya's targets of a diffusers UNet, in place.
    Returns (its trainable parameters, peft's version)."""
    try:
        with _quiet():
            import peft
            from peft import LoraConfig, inject_adapter_in_model
    except Exception as e:  # ImportError, or a peft too new for the installed transformers
        raise Unavailable(f"peft is not installed or does not import ({type(e).__name__}: {e}); "
                          "pip install peft") from None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=PEFT_TARGETS,
                        init_lora_weights=True)
    with _quiet():
        inject_adapter_in_model(config, model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params, peft.__version__


def peft_modules(model: nn.Module) -> list[str]:
    """Names of the modules a peft LoRA adapts (those holding lora_A)."""
    return sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if ".lora_A" in n})


def set_peft_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every peft LoRA layer of `model` on or off (off: the bare diffusers UNet)."""
    for m in model.modules():
        if hasattr(m, "enable_adapters") and hasattr(m, "lora_A"):
            m.enable_adapters(enabled)


def count_peft_targets(model: nn.Module) -> int:
    return sum(1 for n, _ in model.named_modules() if re.fullmatch(PEFT_TARGETS, n))
