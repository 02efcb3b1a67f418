"""Full fine-tuning stored as a difference: delta = diff (and the bias changes by diff_b).

Tensors (file names): `diff`, shaped like the base weight; `diff_b`, shaped like the base bias,
when the base has a bias. No alpha (the WebUI's loader uses scale 1; it adds `diff_b` times the
multiplier to the bias).

Init: zeros, so a new adapter is exactly the identity.

Weight sites (OpenCLIP's fused attention, `mha.py`) apply only a weight delta, and the WebUI's
loader drops a bias change on q / k / v of a MultiheadAttention: there the module has no `diff_b`.
"""

from __future__ import annotations

import torch
from torch import nn

from .weight_delta import WeightDeltaModule


class FullModule(WeightDeltaModule):
    def __init__(self, name: str, base: nn.Module, train_bias: bool = True,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__(name, base, dropout, rank_dropout, module_dropout)
        device = base.weight.device
        self.diff = nn.Parameter(torch.zeros(self.base_weight_shape(), device=device, dtype=dtype))
        weight_site = getattr(base, "attach_adapter", None) is not None
        bias = getattr(base, "bias", None)
        if train_bias and bias is not None and not weight_site:
            self.diff_b = nn.Parameter(torch.zeros(bias.shape, device=device, dtype=dtype))
        else:
            self.diff_b = None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.diff.zero_()
            if self.diff_b is not None:
                self.diff_b.zero_()

    @torch.no_grad()
    def scale_delta_(self, factor: float) -> None:
        self.diff.mul_(factor)
        if self.diff_b is not None:
            self.diff_b.mul_(factor)

    def make_delta(self) -> torch.Tensor:
        return self.diff.float()

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.diff_b is None else self.diff_b.float() * self.multiplier

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, parts: dict[str, torch.Tensor],
                     **options) -> "FullModule":
        return cls(name, base, train_bias="diff_b" in parts, **options)


def full_delta_from_file(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return parts["diff"].float().reshape(shape)
