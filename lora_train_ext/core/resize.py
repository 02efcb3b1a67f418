"""Resize a LoRA file: per module, the SVD of its delta cut to a new rank.

The new rank is fixed (`rank`, `conv_rank` for kxk convs) or chosen per module from the
singular values (`dynamic`: sv_ratio, sv_cumulative, sv_fro; `rank` then caps it), and never
exceeds the module's own rank. LoRA / LoCon modules are decomposed from their factors (QR of
both, SVD of the small core: exact, no full matrix); LoHa / LoKr / full modules from their full
delta, and come out as LoRA. A DoRA module keeps its magnitude (`dora_scale`) and has its
low-rank update resized. IA3 has no rank and is refused.

Kept energy: the fraction of each module's squared Frobenius norm the new rank keeps (the top
singular values' share), and the same over every module together.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import UserError
from .inspect import arch_of
from .lora_file import LoraInfo, load_lora
from .lowrank import (DYNAMIC_METHODS, LORA_TENSORS, choose_rank, factors_from_svd, full_delta,
                      is_kxk, natural_shape, recipe_json, save_lora_file, svd_matrix,
                      svd_of_product, widest_dtype_name)
from .merge import SAVE_DTYPES, group_modules
from .networks import algo_of_tensors
from .stream_io import check_output_path

Progress = Callable[[int, int, str], None]


@dataclass
class ResizeReport:
    path: str
    arch: str
    method: str
    modules: list[dict] = field(default_factory=list)
    kept_energy: float = 1.0
    save_dtype: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        ranks = [m["new_rank"] for m in self.modules]
        return {"out": os.path.abspath(self.path), "arch": self.arch, "method": self.method,
                "kept_energy": self.kept_energy, "module_count": len(self.modules),
                "rank_min": min(ranks), "rank_max": max(ranks), "save_dtype": self.save_dtype,
                "seconds": round(self.seconds, 3), "modules": self.modules}

    def summary(self) -> str:
        worst = sorted(self.modules, key=lambda m: m["kept_energy"])[:5]
        ranks = [m["new_rank"] for m in self.modules]
        lines = [f"resized {len(self.modules)} modules ({self.method}): rank "
                 f"{min(ranks)}..{max(ranks)}, kept energy {self.kept_energy:.6f} overall"]
        lines += [f"  {m['name']}: rank {m['rank']} -> {m['new_rank']}, kept "
                  f"{m['kept_energy']:.6f}" for m in worst]
        return "\n".join(lines)


def parse_dynamic(text: str) -> tuple[str, float]:
    """'sv_fro:0.9' -> ('sv_fro', 0.9): sv_ratio needs X >= 1, the others 0 < X <= 1."""
    method, _, raw = text.partition(":")
    method = method.strip().lower()
    if method not in DYNAMIC_METHODS or not raw:
        raise UserError("--dynamic", f"{text!r}; give sv_ratio:X, sv_cumulative:X or sv_fro:X")
    try:
        x = float(raw)
    except ValueError:
        raise UserError("--dynamic", f"{raw!r} is not a number") from None
    if method == "sv_ratio" and not x >= 1:
        raise UserError("--dynamic", f"sv_ratio {x:g}: give a ratio >= 1 (keep singular values "
                                     "above the largest / X)")
    if method != "sv_ratio" and not 0 < x <= 1:
        raise UserError("--dynamic", f"{method} {x:g}: give a fraction in (0, 1]")
    return method, x


def resize_lora(path: str, out_path: str, rank: int | None = None,
                dynamic: tuple[str, float] | None = None, conv_rank: int | None = None,
                save_dtype: str | None = None, progress: Progress | None = None) -> ResizeReport:
    t0 = time.time()
    if rank is None and dynamic is None:
        raise UserError("--rank", "give --rank R or --dynamic METHOD:X")
    if rank is not None and rank < 1:
        raise UserError("--rank", f"{rank}; give a rank >= 1")
    if conv_rank is not None and conv_rank < 1:
        raise UserError("--conv-rank", f"{conv_rank}; give a rank >= 1")
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise UserError("--precision", f"{save_dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    if not os.path.isfile(path):
        raise UserError("--lora", f"not found: {path}")
    check_output_path(out_path, "--out", (path,))
    try:
        tensors, meta = load_lora(path)
    except UserError as e:
        raise UserError("--lora", e.message) from None
    modules = group_modules(tensors)
    arch = arch_of(meta, list(modules))
    for name, parts in modules.items():
        algo = algo_of_tensors(parts)
        if algo == "ia3":
            raise UserError("--lora", f"{name} is IA3: it has no rank to resize")
        if not algo:
            raise UserError("--lora", f"{name}: tensors ({', '.join(sorted(parts))}) of no known "
                                      "algorithm")
    method = f"{dynamic[0]}:{dynamic[1]:g}" + (f" (max rank {rank})" if rank else "") \
        if dynamic else f"rank {rank}" + (f", conv rank {conv_rank}" if conv_rank else "")
    out: dict[str, torch.Tensor] = {}
    report = ResizeReport(out_path, arch, method)
    kept = total = 0.0
    ranks: set[int] = set()
    conv_ranks: set[int] = set()
    has_dora = False
    for i, (name, parts) in enumerate(modules.items()):
        algo = algo_of_tensors(parts)
        if algo in ("lora", "dora") and not set(parts) - LORA_TENSORS - {"dora_scale"}:
            down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
            old = down.shape[0]
            alpha = parts.get("alpha")
            scale = (float(alpha) if alpha is not None and float(alpha) != 0 else old) / old
            shape = natural_shape(parts)
            u, s, vh = svd_of_product(up.reshape(up.shape[0], old) * scale, down.reshape(old, -1))
        else:
            delta = full_delta(parts, name, arch)
            shape = tuple(delta.shape)
            u, s, vh = svd_matrix(delta.reshape(shape[0], -1))
            old = int(s.numel())
        cap = (conv_rank or rank) if is_kxk(shape) else rank
        r = min(choose_rank(s, cap, dynamic), old)
        f = factors_from_svd(u, s, vh, r, shape)
        kept += f.kept
        total += f.total
        out.update(f.tensors(name))
        if algo == "dora":
            out[f"{name}.dora_scale"] = parts["dora_scale"]
            has_dora = True
        (conv_ranks if is_kxk(shape) else ranks).add(f.rank)
        report.modules.append({"name": name, "algo": algo, "rank": old, "new_rank": f.rank,
                               "kept_energy": round(f.kept_fraction, 8)})
        if progress is not None:
            progress(i + 1, len(modules), name)
    report.kept_energy = kept / total if total > 0 else 1.0
    report.save_dtype = save_dtype or widest_dtype_name([tensors])
    top = max(ranks or conv_ranks)
    recipe = {"tool": "lora-train-ext resize", "source": os.path.basename(path),
              "source_hash": meta.get("sshs_model_hash", ""), "method": method,
              "kept_energy": round(report.kept_energy, 8)}
    info = LoraInfo(
        arch=arch, algo="dora" if has_dora else ("locon" if conv_ranks else "lora"),
        rank=top, alpha=float(top),
        conv_rank=max(conv_ranks) if conv_ranks else 0,
        conv_alpha=float(max(conv_ranks)) if conv_ranks else 0.0,
        prediction="v" if meta.get("ss_v_parameterization") == "True" else "epsilon",
        resolution=meta.get("modelspec.resolution", "").replace("x", ",") or
        ("1024,1024" if arch == "sdxl" else "512,512"),
        output_name=os.path.splitext(os.path.basename(out_path))[0],
        comment=meta.get("ss_training_comment", ""),
        extra={"lora_train_ext.resize": recipe_json(recipe)})
    save_lora_file(out, info, out_path, report.save_dtype, keep_from=meta)
    report.seconds = time.time() - t0
    return report

