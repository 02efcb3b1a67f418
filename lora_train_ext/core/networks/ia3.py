"""(IA)^3: learned rescaling of a layer's output channels (or its input channels),

    W' = W * (1 + w)[:, None]   (on the output)      W' = W * (1 + w)[None, :]   (on the input)

so delta = W * w on the rows (or columns). No rank, no alpha: the WebUI's loader uses scale 1.

Tensors (file names): `weight` (out,) or (in,) fp32, and `on_input`, a scalar int64 (0 or 1)
that the WebUI's loader reads with `.item()` (LyCORIS writes the same).

Init: w = 0, so a new adapter is exactly the identity.

Linear bases only: the WebUI's loader broadcasts `w` against the weight's last axes, which works
for a (out, in) weight and not for a conv's (out, in, k, k). The targets (as LyCORIS's `ia3`
preset and the IA3 paper): attention keys and values on the output, the feed-forward's second
layer on its input (the hidden activation).
"""

from __future__ import annotations

import torch
from torch import nn

from .weight_delta import WeightDeltaModule, base_weight_fp32


def ia3_delta(base_weight: torch.Tensor, weight: torch.Tensor, on_input: bool) -> torch.Tensor:
    """fp32 W * w along the input axis (columns) or the output axis (rows) of a (out, in) W."""
    w = weight.float().reshape(-1)
    base = base_weight.float()
    return base * w if on_input else base * w[:, None]


class IA3Module(WeightDeltaModule):
    supported_kinds = ("linear",)

    def __init__(self, name: str, base: nn.Module, on_input: bool = False,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__(name, base, dropout, rank_dropout, module_dropout)
        out, cin = self.base_weight_shape()
        self.weight = nn.Parameter(torch.zeros(cin if on_input else out,
                                               device=base.weight.device, dtype=dtype))
        self.register_buffer("on_input", torch.tensor(int(bool(on_input)), dtype=torch.int64))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.weight.zero_()

    @torch.no_grad()
    def scale_delta_(self, factor: float) -> None:
        self.weight.mul_(factor)

    def make_delta(self) -> torch.Tensor:
        return ia3_delta(base_weight_fp32(self.base), self.weight, bool(self.on_input))

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, parts: dict[str, torch.Tensor],
                     **options) -> "IA3Module":
        return cls(name, base, on_input=bool(parts["on_input"].item()), **options)


def ia3_delta_from_file(parts: dict[str, torch.Tensor], base_weight: torch.Tensor) -> torch.Tensor:
    return ia3_delta(base_weight, parts["weight"], bool(parts["on_input"].item()))
