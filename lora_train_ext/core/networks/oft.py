"""OFT (LyCORIS diag-OFT) and BOFT (butterfly OFT): a learned rotation of a layer's output
channels, merged into the weight,

    W' = rescale * (R applied to W)        delta = (W' - W) * multiplier

R is orthogonal, made from free parameters B by the Cayley transform of the skew-symmetric
Q = B - B^T:  R = (I + Q)(I - Q)^-1.  Q = 0 gives R = I, so a new adapter (B = 0, rescale = 1)
is exactly the identity.

OFT: R is block-diagonal, `num_blocks` blocks of `block_size` x `block_size`; each block acts on
its `block_size` consecutive output rows of W as its transpose: the rows of block k become
R_k^T W_k (einsum 'k n m, k n ... -> k m ...', the WebUI's and LyCORIS's orientation).

BOFT: `stages` butterfly factors, each `num_blocks` blocks of `block_size` (even); stage i
permutes the rows (groups of 2 * 2^i * block_size / 2 rows: the two halves interleaved), applies
its blocks as R_d W_d (not transposed), and permutes back. block_size * num_blocks = out with
num_blocks a power of two, stages = log2(num_blocks) + 1.

The multiplier scales the final delta (the WebUI's `finalize_updown`; LyCORIS's OFT does the
same, its BOFT instead blends each stage with the identity, which agrees at multiplier 1).

Constraint (COFT): with alpha = c > 0 the norm of Q (all blocks, all stages) is clamped to
c * out: Q * (min(|Q|, c*out) + 1e-8) / (|Q| + 1e-8), exactly as the WebUI 1.10.1 loader reads it
(LyCORIS bounds at the same c * out). c = 0: no constraint.

Tensors (file names), as LyCORIS writes and the WebUI's Lora extension (v1.10.1
`network_oft.py`) and ComfyUI (`weight_adapter/oft.py`, `boft.py`) read them:
- `oft_blocks`: OFT (num_blocks, block_size, block_size), BOFT (stages, num_blocks, block_size,
  block_size); the loaders take the layout from this shape alone;
- `alpha`: the constraint c (scalar fp32; 0 = none);
- `rescale` (optional, `rescaled`): (out, 1) or (out, 1, 1, 1), one scale per output row.

Layout from the block size setting (LyCORIS's `dim` for these algorithms):
- OFT: (block_size, num_blocks) = `factorization(out, size)`: `size` and out / size when
  `size` divides out, the smaller one being the block size; else the most balanced split with
  a block size <= size (320 channels: size 16 -> 16 x 20; size 32 -> blocks of 10).
- BOFT: the largest even block size <= `size` that divides out with out / block_size a power
  of two (320: size 16 -> 10 x 32); a layer with none cannot take BOFT.
"""

from __future__ import annotations

import torch
from torch import nn

from .lokr import factorization
from .weight_delta import WeightDeltaModule, base_weight_fp32

EPS = 1e-8  # the loaders' guard in the constraint's ratio


def rotation_minus_identity(blocks: torch.Tensor, bound: float) -> torch.Tensor:
    """R - I for each block (any leading axes), fp32: R = (I + Q)(I - Q)^-1 with Q = B - B^T
    clamped to norm `bound` (over all of `blocks`; bound <= 0: no clamp). R - I =
    (I - Q)^-1 2Q, exactly zero for Q = 0."""
    b = blocks.float()
    q = b - b.transpose(-1, -2)
    if bound > 0:
        norm = q.norm()
        q = q * ((norm.clamp(max=bound) + EPS) / (norm + EPS))
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye - q, 2 * q)


def oft_delta(base_weight: torch.Tensor, blocks: torch.Tensor, constraint: float,
              rescale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 W' - W for OFT blocks (num_blocks, b, b) on a weight (out, ...); out = num_blocks b."""
    w = base_weight.float()
    n, b = blocks.shape[0], blocks.shape[-1]
    if n * b != w.shape[0]:
        raise ValueError(f"OFT blocks {tuple(blocks.shape)} do not cover {w.shape[0]} rows")
    rm = rotation_minus_identity(blocks, constraint * w.shape[0])
    rows = w.reshape(n, b, -1)
    delta = torch.einsum("knm,knr->kmr", rm, rows).reshape(w.shape)
    return _rescaled(delta, w, rescale)


def _rescaled(delta: torch.Tensor, w: torch.Tensor, rescale: torch.Tensor | None) -> torch.Tensor:
    """s * (W + delta) - W = s * delta + (s - 1) * W: zero while s = 1 and delta = 0."""
    if rescale is None:
        return delta
    s = rescale.float().reshape(-1, *([1] * (w.dim() - 1)))
    return s * delta + (s - 1) * w


def boft_delta(base_weight: torch.Tensor, blocks: torch.Tensor, constraint: float,
               rescale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 W' - W for BOFT blocks (stages, num_blocks, b, b) on a weight (out, ...)."""
    w = base_weight.float()
    stages, n, b = blocks.shape[0], blocks.shape[1], blocks.shape[-1]
    out = w.shape[0]
    if n * b != out or b % 2 or out % (b << (stages - 1)):
        raise ValueError(f"BOFT blocks {tuple(blocks.shape)} do not fit {out} rows")
    rot = rotation_minus_identity(blocks, constraint * out)
    rot = rot + torch.eye(b, dtype=rot.dtype, device=rot.device)
    x = w.reshape(out, -1)
    for i in range(stages):
        half = (b // 2) << i  # rows per half of a butterfly group: 2^i * b / 2
        x = _interleave(x, half)
        x = torch.einsum("dij,djr->dir", rot[i], x.reshape(n, b, -1)).reshape(out, -1)
        x = _deinterleave(x, half)
    delta = (x - w.reshape(out, -1)).reshape(w.shape)
    return _rescaled(delta, w, rescale)


def _interleave(x: torch.Tensor, half: int) -> torch.Tensor:
    """Rows grouped (group, 2, half) -> (group, half, 2): the two halves of each group of
    2 * half rows alternate."""
    return x.reshape(-1, 2, half, x.shape[-1]).transpose(1, 2).reshape(x.shape)


def _deinterleave(x: torch.Tensor, half: int) -> torch.Tensor:
    return x.reshape(-1, half, 2, x.shape[-1]).transpose(1, 2).reshape(x.shape)


def oft_layout(out: int, size: int) -> tuple[int, int]:
    """(block_size, num_blocks) of an OFT module: LyCORIS's `factorization(out, size)`."""
    return factorization(out, size)


def boft_layout(out: int, size: int) -> tuple[int, int, int] | None:
    """(block_size, num_blocks, stages) of a BOFT module, or None when `out` has no even
    divisor <= size whose quotient is a power of two (LyCORIS's `power2factorization`)."""
    best = None
    for b in range(2, min(size, out) + 1, 2):
        q, r = divmod(out, b)
        if r == 0 and q & (q - 1) == 0:
            best = b
    if best is None:
        return None
    n = out // best
    return best, n, n.bit_length()  # n = 2^p -> p + 1 stages


class _OFTBase(WeightDeltaModule):
    """Shared parts: `oft_blocks`, the constraint in `alpha`, the optional `rescale`."""

    def _make_tensors(self, block_shape: tuple[int, ...], constraint: float, rescaled: bool,
                      dtype: torch.dtype) -> None:
        device = self.base.weight.device
        shape = self.base_weight_shape()
        self.oft_blocks = nn.Parameter(torch.zeros(block_shape, device=device, dtype=dtype))
        if rescaled:
            self.rescale = nn.Parameter(torch.ones(shape[0], *([1] * (len(shape) - 1)),
                                                   device=device, dtype=dtype))
        else:
            self.rescale = None
        self.register_buffer("alpha", torch.tensor(float(constraint), dtype=torch.float32))

    @property
    def constraint(self) -> float:
        return self.alpha_value()

    @property
    def rescaled(self) -> bool:
        return self.rescale is not None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """B = 0 (R = I) and rescale = 1: the identity."""
        with torch.no_grad():
            self.oft_blocks.zero_()
            if self.rescale is not None:
                self.rescale.fill_(1.0)

    @torch.no_grad()
    def scale_delta_(self, factor: float) -> None:
        """The delta is not linear in anything: scale B (the delta is nearly linear in it while
        the rotation is small; LyCORIS's max-norm does the same) and rescale's distance to 1."""
        self.oft_blocks.mul_(factor)
        if self.rescale is not None:
            self.rescale.sub_(1.0).mul_(factor).add_(1.0)


class OFTModule(_OFTBase):
    def __init__(self, name: str, base: nn.Module, block_size: int = 16,
                 constraint: float = 0.0, rescaled: bool = False,
                 layout: tuple[int, int] | None = None, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__(name, base, dropout, rank_dropout, module_dropout)
        out = self.base_weight_shape()[0]
        b, n = layout or oft_layout(out, block_size)
        if b * n != out:
            raise ValueError(f"{name}: OFT blocks {n} x {b} do not cover {out} channels")
        self.block_size, self.num_blocks = b, n
        self._make_tensors((n, b, b), constraint, rescaled, dtype)

    def make_delta(self) -> torch.Tensor:
        return oft_delta(base_weight_fp32(self.base), self.oft_blocks, self.constraint,
                         self.rescale)

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, parts: dict[str, torch.Tensor],
                     **options) -> "OFTModule":
        n, b = parts["oft_blocks"].shape[:2]
        return cls(name, base, layout=(b, n), constraint=_alpha(parts),
                   rescaled="rescale" in parts, **options)


class BOFTModule(_OFTBase):
    def __init__(self, name: str, base: nn.Module, block_size: int = 16,
                 constraint: float = 0.0, rescaled: bool = False,
                 layout: tuple[int, int, int] | None = None, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__(name, base, dropout, rank_dropout, module_dropout)
        out = self.base_weight_shape()[0]
        lay = layout or boft_layout(out, block_size)
        if lay is None:
            raise ValueError(f"{name}: BOFT cannot split {out} channels into a power of two of "
                             f"blocks of an even size <= {block_size}")
        b, n, stages = lay
        if b * n != out or b % 2 or out % (b << (stages - 1)):
            raise ValueError(f"{name}: BOFT layout {stages} x {n} x {b} does not fit {out} "
                             "channels")
        self.block_size, self.num_blocks, self.stages = b, n, stages
        self._make_tensors((stages, n, b, b), constraint, rescaled, dtype)

    def make_delta(self) -> torch.Tensor:
        return boft_delta(base_weight_fp32(self.base), self.oft_blocks, self.constraint,
                          self.rescale)

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, parts: dict[str, torch.Tensor],
                     **options) -> "BOFTModule":
        stages, n, b = parts["oft_blocks"].shape[:3]
        return cls(name, base, layout=(b, n, stages), constraint=_alpha(parts),
                   rescaled="rescale" in parts, **options)


def _alpha(parts: dict[str, torch.Tensor]) -> float:
    """The constraint a file states (absent: none, as LyCORIS and the WebUI 1.10.1 read it)."""
    alpha = parts.get("alpha")
    return float(alpha) if alpha is not None else 0.0


def oft_delta_from_file(parts: dict[str, torch.Tensor], base_weight: torch.Tensor) -> torch.Tensor:
    """A file's OFT or BOFT module (strength 1) as the WebUI's loader reads it."""
    blocks = parts["oft_blocks"]
    fn = boft_delta if blocks.dim() == 4 else oft_delta
    return fn(base_weight, blocks, _alpha(parts), parts.get("rescale"))
