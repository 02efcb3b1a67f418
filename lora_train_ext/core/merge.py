"""Merge LoRA files into a checkpoint file (base + sum(strength * delta), per module), and merge
several LoRA files into one.

Only the key map (kohya name -> checkpoint weight key) and the delta math are needed, no model
code. Every algorithm we save merges (LoRA / LoCon, LoHa, LoKr, IA3, DoRA, full, OFT, BOFT) with
the delta the WebUI's built-in loader computes from the same tensors. IA3, DoRA, OFT and BOFT
deltas depend on the weight they modify: as in the WebUI (which applies networks one after
another to the live weight), a file's module sees the weight with the earlier files already
merged. `full`'s
`diff_b` changes the bias next to the weight.

The checkpoint merge streams: the checkpoint is read one tensor at a time and the output written
one tensor at a time (`stream_io`), so memory stays near the largest tensor plus the LoRA files.
Everything that can be checked is checked before the output is opened: every module of every
file must map onto a checkpoint weight of a fitting shape (else the merge is refused with the
list), and a file whose metadata names another architecture is refused. The output is written
to a temp file and renamed into place, so an error never leaves a partial file; a merge that
changes no tensor is an error too.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import keys
from .dtypes import TORCH_DTYPES
from .errors import UserError
from .fsio import atomic_write
from .inspect import arch_of, declared_arch
from .lora_file import LoraInfo, data_section_sha256, load_lora
from .lowrank import (LORA_TENSORS, Factors, factors_from_svd, fits, full_delta, is_kxk,
                      natural_shape, recipe_json, save_lora_file, svd_matrix, svd_of_product,
                      choose_rank, widest_dtype_name)
from .networks import BASE_DEPENDENT_ALGOS, algo_of_tensors
from .networks.dora import dora_delta_from_file
from .networks.full import full_delta_from_file
from .networks.ia3 import ia3_delta_from_file
from .networks.loha import loha_delta_from_file
from .networks.lokr import lokr_delta_from_file
from .networks.lora import lora_delta
from .networks.oft import oft_delta_from_file
from .stream_io import (CheckpointSource, SafetensorsReader, SafetensorsWriter, TensorSpec,
                        check_output_path, file_sha256, numel)

SAVE_DTYPES = TORCH_DTYPES
HASH_PLACEHOLDER = "?" * 64
MAX_LISTED = 8

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, what)


@dataclass
class MergeReport:
    path: str
    changed_modules: int
    changed_tensors: int
    unmatched: list[str] = field(default_factory=list)
    per_file: dict[str, int] = field(default_factory=dict)
    arch: str = ""
    vae_tensors: int = 0
    precision: str = ""
    base_sha256: str = ""
    bytes_written: int = 0
    seconds: float = 0.0
    sources: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"out": os.path.abspath(self.path), "arch": self.arch,
                "changed_modules": self.changed_modules, "changed_tensors": self.changed_tensors,
                "per_file": self.per_file, "vae_tensors": self.vae_tensors,
                "precision": self.precision or "as base", "base_sha256": self.base_sha256,
                "bytes": self.bytes_written, "seconds": round(self.seconds, 3),
                "sources": self.sources}


class MergeMismatch(UserError):
    """A LoRA file that does not fit the checkpoint; `modules` lists every module that does not
    fit, with the reason."""

    def __init__(self, field_name: str, message: str, modules: list[str]):
        super().__init__(field_name, message)
        self.modules = modules


# -- LoRA arguments: FILE[:STRENGTH[:TE:UNET]] ---------------------------------------------------

@dataclass
class LoraSpec:
    """A LoRA file and its strength; `te` / `unet` scale the strength for the text encoders /
    the UNet (1 when not given)."""

    path: str
    strength: float = 1.0
    te: float = 1.0
    unet: float = 1.0
    blocks: dict[str, float] = field(default_factory=dict)  # UNet block weights (IN, OUT04, ...)

    def multiplier(self, part: str) -> float:
        return self.strength * (self.unet if part == "unet" else self.te)

    def module_multiplier(self, name: str, key: str) -> float:
        """The strength for one module: its part's, times its UNet block's weight."""
        part = keys.split_kohya_name(name)[0]
        value = self.multiplier(part)
        if part == "unet" and self.blocks:
            from .networks.targets import block_id, block_value

            ldm = key.split("model.diffusion_model.", 1)[-1]
            value *= block_value(block_id(ldm), self.blocks, 1.0)
        return value

    def to_dict(self) -> dict:
        out = {"file": os.path.basename(self.path), "strength": self.strength,
               "te": self.te, "unet": self.unet}
        if self.blocks:
            out["blocks"] = dict(self.blocks)
        return out


def parse_lora_spec(text: str, field_name: str = "--lora", per_part: bool = True) -> LoraSpec:
    """'FILE', 'FILE:S' or (per_part) 'FILE:S:TE:UNET' -> LoraSpec. The file is the longest
    prefix before a ':' that exists, so paths with colons (C:\\...) work."""
    forms = "FILE, FILE:STRENGTH" + (" or FILE:STRENGTH:TE:UNET" if per_part else "")
    if os.path.isfile(text):
        return LoraSpec(text)
    pieces = text.split(":")
    for i in range(len(pieces) - 1, 0, -1):
        path = ":".join(pieces[:i])
        if not os.path.isfile(path):
            continue
        numbers = pieces[i:]
        if len(numbers) not in ((1, 3) if per_part else (1,)):
            raise UserError(field_name, f"{text!r}: {len(numbers)} numbers after the file; "
                                        f"give {forms}")
        values = []
        for n in numbers:
            try:
                v = float(n)
            except ValueError:
                raise UserError(field_name, f"{text!r}: {n!r} is not a number; give {forms}") \
                    from None
            if not math.isfinite(v):
                raise UserError(field_name, f"{text!r}: {n!r} is not a finite number")
            values.append(v)
        return LoraSpec(path, *values)
    tail = pieces[-1] if len(pieces) > 1 else ""
    try:
        float(tail)
        missing = ":".join(pieces[:-1]) if len(pieces) == 2 else pieces[0]
    except ValueError:
        missing = text
    raise UserError(field_name, f"file not found: {missing}")


def _load(spec: LoraSpec, field_name: str = "--lora") -> tuple[dict, dict]:
    try:
        return load_lora(spec.path)
    except UserError as e:
        raise UserError(field_name, e.message) from None


# -- per-module deltas --------------------------------------------------------------------------

def group_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """'NAME.lora_down.weight' -> {NAME: {'lora_down.weight': ...}}."""
    out: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        name, _, rest = key.partition(".")
        out[name][rest] = t
    return dict(out)


NEEDS_BASE_WEIGHT = BASE_DEPENDENT_ALGOS  # deltas made from the base weight itself


def module_delta(parts: dict[str, torch.Tensor], base_shape: tuple[int, ...], name: str,
                 base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight delta one module of a file makes (strength 1), shaped `base_shape`, as
    the WebUI's loader computes it. IA3, DoRA, OFT and BOFT need `base_weight` (the weight being
    modified, any float dtype, `base_shape` elements)."""
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
        if algo == "ia3":
            delta = ia3_delta_from_file(parts, base)
        elif algo == "dora":
            delta = dora_delta_from_file(parts, base)
        else:
            delta = oft_delta_from_file(parts, base)
        return delta.reshape(base_shape)
    kinds = ", ".join(sorted(parts))
    raise UserError("lora", f"{name}: tensors ({kinds}) are not a module of a known algorithm "
                            "(LoRA/LoCon, LoHa, LoKr, IA3, DoRA, full, OFT, BOFT)")


def module_bias_delta(parts: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The fp32 bias delta of a module (strength 1): `full`'s `diff_b`, else None."""
    diff_b = parts.get("diff_b")
    return None if diff_b is None else diff_b.float().reshape(-1)


def checkpoint_arch(state_keys) -> str | None:
    """The arch a checkpoint's text-encoder keys give (SD1 and SD2 files share UNet names);
    `state_keys`: a state dict or any iterable of its keys."""
    names = list(state_keys)
    for arch in ("sdxl", "sd2", "sd1"):
        prefix = keys.checkpoint_prefix(arch, keys.TE_PARTS[arch][-1])
        if any(k.startswith(prefix) for k in names):
            return arch
    return None


def _bias_key(weight_key: str) -> str:
    """'x.weight' -> 'x.bias'; OpenCLIP 'attn.in_proj_weight' -> 'attn.in_proj_bias'."""
    return weight_key[:-len("weight")] + "bias"


# -- checkpoint merge (streaming) ---------------------------------------------------------------

class _LazyLora:
    """A LoRA file read module by module while the checkpoint streams: its header up front
    (names, shapes and the scalars, for the checks), each module's tensors when the weight it
    changes comes up. Memory: one module at a time, whatever the file's size."""

    def __init__(self, path: str, field_name: str):
        self.path = path
        self.reader = SafetensorsReader(path, field_name)
        self.metadata = self.reader.metadata
        self.modules: dict[str, dict[str, str]] = defaultdict(dict)
        for key in self.reader.keys():
            name, _, rest = key.partition(".")
            self.modules[name][rest] = key
        if not self.modules:
            self.reader.close()
            raise UserError(field_name, f"{path} holds no tensors")

    def shapes(self, name: str) -> dict[str, torch.Tensor]:
        """The module's tensors as meta tensors (shape and dtype only), scalars with values."""
        out = {}
        for rest, key in self.modules[name].items():
            spec = self.reader.specs[key]
            out[rest] = self.reader.read(key) if numel(spec.shape) <= 1 else \
                torch.empty(spec.shape, dtype=spec.dtype, device="meta")
        return out

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        return {rest: self.reader.read(key) for rest, key in self.modules[name].items()}

    def close(self) -> None:
        self.reader.close()


@dataclass
class _Contribution:
    lora: _LazyLora
    name: str
    algo: str
    rows: slice | None
    strength: float
    shape: tuple[int, ...]  # the module's weight: the key's, or its row block


def _module_targets(name: str, arch: str, specs: dict[str, TensorSpec]
                    ) -> tuple[str, slice | None] | None:
    """(checkpoint key, row slice or None) a module changes, None when it names no weight."""
    try:
        targets = keys.kohya_to_checkpoint(name, arch)
        if targets and targets[0][1] is not None and targets[0][0] in specs:
            # OpenCLIP q/k/v: rows of in_proj_weight (3d, d); d from the tensor itself
            width = specs[targets[0][0]].shape[0] // 3
            targets = keys.kohya_to_checkpoint(name, arch, width=width)
    except (KeyError, ValueError):
        return None
    if len(targets) != 1 or targets[0][0] not in specs:
        return None
    return targets[0]


def _plan(loras: list[LoraSpec], lazies: list[_LazyLora], src: CheckpointSource, arch: str,
          forced_arch: bool, field_name: str):
    """Map every module of every file onto the checkpoint; refuse before any writing."""
    contributions: dict[str, list[_Contribution]] = defaultdict(list)
    biases: dict[str, list[_Contribution]] = defaultdict(list)
    per_file: dict[str, int] = {}
    sources: list[dict] = []
    for spec, lora in zip(loras, lazies):
        meta, modules = lora.metadata, lora.modules
        file_name = os.path.basename(spec.path)
        bad: list[str] = []
        stated = declared_arch(meta)
        for name in modules:
            parts = lora.shapes(name)
            algo = algo_of_tensors(parts)
            if not algo:
                bad.append(f"{name} (tensors {', '.join(sorted(parts))}: no known algorithm)")
                continue
            target = _module_targets(name, arch, src.specs)
            if target is None:
                bad.append(f"{name} (no {arch} checkpoint weight)")
                continue
            key, rows = target
            full = src.specs[key].shape
            shape = full if rows is None else (rows.stop - rows.start, *full[1:])
            if not fits(parts, shape):
                got = natural_shape(parts)
                bad.append(f"{name} ({'x'.join(map(str, got)) if got else algo} does not fit "
                           f"{'x'.join(map(str, shape))})")
                continue
            if "diff_b" in parts:
                bkey = _bias_key(key)
                n = src.specs[bkey].shape[0] if bkey in src.specs else -1
                want = n if rows is None else rows.stop - rows.start
                if bkey not in src.specs or parts["diff_b"].numel() != want:
                    bad.append(f"{name} (changes a bias {bkey} the checkpoint lacks)")
                    continue
        if bad or (stated and stated != arch and not forced_arch):
            head = (f"{file_name} is an {stated} LoRA (its metadata), the checkpoint is {arch}; "
                    if stated and stated != arch else f"{file_name}: ")
            listed = ", ".join(bad[:MAX_LISTED]) + (f" and {len(bad) - MAX_LISTED} more"
                                                    if len(bad) > MAX_LISTED else "")
            what = (f"{len(bad)} of {len(modules)} modules do not fit the {arch} checkpoint: "
                    f"{listed}" if bad else "its modules' names and shapes fit, but it was made "
                    "for another model")
            raise MergeMismatch(field_name, f"{head}{what}; nothing was written", bad)
        count = 0
        for name in modules:
            key, rows = _module_targets(name, arch, src.specs)
            strength = spec.module_multiplier(name, key)
            if strength == 0:
                continue
            full = src.specs[key].shape
            shape = full if rows is None else (rows.stop - rows.start, *full[1:])
            c = _Contribution(lora, name, algo_of_tensors(lora.shapes(name)), rows, strength,
                              shape)
            contributions[key].append(c)
            if "diff_b" in modules[name]:
                biases[_bias_key(key)].append(c)
            count += 1
        per_file[spec.path] = count
        sources.append({**spec.to_dict(), "sha256": data_section_sha256(spec.path),
                        "modules": count, "arch": stated or arch_of(meta, list(modules))})
    return contributions, biases, per_file, sources


def _vae_tensors(path: str, src: CheckpointSource, allow_ckpt: bool) -> tuple[CheckpointSource,
                                                                                 dict[str, str]]:
    """Open a VAE file; {checkpoint key: VAE file key} for every VAE weight. The VAE must
    match the checkpoint's first_stage_model.* keys and shapes exactly."""
    vae = CheckpointSource(path, "--vae", allow_ckpt)
    try:
        prefix = keys.VAE_CHECKPOINT_PREFIX
        mapping: dict[str, str] = {}
        for k in vae.keys():
            if k.startswith(("loss.", "model_ema.")):  # training-only entries of VAE files
                continue
            own = k[len(prefix):] if k.startswith(prefix) else k
            mapping[prefix + own] = k
        if any(".down_blocks." in k or ".mid_block." in k for k in mapping):
            raise UserError("--vae", f"{os.path.basename(path)} is a diffusers-format VAE; give "
                                     "a WebUI / LDM VAE file (encoder.down.N..., decoder.up.N...)")
        base_vae = {k for k in src.specs if k.startswith(prefix)}
        missing = sorted(base_vae - set(mapping))
        extra = sorted(set(mapping) - base_vae) if base_vae else []
        wrong = [k for k in mapping if k in src.specs and
                 tuple(src.specs[k].shape) != tuple(vae.specs[mapping[k]].shape)]
        if missing or extra or wrong or not mapping:
            what = "; ".join(x for x in (
                f"lacks {len(missing)} of the checkpoint's VAE tensors (e.g. {missing[:2]})"
                if missing else "",
                f"has {len(extra)} the checkpoint's VAE lacks (e.g. {extra[:2]})" if extra else "",
                f"{len(wrong)} shapes differ (e.g. {wrong[:2]})" if wrong else "",
                "holds no tensors" if not mapping else "") if x)
            raise UserError("--vae", f"{os.path.basename(path)} does not fit the checkpoint: "
                                     f"{what}")
        return vae, mapping
    except BaseException:
        vae.close()
        raise


def merge_checkpoint(base: str, loras: list[LoraSpec], out_path: str,
                     precision: str | None = None, vae: str | None = None,
                     allow_ckpt: bool = False, arch: str | None = None,
                     progress: Progress | None = None,
                     on_start: Callable[[int], None] | None = None) -> MergeReport:
    """Write `out_path` = the checkpoint `base` with each LoRA merged at its strength (and the
    VAE of `vae` baked in), streaming tensor by tensor. Raises UserError (naming the flag:
    --base, --lora, --vae, --out, --precision) before anything is written. `on_start(n)` is
    called once the plan is made, with the number of tensors the output will have (`progress`
    is then called after each of them)."""
    t0 = time.time()
    if precision is not None and precision not in SAVE_DTYPES:
        raise UserError("--precision", f"{precision!r}; choose one of {', '.join(SAVE_DTYPES)}")
    if not loras and not vae:
        raise UserError("--lora", "give at least one LoRA file to merge (or a --vae to bake in)")
    inputs = (base, vae or "", *(s.path for s in loras))
    if not os.path.isfile(base):
        raise UserError("--base", f"not found: {base}")
    for s in loras:
        if not os.path.isfile(s.path):
            raise UserError("--lora", f"not found: {s.path}")
    if vae and not os.path.isfile(vae):
        raise UserError("--vae", f"not found: {vae}")
    check_output_path(out_path, "--out", inputs)
    with CheckpointSource(base, "--base", allow_ckpt) as src:
        ckpt_arch = arch or checkpoint_arch(src.specs)
        if ckpt_arch is None:
            raise UserError("--base", f"{os.path.basename(base)} has no SD1/SD2/SDXL text "
                                      "encoder keys; it is not a full checkpoint")
        lazies: list[_LazyLora] = []
        vae_src = None
        try:
            for s in loras:
                lazies.append(_LazyLora(s.path, "--lora"))
            contributions, biases, per_file, sources = _plan(loras, lazies, src, ckpt_arch,
                                                             bool(arch), "--lora")
            if loras and not contributions:
                raise UserError("--lora", "the merge would change nothing: every strength is 0")
            vae_src, vae_map = _vae_tensors(vae, src, allow_ckpt) if vae else (None, {})
            report = _write_merged(src, contributions, biases, vae_src, vae_map, out_path,
                                   precision, loras, sources, ckpt_arch, progress, on_start)
        finally:
            for lazy in lazies:
                lazy.close()
            if vae_src is not None:
                vae_src.close()
    report.per_file = per_file
    report.changed_modules = sum(per_file.values())
    report.seconds = time.time() - t0
    return report


def _write_merged(src: CheckpointSource, contributions, biases, vae_src, vae_map: dict,
                  out_path: str, precision: str | None, loras: list[LoraSpec], sources: list,
                  arch: str, progress: Progress | None,
                  on_start: Callable[[int], None] | None = None) -> MergeReport:
    dtype = SAVE_DTYPES[precision] if precision else None
    order = src.keys()
    out_specs: list[tuple[str, TensorSpec]] = []
    for key in order:
        spec = src.specs[key]
        out_specs.append((key, TensorSpec(dtype if dtype is not None and spec.dtype.is_floating_point
                                          else spec.dtype, spec.shape)))
    added = [k for k in vae_map if k not in src.specs]  # a checkpoint without a VAE
    for key in added:
        spec = vae_src.specs[vae_map[key]]
        out_specs.append((key, TensorSpec(dtype if dtype is not None and spec.dtype.is_floating_point
                                          else spec.dtype, spec.shape)))
    recipe = {
        "tool": "lora-train-ext merge",
        "base": {"file": os.path.basename(src.path), "sha256": HASH_PLACEHOLDER},
        "loras": sources,
        "vae": {"file": os.path.basename(vae_src.path), "sha256": file_sha256(vae_src.path)}
        if vae_src is not None else None,
        "precision": precision or "as base",
        "arch": arch,
    }
    previous = src.metadata.get("lora_train_ext.merge")
    if previous:  # merging into a merged checkpoint: keep the chain
        try:
            recipe["previous"] = json.loads(previous)
        except ValueError:
            recipe["previous"] = previous
    meta = {k: v for k, v in src.metadata.items() if not k.startswith("modelspec.hash")}
    meta["format"] = "pt"
    meta["lora_train_ext.merge"] = recipe_json(recipe)
    meta["lora_train_ext.merged"] = ", ".join(f"{os.path.basename(s.path)}:{s.strength:g}"
                                              for s in loras)
    report = MergeReport(path=out_path, changed_modules=0, changed_tensors=0, arch=arch,
                         precision=precision or "", sources=sources)
    total = sum(s.nbytes for _, s in out_specs)
    if on_start is not None:
        on_start(len(out_specs))

    def write(tmp: str) -> None:
        done = 0
        with open(tmp, "wb") as f:
            writer = SafetensorsWriter(f, out_specs, meta)
            for key, out_spec in out_specs:
                if key in vae_map:
                    new = vae_src.read(vae_map[key]).to(out_spec.dtype)
                    if key in src.specs:
                        old = src.read(key).to(out_spec.dtype)
                        report.vae_tensors += int(not torch.equal(old, new))
                    else:
                        report.vae_tensors += 1
                    writer.write(key, new)
                elif key in contributions or key in biases:
                    merged, changed = _merge_tensor(src.read(key), contributions.get(key, ()),
                                                    biases.get(key, ()), out_spec.dtype)
                    report.changed_tensors += int(changed)
                    writer.write(key, merged)
                elif src.raw and out_spec.dtype == src.specs[key].dtype:
                    writer.write_raw(key, src.iter_raw(key))
                else:
                    writer.write(key, src.read(key).to(out_spec.dtype))
                done += out_spec.nbytes
                if progress is not None:
                    progress(done, total, key)
            writer.finish()
            if report.changed_tensors == 0 and report.vae_tensors == 0:
                raise UserError("--lora", "the merge changes no tensor of the checkpoint (the "
                                          "deltas are zero or round away); nothing was written")
            report.base_sha256 = src.file_sha256()
            writer.patch_metadata(HASH_PLACEHOLDER, report.base_sha256)
            report.bytes_written = f.tell()

    atomic_write(out_path, write)
    return report


def _merge_tensor(t: torch.Tensor, contributions, biases, out_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, bool]:
    """base + every contribution (files in order; IA3 / DoRA / OFT / BOFT see the earlier ones
    merged)."""
    w = t.float()  # t itself when t is fp32
    acc: torch.Tensor | None = None  # the summed delta; few temporaries of the tensor's size
    for c in contributions:
        rows = slice(None) if c.rows is None else c.rows
        parts = c.lora.parts(c.name)
        base = None
        if c.algo in NEEDS_BASE_WEIGHT:
            base = w[rows] if acc is None else w[rows] + acc[rows]
        delta = module_delta(parts, c.shape, c.name, base).reshape(w[rows].shape)
        delta.mul_(float(c.strength))
        del parts, base
        if acc is None and c.rows is None:
            acc = delta  # 0 + delta: exactly delta
        else:
            if acc is None:
                acc = torch.zeros_like(w)
            acc[rows] += delta
        del delta
    for c in biases:
        if acc is None:
            acc = torch.zeros_like(w)
        bias = module_bias_delta(c.lora.parts(c.name))
        acc[slice(None) if c.rows is None else c.rows] += bias * float(c.strength)
    if w is not t:
        merged = w.add_(acc).to(out_dtype)
    else:
        merged = (w + acc).to(out_dtype)
    del acc, w
    return merged, not torch.equal(merged, t.to(out_dtype))


class _StateSource:
    """An in-memory state dict as the merge plan's source (names, shapes, dtypes)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.specs = {k: TensorSpec(t.dtype, tuple(t.shape)) for k, t in state.items()}


def merge_into_state(state: dict[str, torch.Tensor], loras: list[LoraSpec], arch: str,
                     field_name: str = "loras") -> tuple[dict[str, torch.Tensor], dict]:
    """Merge LoRA files into a model's own tensors, in place, with the same math as a
    checkpoint merge. `state`: checkpoint key -> the model's tensor (views of its parameters).
    Returns (backups, report): a copy of exactly the tensors changed (so `restore_state`
    gives the model back bit for bit, never by subtracting) and what was merged. Nothing is
    changed when any file does not fit (MergeMismatch with the module list)."""
    if not loras:
        raise UserError(field_name, "choose at least one LoRA file to merge")
    lazies = [_LazyLora(spec.path, field_name) for spec in loras]
    try:
        src = _StateSource(state)
        contributions, biases, per_file, sources = _plan(loras, lazies, src, arch, False,
                                                         field_name)
        merged: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key in list(contributions) + [k for k in biases if k not in contributions]:
                t = state[key]
                new, changed = _merge_tensor(t.detach().cpu(), contributions.get(key, ()),
                                             biases.get(key, ()), t.dtype)
                if changed:
                    merged[key] = new
        if not merged:
            raise UserError(field_name, "the merge changes no weight of the model (strengths "
                                        "0, or deltas that round away)")
        backups = {}
        with torch.no_grad():
            for key, new in merged.items():
                backups[key] = state[key].detach().clone()
                state[key].copy_(new.to(state[key].device))
    finally:
        for lazy in lazies:
            lazy.close()
    report = {"arch": arch, "changed_tensors": len(backups), "modules": per_file,
              "sources": sources}
    return backups, report


def restore_state(state: dict[str, torch.Tensor], backups: dict[str, torch.Tensor]) -> None:
    """Put the backed-up tensors back (exact copies)."""
    with torch.no_grad():
        for key, saved in backups.items():
            state[key].copy_(saved)


def merge_lora_into_checkpoint(checkpoint: str, loras: list[tuple[str, float]], out_path: str,
                               arch: str | None = None, save_dtype: str | None = None) -> MergeReport:
    """Write `out_path` = checkpoint with each (LoRA file, strength) merged (streaming)."""
    if not loras:
        raise UserError("--lora", "give at least one LoRA file to merge")
    return merge_checkpoint(checkpoint, [LoraSpec(p, float(s)) for p, s in loras], out_path,
                            precision=save_dtype, arch=arch)


# -- LoRA + LoRA -> LoRA ------------------------------------------------------------------------

@dataclass
class LoraMergeReport:
    path: str
    mode: str  # 'concat' (exact) or 'svd'
    arch: str
    modules: int
    ranks: list[int]
    conv_ranks: list[int]
    kept_energy: float | None
    save_dtype: str
    sources: list[dict]
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"out": os.path.abspath(self.path), "mode": self.mode, "arch": self.arch,
                "modules": self.modules, "ranks": self.ranks, "conv_ranks": self.conv_ranks,
                "kept_energy": self.kept_energy, "save_dtype": self.save_dtype,
                "sources": self.sources, "seconds": round(self.seconds, 3)}


def merge_loras(loras: list[LoraSpec], out_path: str, rank: int | None = None,
                conv_rank: int | None = None, save_dtype: str | None = None,
                progress: Progress | None = None) -> LoraMergeReport:
    """One LoRA file equal to applying every file at its strength.

    Without `rank`: exact concatenation of the factors (ranks add up; LoRA / LoCon files only).
    With `rank`: each module's summed full delta cut to `rank` by SVD (`conv_rank` for kxk
    convs, default `rank`); any algorithm whose delta does not depend on the base weight."""
    t0 = time.time()
    if not loras:
        raise UserError("--lora", "give the LoRA files to merge")
    if rank is not None and rank < 1:
        raise UserError("--rank", f"{rank}; give a rank >= 1")
    if conv_rank is not None and conv_rank < 1:
        raise UserError("--conv-rank", f"{conv_rank}; give a rank >= 1")
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise UserError("--precision", f"{save_dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    for s in loras:
        if not os.path.isfile(s.path):
            raise UserError("--lora", f"not found: {s.path}")
    check_output_path(out_path, "--out", tuple(s.path for s in loras))
    loaded = [_load(s) for s in loras]
    files = [group_modules(t) for t, _ in loaded]
    arches = [arch_of(meta, list(mods)) for (_, meta), mods in zip(loaded, files)]
    if len(set(arches)) > 1:
        listing = ", ".join(f"{os.path.basename(s.path)}: {a}" for s, a in zip(loras, arches))
        raise UserError("--lora", f"the files are for different models ({listing})")
    arch = arches[0]
    for spec, mods in zip(loras, files):
        for name, parts in mods.items():
            algo = algo_of_tensors(parts)
            if algo in NEEDS_BASE_WEIGHT:
                raise UserError("--lora", f"{os.path.basename(spec.path)}: {name} is {algo}; its "
                                          "change depends on the base weight, so it can only be "
                                          "merged into a checkpoint (merge)")
            if not algo:
                raise UserError("--lora", f"{os.path.basename(spec.path)}: {name} has tensors "
                                          f"({', '.join(sorted(parts))}) of no known algorithm")
            if rank is None and (algo != "lora" or set(parts) - LORA_TENSORS):
                raise UserError("--rank", f"{os.path.basename(spec.path)} holds {algo} modules "
                                          f"(e.g. {name}); exact merging concatenates LoRA / "
                                          "LoCon factors only: give --rank R to merge through "
                                          "the full deltas (SVD)")
    names: list[str] = []
    for mods in files:
        names += [n for n in mods if n not in names]
    out: dict[str, torch.Tensor] = {}
    ranks: set[int] = set()
    conv_ranks: set[int] = set()
    kept = total = 0.0
    for i, name in enumerate(names):
        present = [(spec, mods[name]) for spec, mods in zip(loras, files) if name in mods]
        part = keys.split_kohya_name(name)[0] if name.startswith("lora_") else "unet"
        present = [(spec.multiplier(part), parts) for spec, parts in present]
        present = [(s, parts) for s, parts in present if s != 0]
        if not present:
            continue
        if rank is None:
            factors = _concat(name, present)
        else:
            factors = _svd_merge(name, present, arch, rank, conv_rank)
            kept += factors.kept
            total += factors.total
        out.update(factors.tensors(name))
        (conv_ranks if is_kxk(tuple(factors.down.shape)) else ranks).add(factors.rank)
        if progress is not None:
            progress(i + 1, len(names), name)
    if not out:
        raise UserError("--lora", "the merge would be empty: every strength is 0")
    dtype_name = save_dtype or widest_dtype_name(t for t, _ in loaded)
    sources = [{**s.to_dict(), "sha256": data_section_sha256(s.path), "arch": a}
               for s, a in zip(loras, arches)]
    mode = "concat" if rank is None else "svd"
    first_meta = loaded[0][1]
    info = LoraInfo(
        arch=arch, algo="locon" if conv_ranks else "lora",
        rank=max(ranks or conv_ranks), alpha=float(max(ranks or conv_ranks)),
        conv_rank=max(conv_ranks) if conv_ranks else 0,
        conv_alpha=float(max(conv_ranks)) if conv_ranks else 0.0,
        prediction="v" if first_meta.get("ss_v_parameterization") == "True" else "epsilon",
        resolution=_resolution(first_meta, arch),
        output_name=os.path.splitext(os.path.basename(out_path))[0],
        comment="merged from " + " + ".join(f"{os.path.basename(s.path)} x{s.strength:g}"
                                            for s in loras),
        extra={"lora_train_ext.merge_loras": recipe_json(
            {"tool": "lora-train-ext merge-loras", "mode": mode, "rank": rank,
             "conv_rank": conv_rank, "sources": sources})})
    save_lora_file(out, info, out_path, dtype_name)
    return LoraMergeReport(out_path, mode, arch, len(out) // 3, sorted(ranks), sorted(conv_ranks),
                           (kept / total if total > 0 else 1.0) if rank is not None else None,
                           dtype_name, sources, time.time() - t0)


def _resolution(meta: dict[str, str], arch: str) -> str:
    res = meta.get("modelspec.resolution", "")
    if "x" in res:
        return res.replace("x", ",")
    return "1024,1024" if arch == "sdxl" else "512,512"


def _concat(name: str, present: list[tuple[float, dict]]) -> Factors:
    """Stack the factors: up = [c_i up_i], down = [down_i] with c_i = strength * alpha / rank,
    the scale split evenly between the two (sqrt |c| each), alpha = the summed rank."""
    ups, downs = [], []
    for strength, parts in present:
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        r = down.shape[0]
        alpha = parts.get("alpha")
        c = strength * ((float(alpha) if alpha is not None and float(alpha) != 0 else r) / r)
        root = math.sqrt(abs(c))
        ups.append(up * (root if c >= 0 else -root))
        downs.append(down * root)
    if len({tuple(d.shape[1:]) for d in downs}) > 1 or len({u.shape[0] for u in ups}) > 1 or \
            len({tuple(u.shape[2:]) for u in ups}) > 1:
        shapes = ", ".join(f"{tuple(u.shape)}/{tuple(d.shape)}" for u, d in zip(ups, downs))
        raise UserError("--lora", f"{name}: the files' factors have different shapes ({shapes})")
    down, up = torch.cat(downs, 0), torch.cat(ups, 1)
    return Factors(down.contiguous(), up.contiguous(), down.shape[0], 0.0, 0.0)


def _svd_merge(name: str, present: list[tuple[float, dict]], arch: str, rank: int,
               conv_rank: int | None) -> Factors:
    lora_only = all(algo_of_tensors(p) == "lora" and not set(p) - LORA_TENSORS
                    for _, p in present)
    if lora_only:
        shapes = {natural_shape(p) for _, p in present}
        if len(shapes) > 1:
            raise UserError("--lora", f"{name}: the files' modules have different shapes "
                                      f"({', '.join(map(str, shapes))})")
        shape = shapes.pop()
        ups, downs = [], []
        for strength, parts in present:
            down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
            r = down.shape[0]
            alpha = parts.get("alpha")
            c = strength * ((float(alpha) if alpha is not None and float(alpha) != 0 else r) / r)
            ups.append(up.reshape(up.shape[0], r) * c)
            downs.append(down.reshape(r, -1))
        u, s, vh = svd_of_product(torch.cat(ups, 1), torch.cat(downs, 0))
    else:
        deltas = [full_delta(p, name, arch) * strength for strength, p in present]
        shapes = {tuple(d.shape) for d in deltas}
        if len(shapes) > 1:
            raise UserError("--lora", f"{name}: the files' modules have different shapes "
                                      f"({', '.join(map(str, shapes))})")
        delta = torch.stack(deltas).sum(0) if len(deltas) > 1 else deltas[0]
        shape = tuple(delta.shape)
        u, s, vh = svd_matrix(delta.reshape(shape[0], -1))
    target = (conv_rank or rank) if is_kxk(shape) else rank
    r = choose_rank(s, target, None)
    return factors_from_svd(u, s, vh, r, shape)
