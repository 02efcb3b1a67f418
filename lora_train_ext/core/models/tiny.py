"""Stable-Diffusion-shaped models made in code, as a ModelBundle and as a WebUI-style checkpoint.

`build_bundle('sd1', size='tiny')` gives a model with every module name and block of SD1.5 and
small widths (the demo and the tests); `size='real'` gives the real widths (the benchmark).
Weights are random but fixed by `seed`.
"""

from __future__ import annotations

import hashlib
import os

import torch

from ..bundle import ModelBundle
from ..lora_file import atomic_save_safetensors
from .clip import build_clip_text, tokenize
from .specs import arch_spec, build_unet, build_vae

CHECKPOINT_PREFIX = {
    ("sd1", "unet"): "model.diffusion_model.",
    ("sd1", "vae"): "first_stage_model.",
    ("sd1", "te"): "cond_stage_model.transformer.",
}


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> torch.Tensor:
    """The 'scaled linear' schedule every SD1/SD2/SDXL model uses; (steps,) float64."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def build_bundle(arch: str = "sd1", size: str = "tiny", seed: int = 0,
                 device: str | torch.device = "cpu") -> ModelBundle:
    if arch != "sd1":
        raise NotImplementedError(f"arch {arch!r}: only sd1 is built in code so far")
    device = torch.device(device)
    unet = build_unet(arch, size, device=device, seed=seed)
    vae = build_vae(arch, size, device=device, seed=seed + 1)
    te = build_clip_text(arch, size, seed=seed + 2, device=device)
    for m in (unet, vae, te):
        m.eval().requires_grad_(False)
    scale = arch_spec(arch, size).vae.scale_factor

    def encode(images: torch.Tensor) -> torch.Tensor:
        posterior = vae.encode(images.to(device=device, dtype=_dtype(vae)))
        return posterior.mode() * scale

    def condition(captions: list[str], sizes=None) -> torch.Tensor:
        ids = tokenize(captions).to(device)
        return te(ids).last_hidden_state

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return unet(x, t, context=cond)

    digest = hashlib.sha256(f"{arch}-{size}-{seed}".encode()).hexdigest()
    return ModelBundle(
        arch=arch, unet=unet, text_encoders={"te": te}, vae=vae, encode=encode,
        condition=condition, denoise=denoise, prediction="epsilon",
        alphas_cumprod=sd_alphas_cumprod(), model_name=f"tiny-{arch}-seed{seed}" if size == "tiny"
        else f"random-{arch}-seed{seed}", model_hash=digest[:10],
        resolution=64 if size == "tiny" else 512, device=device, vae_id=f"{arch}-{size}-vae-{seed}",
        extras={"size": size, "seed": seed, "vae_scale": scale},
    )


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def checkpoint_state_dict(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The bundle's weights under a WebUI checkpoint's LDM key names."""
    arch = bundle.arch
    out: dict[str, torch.Tensor] = {}
    for part, module in (("unet", bundle.unet), ("vae", bundle.vae),
                         ("te", bundle.text_encoders["te"])):
        prefix = CHECKPOINT_PREFIX[(arch, part)]
        for key, t in module.state_dict().items():
            if key.endswith("position_ids"):
                continue  # a buffer, not a weight; real checkpoints mostly omit it
            if part == "te" and not key.startswith("text_model."):
                key = "text_model." + key  # transformers 5 drops the level; files keep it
            out[prefix + key] = t.detach().contiguous().cpu()
    return out


def write_checkpoint(bundle: ModelBundle, path: str) -> str:
    """Save as a `.safetensors` checkpoint the WebUI (and our merge tools) can read."""
    atomic_save_safetensors(checkpoint_state_dict(bundle), {"format": "pt"}, path)
    return os.path.abspath(path)
