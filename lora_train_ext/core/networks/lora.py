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

    # class-wide switch: False computes the delta as its own tensor and adds it (the plain path,
    # kept for the benchmark and the tests that compare both); see `_hook`
    fused_delta = True

    @property
    def scale(self) -> float:
        return self.alpha_value() / self.rank

    def _module_dropped(self) -> bool:
        return bool(self.training and self.module_dropout and
                    torch.rand((), device="cpu").item() < self.module_dropout)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_down(x.to(self.lora_down.weight.dtype) if not _autocast_on(x.device.type)
                              else x)

    def _dropped_out(self, h: torch.Tensor, scale: float, rank_axis: int) -> tuple[torch.Tensor, float]:
        """Dropout and rank dropout on the low-rank activation h (training only)."""
        if self.dropout:
            h = F.dropout(h, p=self.dropout)
        if self.rank_dropout:
            # one keep/drop draw per sample and rank channel
            shape = [1] * h.dim()
            shape[0], shape[rank_axis] = h.shape[0], self.rank
            mask = (torch.rand(shape, device=h.device) >= self.rank_dropout).to(h.dtype)
            h = h * mask
            scale = scale / (1.0 - self.rank_dropout)
        return h, scale

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self._module_dropped():
            return torch.zeros((), dtype=x.dtype, device=x.device)
        h = self._down(x)
        scale = self.scale * self.multiplier
        if self.training:
            h, scale = self._dropped_out(h, scale, -1 if self.kind == "linear" else 1)
        return self.lora_up(h) * scale

    # on a weight site (networks/mha.py) a plain LoRA's delta can be added to the activations:
    # the same function as adding `delta_weight()` to the weight, without a weight-sized tensor
    site_activation = True

    def site_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """up(down(x)) * scale for a weight site's input x; None where the multiplier is 0 or
        module dropout leaves the adapter out (one draw, as the weight form makes). Like the
        weight form, no dropout or rank dropout."""
        if self.multiplier == 0.0 or self._module_dropped():
            return None
        return self.lora_up(self._down(x)) * (self.scale * self.multiplier)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """output + up(down(x)) * scale, with the up projection, the scale and the sum in one
        matrix op (addmm / baddbmm) instead of three passes over the output, and a 1x1 down
        projection as a matrix product instead of a convolution. The same random draws, in the
        same order, as the plain path (`forward_delta`), which is taken where the fused form does
        not apply (precisions that differ outside autocast, a 1x1 base with stride / padding,
        non-contiguous outputs) or when `fused_delta` is off."""
        if self.multiplier == 0.0:
            return output
        x = args[0]
        if not self.fused_delta or not self._fusable(x, output):
            return super()._hook(module, args, output)
        if self._module_dropped():
            return output
        scale = self.scale * self.multiplier
        up = self.lora_up.weight
        if self.kind == "linear":
            h = self._down(x)
            if self.training:
                h, scale = self._dropped_out(h, scale, -1)
            if h.dtype == output.dtype:
                out = torch.addmm(output.reshape(-1, output.shape[-1]),
                                  h.reshape(-1, self.rank), up.t(), alpha=scale)
                if out.dtype == output.dtype:
                    return out.view(output.shape)
            return output + (self.lora_up(h) * scale).to(output.dtype)
        b, c_out = output.shape[:2]
        if self.kind == "conv1x1":
            xin = x if _autocast_on(x.device.type) else x.to(self.lora_down.weight.dtype)
            h = torch.matmul(self.lora_down.weight.reshape(self.rank, -1),
                             xin.reshape(b, xin.shape[1], -1))
        else:  # kxk down projection: a convolution; the 1x1 up projection as a matrix product
            h = self._down(x).reshape(b, self.rank, -1)
        if self.training:
            h, scale = self._dropped_out(h, scale, 1)
        if h.dtype == output.dtype:
            out = torch.baddbmm(output.reshape(b, c_out, -1),
                                up.reshape(c_out, self.rank).expand(b, -1, -1), h, alpha=scale)
            if out.dtype == output.dtype:
                return out.view(output.shape)
        h = h.reshape(b, self.rank, *output.shape[2:])
        return output + (self.lora_up(h) * scale).to(output.dtype)

    def _fusable(self, x: torch.Tensor, output: torch.Tensor) -> bool:
        if not output.is_contiguous() or output.dim() < 2:
            return False
        if not _autocast_on(output.device.type) and self.lora_up.weight.dtype != output.dtype:
            return False
        if self.kind == "conv1x1":
            d = self.lora_down
            return (x.dim() == 4 and tuple(d.stride) == (1, 1) and tuple(d.dilation) == (1, 1)
                    and d.padding in ((0, 0), 0, "valid") and d.groups == 1)
        return self.kind == "linear" or output.dim() == 4

    def delta_weight(self) -> torch.Tensor:
        return lora_delta(self.lora_down.weight, self.lora_up.weight, self.alpha_value(),
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
    alpha = None if alpha is None else float(alpha)
    scale = (alpha if alpha else rank) / rank
    delta = up.float().reshape(up.shape[0], -1) @ down.float().reshape(rank, -1)
    return delta.reshape(base_shape) * scale


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this device type (torch 2.1's API and the newer one); never
    for the meta device (the memory estimate's trace)."""
    if device_type == "meta":
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no argument; CPU has its own function
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()
