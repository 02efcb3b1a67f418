"""Low-rank tools shared by extract, resize and merge-loras: a module's full delta from its file
tensors (without the model), truncated SVD into LoRA factors, rank choice by a fixed rank or
by how much of the singular-value spectrum to keep, and the metadata of the LoRA files they
write.

Factors are split evenly: up = U sqrt(S), down = sqrt(S) V^T, alpha = rank (scale 1), so both
factors have the same magnitude and survive fp16. Energy is the squared Frobenius norm: keeping
the top r singular values keeps sum(S[:r]^2) / sum(S^2) of it, and that fraction is exactly
||D_r||^2 / ||D||^2 for the rank-r result D_r.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import UserError
from .lora_file import LoraInfo, _hashes, atomic_save_safetensors, build_metadata
from .networks import BASE_DEPENDENT_ALGOS, algo_of_tensors
from .networks.loha import loha_delta_from_file
from .networks.lokr import lokr_delta_from_file
from .networks.lora import lora_delta

DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")
LORA_TENSORS = {"lora_down.weight", "lora_up.weight", "alpha"}


# -- module shapes and full deltas from file tensors -------------------------------------------

@lru_cache(maxsize=None)
def module_kinds(arch: str, conv: bool = True) -> dict[str, str]:
    """kohya name -> 'linear' / 'conv1x1' / 'conv3x3' for every module a file for `arch` may
    carry (conv=True) or only the plain LoRA targets (conv=False), from the in-code model built
    on the meta device."""
    from .models.specs import build_unet
    from .models.tiny import build_text_encoders
    from .networks.targets import find_targets

    roots = {"unet": build_unet(arch, "tiny", device="meta"),
             **build_text_encoders(arch, "tiny", device="meta")}
    return {t.name: t.kind for t in find_targets(roots, arch, "both", conv=conv)}


def natural_shape(parts: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The shape a module's delta has from its own tensors: LoRA / DoRA (out, in[, k, k]), full
    its `diff`, LoHa / LoKr (out, cols) with a conv's kernel folded into the columns unless a
    4-d factor holds it. None for IA3, OFT and BOFT (their delta is the base weight's shape)."""
    algo = algo_of_tensors(parts)
    if algo in ("lora", "dora"):
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        return (up.shape[0], *down.shape[1:])
    if algo == "full":
        return tuple(parts["diff"].shape)
    if algo == "loha":
        a, b, t = parts["hada_w1_a"], parts["hada_w1_b"], parts.get("hada_t1")
        if t is not None:
            return (a.shape[1], b.shape[1], *t.shape[2:])
        return (a.shape[0], math.prod(b.shape[1:]))
    if algo == "lokr":
        w1 = parts.get("lokr_w1")
        left = tuple(w1.shape) if w1 is not None else \
            (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
        w2, t2 = parts.get("lokr_w2"), parts.get("lokr_t2")
        if w2 is not None:
            right = tuple(w2.shape)
        elif t2 is not None:
            right = (parts["lokr_w2_a"].shape[1], parts["lokr_w2_b"].shape[1], *t2.shape[2:])
        else:
            right = (parts["lokr_w2_a"].shape[0], math.prod(parts["lokr_w2_b"].shape[1:]))
        return (left[0] * right[0], left[1] * right[1], *right[2:])
    return None


def fits(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> bool:
    """Whether a module's tensors make a delta for a weight of `shape` (rows, elements, and the
    kernel where the tensors carry one)."""
    algo = algo_of_tensors(parts)
    if algo == "ia3":
        n = parts["weight"].numel()
        on_input = bool(int(parts["on_input"].reshape(-1)[0])) if "on_input" in parts else False
        return len(shape) == 2 and n == (shape[1] if on_input else shape[0])
    if algo in ("oft", "boft"):
        return _oft_fits(parts, shape)
    nat = natural_shape(parts)
    if nat is None or nat[0] != shape[0] or math.prod(nat) != math.prod(shape):
        return False
    if algo == "dora":
        scale = parts["dora_scale"]
        if scale.numel() != shape[1]:
            return False
    return len(nat) == 2 or tuple(nat) == tuple(shape) or math.prod(nat[2:]) == 1 and \
        math.prod(shape[2:]) == 1


def _oft_fits(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> bool:
    """OFT: blocks (n, b, b) with n * b rows; BOFT: (stages, n, b, b), n * b rows, b even and
    every stage's butterfly group (b * 2^i rows) dividing them; `rescale` one value per row."""
    blocks = tuple(parts["oft_blocks"].shape)
    out = shape[0]
    if len(blocks) == 3:
        n, b = blocks[0], blocks[1]
        ok = blocks[1] == blocks[2] and n * b == out
    else:
        stages, n, b = blocks[0], blocks[1], blocks[2]
        ok = blocks[2] == blocks[3] and n * b == out and b % 2 == 0 and stages >= 1 and \
            out % (b << (stages - 1)) == 0
    rescale = parts.get("rescale")
    return ok and (rescale is None or math.prod(rescale.shape) == out)


def full_delta(parts: dict[str, torch.Tensor], name: str, arch: str) -> torch.Tensor:
    """A module's fp32 delta (strength 1) from its tensors alone, shaped like the weight it
    changes: (out, in) for a linear, (out, in, k, k) for a conv. IA3, DoRA, OFT and BOFT depend
    on the base weight and are refused."""
    algo = algo_of_tensors(parts)
    if algo in BASE_DEPENDENT_ALGOS:
        raise UserError("--lora", f"{name}: a {algo} module's change depends on the base "
                                  "weight; it can only be merged into a checkpoint (merge)")
    if not algo:
        raise UserError("--lora", f"{name}: tensors ({', '.join(sorted(parts))}) are not a "
                                  "module of a known algorithm")
    shape = natural_shape(parts)
    if algo == "lora":
        delta = lora_delta(parts["lora_down.weight"], parts["lora_up.weight"],
                           parts.get("alpha"), shape)
    elif algo == "full":
        delta = parts["diff"].float()
    elif algo == "loha":
        delta = loha_delta_from_file(parts, shape)
    else:
        delta = lokr_delta_from_file(parts, shape)
    return to_weight_shape(delta, name, arch)


def to_weight_shape(delta: torch.Tensor, name: str, arch: str) -> torch.Tensor:
    """A 2-d delta of a conv module (LoHa / LoKr fold the kernel into the columns) reshaped to
    the conv's (out, in, k, k); other deltas as they are."""
    if delta.dim() != 2:
        return delta
    kind = module_kinds(arch).get(name)
    if kind is None:
        raise UserError("--lora", f"{name} is not a module of {arch}; its kernel size is unknown")
    if kind == "linear":
        return delta
    k = 3 if kind == "conv3x3" else 1
    out, cols = delta.shape
    if cols % (k * k):
        raise UserError("--lora", f"{name}: {cols} columns do not hold a {k}x{k} kernel")
    return delta.reshape(out, cols // (k * k), k, k)


def is_kxk(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[2] * shape[3] > 1


# -- SVD --------------------------------------------------------------------------------------

def svd_matrix(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a 2-d fp32 matrix: U (out, k), S (k,), Vh (k, cols)."""
    return torch.linalg.svd(m.float(), full_matrices=False)


def svd_of_product(up: torch.Tensor, down: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of up @ down (up (out, r), down (r, cols)) without forming the product: QR of
    both factors, SVD of the small r x r core. Exact; the cost is linear in out and cols."""
    up, down = up.double(), down.double()
    qa, ra = torch.linalg.qr(up)
    qb, rb = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(ra @ rb.T, full_matrices=False)
    return (qa @ u).float(), s.float(), (vh @ qb.T).float()


def choose_rank(s: torch.Tensor, rank: int | None, dynamic: tuple[str, float] | None) -> int:
    """How many singular values to keep: `rank`, or by a dynamic rule (capped by `rank` when
    both are given); at least 1, at most len(s).
    - sv_ratio X: keep s_i >= s_max / X;
    - sv_cumulative X: the fewest whose sum reaches X of the total sum;
    - sv_fro X: the fewest whose Frobenius norm reaches X of the total (sqrt of energy)."""
    n = int(s.numel())
    if n == 0:
        return 0
    cap = n if rank is None else min(rank, n)
    if dynamic is None:
        return max(1, cap)
    method, x = dynamic
    s = s.double()
    if float(s[0]) <= 0:
        return 1
    if method == "sv_ratio":
        r = int((s >= s[0] / x).sum())
    elif method == "sv_cumulative":
        frac = torch.cumsum(s, 0) / s.sum()
        r = int((frac < x - 1e-12).sum()) + 1
    elif method == "sv_fro":
        frac = torch.sqrt(torch.cumsum(s * s, 0) / (s * s).sum())
        r = int((frac < x - 1e-12).sum()) + 1
    else:
        raise UserError("--dynamic", f"{method!r}; choose one of {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(r, cap))


def kept_energy(s: torch.Tensor, r: int) -> tuple[float, float]:
    """(kept, total) squared Frobenius norm when the top r singular values are kept."""
    e = s.double() ** 2
    return float(e[:r].sum()), float(e.sum())


@dataclass
class Factors:
    """One LoRA module: down (r, in[, k, k]), up (out, r[, 1, 1]), alpha = r (scale 1)."""

    down: torch.Tensor
    up: torch.Tensor
    rank: int
    kept: float
    total: float

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total if self.total > 0 else 1.0

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.lora_down.weight": self.down, f"{name}.lora_up.weight": self.up,
                f"{name}.alpha": torch.tensor(float(self.rank), dtype=torch.float32)}


def factors_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int,
                     weight_shape: tuple[int, ...], clamp_quantile: float = 1.0) -> Factors:
    """LoRA factors of the top-r SVD, shaped for a weight of `weight_shape`; entries clamped to
    their `clamp_quantile` absolute-value quantile when below 1."""
    r = max(1, min(r, int(s.numel())))
    root = s[:r].clamp_min(0).sqrt()
    up = u[:, :r] * root
    down = root[:, None] * vh[:r]
    if clamp_quantile < 1.0:
        values = torch.cat([up.reshape(-1), down.reshape(-1)]).abs()
        hi = float(_quantile(values, clamp_quantile))
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    kept, total = kept_energy(s, r)
    out = weight_shape[0]
    if len(weight_shape) == 4:
        down = down.reshape(r, *weight_shape[1:])
        up = up.reshape(out, r, 1, 1)
    return Factors(down.contiguous(), up.contiguous(), r, kept, total)


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile without its input-size limit (kthvalue)."""
    n = values.numel()
    k = min(n, max(1, int(math.ceil(q * n))))
    return values.reshape(-1).kthvalue(k).values


# -- files ------------------------------------------------------------------------------------

NETWORK_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                "modelspec.architecture", "modelspec.title", "modelspec.date",
                "ss_output_name", "sshs_model_hash", "sshs_legacy_hash",
                "ss_training_finished_at")


def save_lora_file(tensors: dict[str, torch.Tensor], info: LoraInfo, path: str,
                   save_dtype: str, keep_from: dict[str, str] | None = None) -> dict[str, str]:
    """Write a LoRA file with fresh network metadata (`info`), keeping the other keys of
    `keep_from` (a source file's training facts), and its hashes. No sidecar."""
    from .lora_file import cast_for_file

    final = cast_for_file(tensors, save_dtype)
    meta = build_metadata(info)
    for k, v in (keep_from or {}).items():
        if k not in NETWORK_KEYS and k not in (info.extra or {}):
            meta[k] = v
    meta["ss_output_name"] = os.path.splitext(os.path.basename(path))[0]
    model_hash, legacy = _hashes(final, meta)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy
    atomic_save_safetensors(final, meta, path)
    return meta


def widest_dtype_name(tensor_sets) -> str:
    """'fp32' if any input weight is fp32 (or wider), else 'bf16' if any is bf16, else 'fp16'."""
    seen = set()
    for tensors in tensor_sets:
        for k, t in tensors.items():
            if t.is_floating_point() and not k.endswith(".alpha"):
                seen.add(t.dtype)
    if seen & {torch.float32, torch.float64}:
        return "fp32"
    if torch.bfloat16 in seen:
        return "bf16"
    return "fp16"


def recipe_json(data: dict) -> str:
    return json.dumps(data, sort_keys=False, separators=(",", ":"))
