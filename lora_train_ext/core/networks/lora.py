"""LoRA (kohya LierLa / LoCon-C3Lier): delta = up @ down * (alpha / rank) * multiplier.

Tensors (file names): `lora_down.weight` (rank, in) or (rank, in, k, k) for a kxk conv base,
`lora_up.weight` (out, rank) or (out, rank, 1, 1), `alpha` (scalar). Up starts at zero, so a new
adapter is the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterModule


class LoRAModule(AdapterModule):
    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__(name, base)
        if self.kind == "":
            raise TypeError(f"{name}: LoRA needs a Linear or Conv2d base, got {type(base).__name__}")
        device = base.weight.device
        if self.kind == "linear":
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        else:
            self.lora_down = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                base.dilation, bias=False, device=device, dtype=dtype)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device, dtype=dtype)
        self.rank = rank
        # alpha 0 (or none) means alpha = rank, as kohya reads it
        self.register_buffer("alpha", torch.tensor(float(alpha or rank), dtype=torch.float32))
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """down: kaiming-uniform (a=sqrt(5)) as nn.Linear does; up: zeros."""
        with torch.no_grad():
            fan_in = self.lora_down.weight[0].numel()
            bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))  # kaiming_uniform_(a=sqrt(5))
            w = torch.empty(self.lora_down.weight.shape, dtype=torch.float32)
            w.uniform_(-bound, bound, generator=generator)
            self.lora_down.weight.copy_(w)
            self.lora_up.weight.zero_()

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.module_dropout and \
                torch.rand((), device="cpu").item() < self.module_dropout:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        h = self.lora_down(x.to(self.lora_down.weight.dtype) if not torch.is_autocast_enabled()
                           else x)
        scale = self.scale * self.multiplier
        if self.training:
            if self.dropout:
                h = F.dropout(h, p=self.dropout)
            if self.rank_dropout:
                # one keep/drop draw per sample and rank channel
                shape = (h.shape[0], self.rank) + (1,) * (h.dim() - 2) if self.kind != "linear" \
                    else (h.shape[0],) + (1,) * (h.dim() - 2) + (self.rank,)
                mask = (torch.rand(shape, device=h.device) >= self.rank_dropout).to(h.dtype)
                h = h * mask
                scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(h) * scale

    def delta_weight(self) -> torch.Tensor:
        return lora_delta(self.lora_down.weight, self.lora_up.weight, self.alpha,
                          self.base_weight_shape()) * self.multiplier

    @torch.no_grad()
    def scale_delta_(self, factor: float) -> None:
        """Multiply the delta by factor: up and down share sqrt(|factor|) as kohya's max-norm
        scaling does (and up takes the sign)."""
        root = math.sqrt(abs(factor))
        self.lora_up.weight.mul_(math.copysign(root, factor))
        self.lora_down.weight.mul_(root)


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | float | None,
               base_shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 weight delta up @ down * alpha / rank, shaped like the base weight.

    down: (rank, in) or (rank, in, k, k); up: (out, rank) or (out, rank, 1, 1).
    """
    rank = down.shape[0]
    scale = (float(alpha) if alpha is not None and float(alpha) != 0 else rank) / rank
    delta = up.float().reshape(up.shape[0], -1) @ down.float().reshape(rank, -1)
    return delta.reshape(base_shape) * scale
