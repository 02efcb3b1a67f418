"""LoHa (LyCORIS): the delta is the Hadamard product of two low-rank products,

    delta = (w1_a @ w1_b) * (w2_a @ w2_b) * (alpha / rank)

so a rank-r LoHa reaches rank r^2 with the parameters of a rank-2r LoRA.

Tensors (file names), W the base weight (out, in) or (out, in, k, k):
- plain: `hada_w1_a`, `hada_w2_a` (out, rank); `hada_w1_b`, `hada_w2_b` (rank, in * k * k)
  (a conv's kernel is folded into the columns, so 1x1 and kxk convs share the layout);
- CP / Tucker (kxk conv with `use_tucker`): `hada_t1`, `hada_t2` (rank, rank, k, k) cores and
  `hada_w1_a`, `hada_w2_a` (rank, out), `hada_w1_b`, `hada_w2_b` (rank, in):
  product_j[o, i, y, x] = sum_pq t_j[p, q, y, x] * w_j_a[p, o] * w_j_b[q, i];
- `alpha` (scalar fp32). The WebUI's loader reads rank as `hada_w1_b.shape[0]`.

Init (as LyCORIS): w1_b, w2_b ~ N(0, 1); w1_a ~ N(0, 0.1); cores ~ N(0, 0.1); w2_a = 0, so the
second product is zero and a new adapter is exactly the identity.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .weight_delta import WeightDeltaModule, normal, scale_from_file


def hada_product(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """One factor of the Hadamard product, fp32. Plain: a (out, r) @ b (r, cols) -> (out, cols).
    CP: t (r, r, k, k), a (r, out), b (r, in) -> (out, in, k, k)."""
    a, b = a.float(), b.float()
    if t is None:
        return a @ b.reshape(b.shape[0], -1)
    return torch.einsum("pqyx,po,qi->oiyx", t.float(), a, b)


def loha_delta(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor,
               scale: float, shape: tuple[int, ...], t1: torch.Tensor | None = None,
               t2: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 delta of a LoHa module, shaped `shape` (the base weight's)."""
    return (hada_product(w1_a, w1_b, t1) * hada_product(w2_a, w2_b, t2)).reshape(shape) * scale


class LoHaModule(WeightDeltaModule):
    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float,
                 use_tucker: bool = False, dropout: float = 0.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, dtype: torch.dtype = torch.float32):
        super().__init__(name, base, dropout, rank_dropout, module_dropout)
        shape = self.base_weight_shape()
        out, cin, kernel = shape[0], shape[1], tuple(shape[2:])
        self.rank = rank
        self.tucker = bool(use_tucker) and self.kind == "conv3x3"
        device = base.weight.device

        def param(*size):
            return nn.Parameter(torch.zeros(size, device=device, dtype=dtype))

        if self.tucker:
            self.hada_w1_a, self.hada_w1_b = param(rank, out), param(rank, cin)
            self.hada_w2_a, self.hada_w2_b = param(rank, out), param(rank, cin)
            self.hada_t1, self.hada_t2 = param(rank, rank, *kernel), param(rank, rank, *kernel)
        else:
            cols = cin * (kernel[0] * kernel[1] if kernel else 1)
            self.hada_w1_a, self.hada_w1_b = param(out, rank), param(rank, cols)
            self.hada_w2_a, self.hada_w2_b = param(out, rank), param(rank, cols)
        self.register_buffer("alpha", torch.tensor(float(alpha or rank), dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            if self.tucker:
                self.hada_t1.copy_(normal(self.hada_t1.shape, 0.1, generator))
                self.hada_t2.copy_(normal(self.hada_t2.shape, 0.1, generator))
            self.hada_w1_b.copy_(normal(self.hada_w1_b.shape, 1.0, generator))
            self.hada_w1_a.copy_(normal(self.hada_w1_a.shape, 0.1, generator))
            self.hada_w2_b.copy_(normal(self.hada_w2_b.shape, 1.0, generator))
            self.hada_w2_a.zero_()

    @torch.no_grad()
    def scale_delta_(self, factor: float) -> None:
        """Each Hadamard factor is linear in its `_a`: sqrt(|factor|) on both (and the sign on
        the first)."""
        root = abs(factor) ** 0.5
        self.hada_w1_a.mul_(math.copysign(root, factor))
        self.hada_w2_a.mul_(root)

    @property
    def scale(self) -> float:
        return self.alpha_value() / self.rank

    def make_delta(self) -> torch.Tensor:
        t1 = self.hada_t1 if self.tucker else None
        t2 = self.hada_t2 if self.tucker else None
        return loha_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b,
                          self.scale, self.base_weight_shape(), t1, t2)

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, parts: dict[str, torch.Tensor],
                     **options) -> "LoHaModule":
        """An (unloaded) module with the layout of a file's tensors."""
        rank = parts["hada_w1_b"].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        return cls(name, base, rank, alpha, use_tucker="hada_t1" in parts, **options)


def loha_delta_from_file(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """A file's LoHa module as the WebUI's loader reads it (rank = hada_w1_b.shape[0])."""
    scale = scale_from_file(parts.get("alpha"), parts["hada_w1_b"].shape[0])
    return loha_delta(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"],
                      parts["hada_w2_b"], scale, shape, parts.get("hada_t1"), parts.get("hada_t2"))
