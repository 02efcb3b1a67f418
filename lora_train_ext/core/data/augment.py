"""Pixel-space conversions and augmentations on (3, H, W) float tensors in [-1, 1]."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """'L' PIL image -> (1, H, W) float32 in [0, 1]."""
    arr = np.asarray(mask.convert("L"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).unsqueeze(0).float().div_(255.0)


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL image (for previews)."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0)
    return Image.fromarray(arr.cpu().numpy(), "RGB")


def color_jitter(x: torch.Tensor, rng: np.random.Generator, strength: float = 0.1) -> torch.Tensor:
    """Mild random brightness, contrast, saturation and hue rotation; x: (3, H, W) in [-1, 1].

    Hue turns the chroma plane of YIQ by up to strength * 90 degrees (kohya's color_aug is a
    small hue shift too); the others scale by up to +-strength.
    """
    b, c, s, h = (rng.uniform(-1.0, 1.0, 4) * strength).tolist()
    rgb = (x + 1.0) * 0.5
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                           [0.211, -0.523, 0.312]], dtype=rgb.dtype)
    yiq = torch.einsum("ij,jhw->ihw", to_yiq, rgb)
    angle = h * math.pi / 2
    cos, sin = math.cos(angle), math.sin(angle)
    i, q = yiq[1].clone(), yiq[2].clone()
    yiq[1] = (i * cos - q * sin) * (1 + s)
    yiq[2] = (i * sin + q * cos) * (1 + s)
    mean = yiq[0].mean()
    yiq[0] = (yiq[0] - mean) * (1 + c) + mean + b
    rgb = torch.einsum("ij,jhw->ihw", torch.linalg.inv(to_yiq), yiq)
    return (rgb.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
