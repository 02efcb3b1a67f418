"""Extract a LoRA from two checkpoints: per module, the SVD of (tuned - base) cut to a rank.

Both checkpoints are read tensor by tensor (`stream_io`); only the modules a LoRA (or, with a
conv rank, a LoCon) targets are read, one weight pair at a time. A module whose largest absolute
difference is at most `min_diff` is left out; when that leaves out a whole text encoder, the
report says the text encoder was identical and skipped. The file is an ordinary kohya LoRA /
LoCon (lora_down / lora_up / alpha = rank, so scale 1) with the usual metadata.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import keys
from .errors import UserError
from .lora_file import LoraInfo
from .lowrank import factors_from_svd, module_kinds, recipe_json, save_lora_file, svd_matrix, \
    choose_rank
from .merge import SAVE_DTYPES, checkpoint_arch
from .models.tiny import default_prediction
from .stream_io import CheckpointSource, check_output_path

Progress = Callable[[int, int, str], None]


@dataclass
class ExtractReport:
    path: str
    arch: str
    modules: int
    rank: int
    conv_rank: int
    kept_energy: float
    skipped: list[str] = field(default_factory=list)
    skipped_parts: list[str] = field(default_factory=list)  # identical text encoders / UNet
    parts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def notes(self) -> list[str]:
        out = []
        for part in self.skipped_parts:
            what = "UNet" if part == "unet" else f"text encoder {part}"
            out.append(f"{what} identical in both checkpoints (max |difference| <= min-diff): "
                       "skipped")
        return out

    def to_dict(self) -> dict:
        return {"out": os.path.abspath(self.path), "arch": self.arch, "modules": self.modules,
                "parts": self.parts, "rank": self.rank, "conv_rank": self.conv_rank,
                "kept_energy": self.kept_energy, "skipped_modules": len(self.skipped),
                "skipped_parts": self.skipped_parts, "notes": self.notes(),
                "seconds": round(self.seconds, 3)}


def extract_lora(base: str, tuned: str, out_path: str, rank: int, conv_rank: int = 0,
                 clamp_quantile: float = 1.0, min_diff: float = 0.0, save_dtype: str = "fp16",
                 allow_ckpt: bool = False, progress: Progress | None = None) -> ExtractReport:
    """Write a LoRA (LoCon with `conv_rank`) of tuned - base; see the module docstring."""
    t0 = time.time()
    if rank < 1:
        raise UserError("--rank", f"{rank}; give a rank >= 1")
    if conv_rank < 0:
        raise UserError("--conv-rank", f"{conv_rank}; give a rank >= 1 (0: no convs)")
    if not 0 < clamp_quantile <= 1:
        raise UserError("--clamp-quantile", f"{clamp_quantile}; give a number in (0, 1]")
    if min_diff < 0:
        raise UserError("--min-diff", f"{min_diff}; give a number >= 0")
    if save_dtype not in SAVE_DTYPES:
        raise UserError("--precision", f"{save_dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    for flag, path in (("--base", base), ("--tuned", tuned)):
        if not os.path.isfile(path):
            raise UserError(flag, f"not found: {path}")
    check_output_path(out_path, "--out", (base, tuned))
    if os.path.samefile(base, tuned):
        raise UserError("--tuned", "is the same file as --base; nothing to extract")
    with CheckpointSource(base, "--base", allow_ckpt) as a, \
            CheckpointSource(tuned, "--tuned", allow_ckpt) as b:
        arch = checkpoint_arch(a.specs)
        if arch is None:
            raise UserError("--base", f"{os.path.basename(base)} has no SD1/SD2/SDXL text "
                                      "encoder keys; it is not a full checkpoint")
        other = checkpoint_arch(b.specs)
        if other != arch:
            raise UserError("--tuned", f"{os.path.basename(tuned)} is {other or 'not a SD'} "
                                       f"checkpoint, --base is {arch}")
        by_key = _targets_by_key(arch, conv_rank > 0, a)
        tensors: dict[str, torch.Tensor] = {}
        report = ExtractReport(out_path, arch, 0, rank, conv_rank, 1.0)
        seen_parts: dict[str, int] = defaultdict(int)
        kept = total = 0.0
        order = [k for k in a.keys() if k in by_key]
        for i, key in enumerate(order):
            if key not in b.specs:
                raise UserError("--tuned", f"{os.path.basename(tuned)} lacks {key}")
            if b.specs[key].shape != a.specs[key].shape:
                raise UserError("--tuned", f"{key}: shape {b.specs[key].shape} differs from "
                                           f"--base's {a.specs[key].shape}")
            diff = b.read(key).float() - a.read(key).float()
            for name, rows, kind in by_key[key]:
                part = keys.split_kohya_name(name)[0]
                seen_parts[part] += 1
                d = diff if rows is None else diff[rows]
                if d.numel() == 0 or float(d.abs().max()) <= min_diff:
                    report.skipped.append(name)
                    continue
                shape = tuple(d.shape)
                u, s, vh = svd_matrix(d.reshape(shape[0], -1))
                target = conv_rank if kind == "conv3x3" else rank
                r = choose_rank(s, target, None)
                f = factors_from_svd(u, s, vh, r, shape, clamp_quantile)
                kept += f.kept
                total += f.total
                tensors.update(f.tensors(name))
                report.parts[part] = report.parts.get(part, 0) + 1
            del diff
            if progress is not None:
                progress(i + 1, len(order), key)
    report.modules = len(tensors) // 3
    report.skipped_parts = sorted(p for p, n in seen_parts.items() if n and not report.parts.get(p))
    if not tensors:
        raise UserError("--tuned", "the checkpoints do not differ in any module a LoRA targets "
                                   f"(max |difference| <= min-diff {min_diff:g}); nothing to "
                                   "extract")
    report.kept_energy = kept / total if total > 0 else 1.0
    recipe = {"tool": "lora-train-ext extract", "base": os.path.basename(base),
              "tuned": os.path.basename(tuned), "rank": rank, "conv_rank": conv_rank,
              "clamp_quantile": clamp_quantile, "min_diff": min_diff,
              "kept_energy": round(report.kept_energy, 6), "skipped_parts": report.skipped_parts}
    info = LoraInfo(
        arch=arch, algo="locon" if conv_rank else "lora", rank=rank, alpha=float(rank),
        conv_rank=conv_rank, conv_alpha=float(conv_rank),
        prediction=default_prediction(arch),
        resolution="1024,1024" if arch == "sdxl" else "512,512",
        output_name=os.path.splitext(os.path.basename(out_path))[0],
        model_name=os.path.basename(base),
        comment=f"extracted from {os.path.basename(tuned)} - {os.path.basename(base)}",
        extra={"lora_train_ext.extract": recipe_json(recipe)})
    save_lora_file(tensors, info, out_path, save_dtype)
    report.seconds = time.time() - t0
    return report


def _targets_by_key(arch: str, conv: bool, src: CheckpointSource
                    ) -> dict[str, list[tuple[str, slice | None, str]]]:
    """checkpoint key -> [(kohya name, row slice, kind)] for every module a LoRA (conv: LoCon)
    of `arch` targets and the checkpoint has."""
    out: dict[str, list] = defaultdict(list)
    for name, kind in module_kinds(arch, conv).items():
        try:
            targets = keys.kohya_to_checkpoint(name, arch)
            if targets and targets[0][1] is not None and targets[0][0] in src.specs:
                width = src.specs[targets[0][0]].shape[0] // 3
                targets = keys.kohya_to_checkpoint(name, arch, width=width)
        except (KeyError, ValueError):
            continue
        for key, rows in targets:
            if key in src.specs:
                out[key].append((name, rows, kind))
    return dict(out)
