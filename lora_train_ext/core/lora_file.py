"""LoRA files: safetensors with kohya keys, metadata (its `ss_*` + `modelspec.*` keys are built in
run_metadata), hashes, sidecar JSON.

Writes go to a temp file in the target folder and are renamed into place, so a crash never leaves
half a file. Hashes are computed from the final tensors: `sshs_model_hash` is the sha256 of the
file's data section (the bytes after the header), which does not depend on the metadata, so it is
computed before the metadata is complete and still describes the written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import torch
from safetensors.torch import load_file, save as st_save, save_file

from .dtypes import TORCH_DTYPES
from .errors import UserError
from .fsio import atomic_write, atomic_write_text  # noqa: F401 - atomic_write_text re-exported
# the metadata's keys are built in run_metadata; these names are re-exported for importers
from .run_metadata import (BASE_MODEL_VERSION, MODELSPEC_ARCH, LoraInfo,  # noqa: F401
                           build_metadata, now_iso)

SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
SAVE_DTYPES = TORCH_DTYPES


def data_section_sha256(path: str) -> str:
    """sha256 of the bytes after a safetensors file's header (kohya / the WebUI 'addnet' hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(model hash, legacy hash) as kohya's trainer precomputes them.

    The legacy hash reads 64 KiB at offset 1 MiB of the file serialised with only its `ss_*`
    metadata (the convention of the additional-networks extension, which the WebUI still honours).
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = st_save(tensors, ss_only)
    n = struct.unpack("<Q", blob[:8])[0]
    model_hash = hashlib.sha256(blob[8 + n:]).hexdigest()
    legacy = hashlib.sha256(blob[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                            path: str, field: str = "disk") -> None:
    """`field`: the setting that chooses the folder, named when the disk is full."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), field=field)


def cast_for_file(tensors: dict[str, torch.Tensor], save_dtype: str) -> dict[str, torch.Tensor]:
    """CPU, contiguous, floating tensors in `save_dtype` except `alpha` scalars, which stay
    fp32 (kohya keeps them so; a bf16 alpha would round)."""
    dtype = SAVE_DTYPES[save_dtype]
    final = {}
    for k, t in tensors.items():
        t = t.detach().cpu()
        if t.is_floating_point() and not k.endswith(".alpha"):
            t = t.to(dtype)
        final[k] = t.contiguous()
    return final


def save_lora(tensors: dict[str, torch.Tensor], info: LoraInfo, path: str,
              save_dtype: str = "fp16", sidecar: bool = True,
              field: str = "save.output_dir") -> dict[str, str]:
    """Write the adapter file (+ NAME.json sidecar) atomically; return the metadata written.

    Floating tensors are cast to `save_dtype`, except `alpha` scalars which stay fp32 (kohya
    keeps them so; a bf16 alpha would round).
    """
    final = cast_for_file(tensors, save_dtype)
    meta = build_metadata(info, file_name=os.path.splitext(os.path.basename(path))[0])
    model_hash, legacy = _hashes(final, meta)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy
    atomic_save_safetensors(final, meta, path, field=field)
    if sidecar:
        write_sidecar(path, info, field=field)
    return meta


def _size_word(algo: str) -> str:
    return "block size" if algo in ("oft", "boft") else "rank"


def write_sidecar(path: str, info: LoraInfo, field: str = "save.output_dir") -> str:
    """NAME.json as the WebUI's Lora card reads it."""
    side = os.path.splitext(path)[0] + ".json"
    data = {
        "description": info.comment or f"{info.algo} {_size_word(info.algo)} {info.rank} trained "
                                       "with lora-train-ext",
        "activation text": info.trigger_phrase,
        "preferred weight": 1.0,
        "sd version": SD_VERSION[info.arch],
        "notes": f"{info.steps} steps, seed {info.seed}, base {info.model_name or 'unknown'}",
    }
    atomic_write_text(side, json.dumps(data, indent=2) + "\n", field=field)
    return side


def read_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (empty dict when none)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError("file", f"{path} is not a safetensors file (too short)")
        n = struct.unpack("<Q", head)[0]
        if n <= 0 or n > 100_000_000:
            raise UserError("file", f"{path} is not a safetensors file (bad header size)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise UserError("file", f"{path} is not a safetensors file (unreadable header)") from None
    return dict(header.get("__metadata__") or {})


def load_lora(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata). Raises UserError for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise UserError("file", f"not found: {path}")
    meta = read_metadata(path)
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types
        raise UserError("file", f"{path} cannot be read as safetensors: {e}") from None
    return tensors, meta
