"""LoKr (LyCORIS): the delta is a Kronecker product of a small and a large factor,

    delta = kron(w1, w2) * scale,   w1: (out_l, in_m),  w2: (out_k, in_n[, k, k])

with out = out_l * out_k and in = in_m * in_n split by `factorization(dim, factor)`. The large
factor w2 is low-rank (`w2_a @ w2_b`) unless the rank is at least half its larger side or
`full_matrix` is set; with `decompose_both` the small factor w1 is low-rank too under the same
rule. scale = alpha / rank when some factor is low-rank, else 1 (a file then stores alpha = rank,
and the WebUI's loader, which has no rank to divide by, also uses 1).

Tensors (file names):
- `lokr_w1` (out_l, in_m) or `lokr_w1_a` (out_l, rank) + `lokr_w1_b` (rank, in_m);
- `lokr_w2` (out_k, in_n) / (out_k, in_n, k, k) for a conv, or `lokr_w2_a` (out_k, rank) +
  `lokr_w2_b` (rank, in_n * k * k), or with `use_tucker` on a kxk conv: `lokr_t2`
  (rank, rank, k, k) + `lokr_w2_a` (rank, out_k) + `lokr_w2_b` (rank, in_n);
- `alpha` (scalar fp32). The WebUI's loader reads rank from `lokr_w2_b` (else `lokr_w1_b`).

Init (as LyCORIS): w1 (or w1_a, w1_b), w2_a and the core kaiming-uniform; w2 (full) or w2_b zero,
so a new adapter is exactly the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .loha import hada_product
from .weight_delta import WeightDeltaModule, kaiming_uniform, scale_from_file


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """dim = m * n with m <= n. factor > 0 dividing dim: {factor, dim / factor}; otherwise the
    largest divisor m <= sqrt(dim) that is also <= factor (any when factor <= 0), i.e. the most
    balanced split allowed. 1024 -> (32, 32); 1024, 4 -> (4, 256); 360, 16 -> (15, 24)."""
    if dim < 1:
        raise ValueError(f"cannot factor {dim}")
    if factor > 0 and dim % factor == 0:
        m, n = sorted((factor, dim // factor))
        return m, n
    limit = factor if factor > 0 else dim
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0 and d <= limit)
    return m, dim // m


@dataclass(frozen=True)
class LoKrLayout:
    out_l: int
    out_k: int
    in_m: int
    in_n: int
    kernel: tuple[int, ...]  # () for a Linear
    w1_lowrank: bool
    w2_lowrank: bool
    tucker: bool  # w2 as a CP core + two factors (kxk convs only)

    @property
    def any_lowrank(self) -> bool:
        return self.w1_lowrank or self.w2_lowrank


def lokr_layout(shape: tuple[int, ...], rank: int, factor: int = -1,
                decompose_both: bool = False, full_matrix: bool = False,
                use_tucker: bool = False) -> LoKrLayout:
    """The factor shapes LyCORIS picks for a base weight of `shape`."""
    out, cin, kernel = shape[0], shape[1], tuple(shape[2:])
    out_l, out_k = factorization(out, factor)
    in_m, in_n = factorization(cin, factor)
    w1_lowrank = decompose_both and not full_matrix and rank < max(out_l, in_m) / 2
    w2_lowrank = not full_matrix and rank < max(out_k, in_n) / 2
    tucker = use_tucker and w2_lowrank and any(k != 1 for k in kernel)
    return LoKrLayout(out_l, out_k, in_m, in_n, kernel, w1_lowrank, w2_lowrank, tucker)


def layout_from_tensors(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> LoKrLayout:
    w1 = parts.get("lokr_w1")
    out_l = (w1 if w1 is not None else parts["lokr_w1_a"]).shape[0]
    in_m = (w1 if w1 is not None else parts["lokr_w1_b"]).shape[1]
    return LoKrLayout(out_l, shape[0] // out_l, in_m, shape[1] // in_m, tuple(shape[2:]),
                      w1_lowrank=w1 is None, w2_lowrank="lokr_w2" not in parts,
                      tucker="lokr_t2" in parts)


def kron_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float,
               shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 kron(w1, w2) * scale shaped like the base weight. A 4-d w2 (out_k, in_n, k, k) takes
    w1 as (out_l, in_m, 1, 1); a 2-d w2 of a conv holds the kernel in its columns."""
    w1, w2 = w1.float(), w2.float()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape) * scale


def lokr_delta(w1: torch.Tensor | None, w1_a: torch.Tensor | None, w1_b: torch.Tensor | None,
               w2: torch.Tensor | None, w2_a: torch.Tensor | None, w2_b: torch.Tensor | None,
               scale: float, shape: tuple[int, ...], t2: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 delta of a LoKr module from whichever factors it has."""
    left = w1 if w1 is not None else hada_product(w1_a, w1_b)
    right = w2 if w2 is not None else hada_product(w2_a, w2_b, t2)
    return kron_delta(left, right, scale, shape)


class LoKrModule(WeightDeltaModule):
    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, factor: int = -1,
                 decompose_both: bool = False, full_matrix: bool = False,
                 use_tucker: bool = False, layout: LoKrLayout | None = None,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__(name, base, dropout, rank_dropout, module_dropout)
        shape = self.base_weight_shape()
        lay = layout or lokr_layout(shape, rank, factor, decompose_both, full_matrix, use_tucker)
        if lay.out_l * lay.out_k != shape[0] or lay.in_m * lay.in_n != shape[1]:
            raise ValueError(f"{name}: LoKr factors {lay} do not make a {tuple(shape)} weight")
        self.layout = lay
        self.rank = rank
        device = base.weight.device

        def param(*size):
            return nn.Parameter(torch.zeros(size, device=device, dtype=dtype))

        if lay.w1_lowrank:
            self.lokr_w1_a, self.lokr_w1_b = param(lay.out_l, rank), param(rank, lay.in_m)
        else:
            self.lokr_w1 = param(lay.out_l, lay.in_m)
        if not lay.w2_lowrank:
            self.lokr_w2 = param(lay.out_k, lay.in_n, *lay.kernel)
        elif lay.tucker:
            self.lokr_t2 = param(rank, rank, *lay.kernel)
            self.lokr_w2_a, self.lokr_w2_b = param(rank, lay.out_k), param(rank, lay.in_n)
        else:
            self.lokr_w2_a = param(lay.out_k, rank)
            self.lokr_w2_b = param(rank, lay.in_n * math.prod(lay.kernel))
        # full factors only: the scale is 1 and the file says alpha = rank (as LyCORIS writes)
        alpha = float(alpha or rank) if lay.any_lowrank else float(rank)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        lay = self.layout
        with torch.no_grad():
            if lay.w1_lowrank:
                self.lokr_w1_a.copy_(kaiming_uniform(self.lokr_w1_a.shape, generator))
                self.lokr_w1_b.copy_(kaiming_uniform(self.lokr_w1_b.shape, generator))
            else:
                self.lokr_w1.copy_(kaiming_uniform(self.lokr_w1.shape, generator))
            if not lay.w2_lowrank:
                self.lokr_w2.zero_()
            else:
                if lay.tucker:
                    self.lokr_t2.copy_(kaiming_uniform(self.lokr_t2.shape, generator))
                self.lokr_w2_a.copy_(kaiming_uniform(self.lokr_w2_a.shape, generator))
                self.lokr_w2_b.zero_()

    @torch.no_grad()
    def scale_delta_(self, factor: float) -> None:
        """kron is linear in w1 (or its `_a`)."""
        (self.lokr_w1_a if self.layout.w1_lowrank else self.lokr_w1).mul_(factor)

    @property
    def scale(self) -> float:
        return self.alpha_value() / self.rank if self.layout.any_lowrank else 1.0

    def make_delta(self) -> torch.Tensor:
        lay = self.layout
        return lokr_delta(
            None if lay.w1_lowrank else self.lokr_w1,
            self.lokr_w1_a if lay.w1_lowrank else None,
            self.lokr_w1_b if lay.w1_lowrank else None,
            None if lay.w2_lowrank else self.lokr_w2,
            self.lokr_w2_a if lay.w2_lowrank else None,
            self.lokr_w2_b if lay.w2_lowrank else None,
            self.scale, self.base_weight_shape(),
            self.lokr_t2 if lay.tucker else None)

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, parts: dict[str, torch.Tensor],
                     **options) -> "LoKrModule":
        """An (unloaded) module with the layout of a file's tensors."""
        lay = layout_from_tensors(parts, tuple(base.weight.shape))
        low = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
        rank = low.shape[0] if low is not None else 1
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        return cls(name, base, rank, alpha, layout=lay, **options)


def lokr_delta_from_file(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """A file's LoKr module as the WebUI's loader reads it: rank from `lokr_w2_b`, else
    `lokr_w1_b`; neither (full factors) -> scale 1."""
    low = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
    scale = scale_from_file(parts.get("alpha"), None if low is None else low.shape[0])
    return lokr_delta(parts.get("lokr_w1"), parts.get("lokr_w1_a"), parts.get("lokr_w1_b"),
                      parts.get("lokr_w2"), parts.get("lokr_w2_a"), parts.get("lokr_w2_b"),
                      scale, shape, parts.get("lokr_t2"))
