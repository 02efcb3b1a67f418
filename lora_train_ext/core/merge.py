"""Merge LoRA files into a checkpoint file: base + sum(strength * delta), per module.

Only the key map (kohya name -> checkpoint weight key) and the delta math are needed, no model
code. A merge that changes nothing, or a file whose modules match no checkpoint weight, is an
error, never a silent no-op.

Every algorithm we save merges (LoRA / LoCon, LoHa, LoKr, IA3, DoRA, full) with the delta the
WebUI's built-in loader computes from the same tensors. IA3 and DoRA deltas depend on the weight
they modify: as in the WebUI (which applies networks one after another to the live weight), a
file's module sees the weight with the earlier files already merged. `full`'s `diff_b` changes
the bias next to the weight.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from . import keys
from .errors import UserError
from .inspect import arch_of
from .lora_file import atomic_save_safetensors, load_lora
from .networks import algo_of_tensors
from .networks.dora import dora_delta_from_file
from .networks.full import full_delta_from_file
from .networks.ia3 import ia3_delta_from_file
from .networks.loha import loha_delta_from_file
from .networks.lokr import lokr_delta_from_file
from .networks.lora import lora_delta

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class MergeReport:
    path: str
    changed_modules: int
    changed_tensors: int
    unmatched: list[str] = field(default_factory=list)
    per_file: dict[str, int] = field(default_factory=dict)


def group_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """'NAME.lora_down.weight' -> {NAME: {'lora_down.weight': ...}}."""
    out: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        name, _, rest = key.partition(".")
        out[name][rest] = t
    return dict(out)


NEEDS_BASE_WEIGHT = ("ia3", "dora")  # algorithms whose delta scales the base weight itself


def module_delta(parts: dict[str, torch.Tensor], base_shape: tuple[int, ...], name: str,
                 base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight delta one module of a file makes (strength 1), shaped `base_shape`, as
    the WebUI's loader computes it. IA3 and DoRA need `base_weight` (the weight being modified,
    any float dtype, `base_shape` elements)."""
    algo = algo_of_tensors(parts)
    if algo == "lora":
        return lora_delta(parts["lora_down.weight"], parts["lora_up.weight"], parts.get("alpha"),
                          base_shape)
    if algo == "loha":
        return loha_delta_from_file(parts, base_shape)
    if algo == "lokr":
        return lokr_delta_from_file(parts, base_shape)
    if algo == "full":
        return full_delta_from_file(parts, base_shape)
    if algo in NEEDS_BASE_WEIGHT:
        if base_weight is None:
            raise ValueError(f"{name}: a {algo} delta needs the base weight")
        base = base_weight.float().reshape(base_shape)
        delta = ia3_delta_from_file(parts, base) if algo == "ia3" else \
            dora_delta_from_file(parts, base)
        return delta.reshape(base_shape)
    kinds = ", ".join(sorted(parts))
    raise UserError("lora", f"{name}: tensors ({kinds}) are not a module of a known algorithm "
                            "(LoRA/LoCon, LoHa, LoKr, IA3, DoRA, full)")


def module_bias_delta(parts: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The fp32 bias delta of a module (strength 1): `full`'s `diff_b`, else None."""
    diff_b = parts.get("diff_b")
    return None if diff_b is None else diff_b.float().reshape(-1)


def checkpoint_arch(state: dict[str, torch.Tensor]) -> str | None:
    """The arch a checkpoint's text-encoder keys give (SD1 and SD2 files share UNet names)."""
    for arch in ("sdxl", "sd2", "sd1"):
        prefix = keys.checkpoint_prefix(arch, keys.TE_PARTS[arch][-1])
        if any(k.startswith(prefix) for k in state):
            return arch
    return None


def merge_lora_into_checkpoint(checkpoint: str, loras: list[tuple[str, float]], out_path: str,
                               arch: str | None = None, save_dtype: str | None = None) -> MergeReport:
    """Write `out_path` = checkpoint with each LoRA file merged at its strength."""
    if not os.path.isfile(checkpoint):
        raise UserError("checkpoint", f"not found: {checkpoint}")
    if os.path.abspath(checkpoint) == os.path.abspath(out_path):
        raise UserError("out", "must differ from the input checkpoint (the original is never overwritten)")
    if not loras:
        raise UserError("lora", "give at least one LoRA file to merge")
    with safe_open(checkpoint, "pt") as f:
        ckpt_meta = f.metadata() or {}
    state = load_file(checkpoint)
    changed: set[str] = set()
    report = MergeReport(path=out_path, changed_modules=0, changed_tensors=0)
    deltas: dict[str, torch.Tensor] = {}
    for lora_path, strength in loras:
        tensors, file_meta = load_lora(lora_path)
        modules = group_modules(tensors)
        file_arch = arch or checkpoint_arch(state) or arch_of(file_meta, list(modules))
        count = 0
        for name, parts in modules.items():
            try:
                targets = keys.kohya_to_checkpoint(name, file_arch)
                if any(sl is not None for _, sl in targets) and targets[0][0] in state:
                    # OpenCLIP q/k/v: rows of in_proj_weight (3d, d); d from the tensor itself
                    width = state[targets[0][0]].shape[0] // 3
                    targets = keys.kohya_to_checkpoint(name, file_arch, width=width)
            except (KeyError, ValueError):
                targets = []
            targets = [(k, sl) for k, sl in targets if k in state]
            if not targets:
                report.unmatched.append(name)
                continue
            full_shape = _module_shape(state, targets)
            base = _module_weight(state, deltas, targets) \
                if algo_of_tensors(parts) in NEEDS_BASE_WEIGHT else None
            delta = module_delta(parts, full_shape, name, base) * float(strength)
            row = 0
            for key, sl in targets:
                piece = delta if sl is None else delta[row:row + (sl.stop - sl.start)]
                if sl is not None:
                    row += sl.stop - sl.start
                acc = deltas.setdefault(key, torch.zeros(state[key].shape, dtype=torch.float32))
                if sl is None:
                    acc += piece.reshape(acc.shape)
                else:
                    acc[sl] += piece.reshape(acc[sl].shape)
                changed.add(key)
            bias_delta = module_bias_delta(parts)
            if bias_delta is not None:
                _add_bias_delta(state, deltas, changed, targets, bias_delta * float(strength), name)
            count += 1
        report.per_file[lora_path] = count
        report.changed_modules += count
    if report.unmatched:
        raise UserError("lora", f"{len(report.unmatched)} modules match no weight of the checkpoint "
                                f"(e.g. {report.unmatched[:3]}); wrong arch or not a LoRA for this model")
    if not changed:
        raise UserError("lora", "the merge would change nothing (no module matched)")
    dtype = SAVE_DTYPES.get(save_dtype) if save_dtype else None
    out = {}
    for key, t in state.items():
        if key in deltas:
            merged = (t.float() + deltas[key]).to(t.dtype)
            t = merged
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t.contiguous()
    report.changed_tensors = len(changed)
    meta = dict(ckpt_meta)
    meta["lora_train_ext.merged"] = ", ".join(
        f"{os.path.basename(p)}:{s}" for p, s in loras)
    atomic_save_safetensors(out, meta, out_path)
    return report


def _module_weight(state: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor],
                   targets: list[tuple[str, slice | None]]) -> torch.Tensor:
    """The module's full weight (fp32) with what is merged so far (row blocks stacked)."""
    pieces = []
    for key, sl in targets:
        w = state[key].float()
        if key in deltas:
            w = w + deltas[key]
        pieces.append(w if sl is None else w[sl])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _bias_key(weight_key: str) -> str:
    """'x.weight' -> 'x.bias'; OpenCLIP 'attn.in_proj_weight' -> 'attn.in_proj_bias'."""
    return weight_key[:-len("weight")] + "bias"


def _add_bias_delta(state: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor],
                    changed: set[str], targets: list[tuple[str, slice | None]],
                    bias_delta: torch.Tensor, name: str) -> None:
    row = 0
    for key, sl in targets:
        bkey = _bias_key(key)
        if bkey not in state:
            raise UserError("lora", f"{name}: the file changes a bias ({bkey}) the checkpoint "
                                    "does not have")
        n = state[bkey].shape[0] if sl is None else sl.stop - sl.start
        acc = deltas.setdefault(bkey, torch.zeros(state[bkey].shape, dtype=torch.float32))
        acc[slice(None) if sl is None else sl] += bias_delta[row:row + n]
        row += n
        changed.add(bkey)


def _module_shape(state: dict[str, torch.Tensor], targets: list[tuple[str, slice | None]]) -> tuple:
    """The shape of the module's full weight: a row slice stacks (q, k, v split of in_proj)."""
    if len(targets) == 1 and targets[0][1] is None:
        return tuple(state[targets[0][0]].shape)
    rows = sum((sl.stop - sl.start) if sl is not None else state[k].shape[0] for k, sl in targets)
    rest = tuple(state[targets[0][0]].shape[1:])
    return (rows, *rest)
