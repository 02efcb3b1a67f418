"""DoRA (weight-decomposed LoRA): a LoRA update whose merged weight is renormalised per input
column to a learned magnitude,

    V  = W + up @ down * (alpha / rank)
    W' = V * dora_scale / ||V||_col          delta = (W' - W) * multiplier

||V||_col is the 2-norm over every axis but the input axis (axis 1): shape (1, in) for a
(out, in) weight, (1, in, 1, 1) for a conv. This is what the WebUI's loader computes for a module
with `dora_scale` (`NetworkModule.apply_weight_decompose`), i.e. LyCORIS's `wd_on_output=False`;
the multiplier scales the final delta, not the update inside the norm.

Tensors (file names): the LoRA ones (`lora_down.weight`, `lora_up.weight`, `alpha`, see lora.py)
plus `dora_scale` (1, in) or (1, in, 1, 1), fp32.

Init: as LoRA (up = 0) and dora_scale = ||W||_col, computed by the same function the forward
uses, so V = W, dora_scale / ||V||_col is exactly 1 and a new adapter is exactly the identity.
A base column that is all zero would make the loader divide 0 by 0; here the norm is clamped
at 1e-12 (identical to the loader for every nonzero column).
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import LoRAModule, lora_delta
from .weight_delta import base_weight_fp32, hook_output, weight_form_forward

NORM_EPS = 1e-12


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """fp32 2-norm of each input column of a (out, in[, k, k]) weight -> (1, in[, 1, 1])."""
    w = weight.float()
    norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
    return norm.reshape(1, w.shape[1], *([1] * (w.dim() - 2)))


def dora_delta(base_weight: torch.Tensor, update: torch.Tensor,
               dora_scale: torch.Tensor) -> torch.Tensor:
    """fp32 W' - W for the scaled low-rank update `update` (shaped like W)."""
    base = base_weight.float()
    merged = base + update.float().reshape(base.shape)
    shape = (1, base.shape[1], *([1] * (base.dim() - 2)))
    ratio = dora_scale.float().reshape(shape) / column_norm(merged).clamp_min(NORM_EPS)
    return merged * ratio - base


class DoRAModule(LoRAModule):
    site_activation = False  # the magnitude rescales the adapted weight: weight form only

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__(name, base, rank, alpha, dropout=dropout, rank_dropout=rank_dropout,
                         module_dropout=module_dropout, dtype=dtype)
        self.dora_scale = nn.Parameter(
            column_norm(base_weight_fp32(base)).to(device=base.weight.device, dtype=dtype))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """LoRA's init (down kaiming-uniform, up zero) and the magnitude of the base weight."""
        super().reset_parameters(generator)
        if "dora_scale" in self._parameters:
            with torch.no_grad():
                self.dora_scale.copy_(column_norm(base_weight_fp32(self.base)))

    @torch.no_grad()
    def scale_delta_(self, factor: float) -> None:
        """The decomposed delta is not linear in anything: scale the low-rank update (up) and
        leave the learned magnitude alone."""
        self.lora_up.weight.mul_(factor)

    def make_delta(self) -> torch.Tensor:
        update = lora_delta(self.lora_down.weight, self.lora_up.weight, self.alpha_value(),
                            self.base_weight_shape())
        return dora_delta(base_weight_fp32(self.base), update, self.dora_scale)

    def delta_weight(self) -> torch.Tensor:
        return self.make_delta() * self.multiplier

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The decomposed weight has no low-rank path: the output change is the base operation
        with `delta_weight()`, exactly what merging that delta gives."""
        return weight_form_forward(self, x)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return hook_output(self, args, output)

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, parts: dict[str, torch.Tensor],
                     **options) -> "DoRAModule":
        rank = parts["lora_down.weight"].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        return cls(name, base, rank, alpha, **options)


def dora_delta_from_file(parts: dict[str, torch.Tensor], base_weight: torch.Tensor) -> torch.Tensor:
    """A file's DoRA module as the WebUI's loader reads it (LoRA scale alpha / rank, then the
    decomposition against `base_weight`)."""
    update = lora_delta(parts["lora_down.weight"], parts["lora_up.weight"], parts.get("alpha"),
                        tuple(base_weight.shape))
    return dora_delta(base_weight, update, parts["dora_scale"])
