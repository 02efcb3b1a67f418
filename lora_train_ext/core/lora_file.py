"""LoRA files: safetensors with kohya keys, `ss_*` + `modelspec.*` metadata, hashes, sidecar JSON.

Writes go to a temp file in the target folder and are renamed into place, so a crash never leaves
half a file. Hashes are computed from the final tensors: `sshs_model_hash` is the sha256 of the
file's data section (the bytes after the header), which does not depend on the metadata, so it is
computed before the metadata is complete and still describes the written file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save as st_save, save_file

from .dtypes import TORCH_DTYPES
from .errors import UserError
from .fsio import atomic_write, atomic_write_text  # noqa: F401 - atomic_write_text re-exported

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
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
                            path: str) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class LoraInfo:
    """Facts that go into a file's metadata. Only arch, algo, rank and alpha are required."""

    arch: str
    algo: str = "lora"
    rank: int = 8
    alpha: float = 1.0
    conv_rank: int = 0
    conv_alpha: float = 0.0
    prediction: str = "epsilon"
    output_name: str = "lora"
    title: str = ""
    trigger_phrase: str = ""
    resolution: str = "512,512"
    model_name: str = ""
    model_hash: str = ""
    steps: int = 0
    epoch: int = 0
    num_epochs: int = 0
    num_train_images: int = 0
    learning_rate: float = 0.0
    unet_lr: float = 0.0
    te_lr: float = 0.0
    optimizer: str = ""
    lr_scheduler: str = ""
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0
    seed: int = 0
    comment: str = ""
    tag_frequency: dict | None = None
    dataset_dirs: dict | None = None
    session_id: str = ""
    started_at: str = ""
    extra: dict[str, str] | None = None


def build_metadata(info: LoraInfo) -> dict[str, str]:
    """kohya `ss_*` and Stability `modelspec.*` keys; every value a string."""
    args: dict[str, Any] = {"algo": info.algo}
    if info.conv_rank:
        args.update(conv_dim=str(info.conv_rank), conv_alpha=str(info.conv_alpha))
    is_lycoris = info.algo not in ("lora", "locon")
    arch_key = "sd2v" if info.arch == "sd2" and info.prediction == "v" else info.arch
    w, h = (info.resolution.split(",") + [info.resolution])[:2]
    meta = {
        "ss_network_module": "lycoris.kohya" if is_lycoris else "networks.lora",
        "ss_network_dim": str(info.rank),
        "ss_network_alpha": _num(info.alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": BASE_MODEL_VERSION[info.arch],
        "ss_v2": str(info.arch == "sd2"),
        "ss_v_parameterization": str(info.prediction == "v"),
        "ss_sd_model_name": info.model_name,
        "ss_sd_model_hash": info.model_hash,
        "ss_resolution": f"({w.strip()}, {h.strip()})",
        "ss_num_train_images": str(info.num_train_images),
        "ss_num_epochs": str(info.num_epochs),
        "ss_epoch": str(info.epoch),
        "ss_steps": str(info.steps),
        "ss_learning_rate": _num(info.learning_rate),
        "ss_unet_lr": _num(info.unet_lr),
        "ss_text_encoder_lr": _num(info.te_lr),
        "ss_optimizer": info.optimizer,
        "ss_lr_scheduler": info.lr_scheduler,
        "ss_noise_offset": _num(info.noise_offset),
        "ss_min_snr_gamma": _num(info.min_snr_gamma),
        "ss_seed": str(info.seed),
        "ss_training_comment": info.comment,
        "ss_tag_frequency": json.dumps(info.tag_frequency or {}),
        "ss_dataset_dirs": json.dumps(info.dataset_dirs or {}),
        "ss_output_name": info.output_name,
        "ss_session_id": info.session_id,
        "ss_training_started_at": info.started_at,
        "ss_training_finished_at": now_iso(),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCH[arch_key]}/{'lycoris-' + info.algo if is_lycoris else 'lora'}",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if info.arch == "sdxl" else "diffusers",
        "modelspec.title": info.title or info.output_name,
        "modelspec.resolution": f"{w.strip()}x{h.strip()}",
        "modelspec.date": now_iso(),
        "modelspec.trigger_phrase": info.trigger_phrase,
        "modelspec.prediction_type": info.prediction,
    }
    for k, v in (info.extra or {}).items():
        meta[k] = str(v)
    return meta


def _num(x: float) -> str:
    return str(float(x))


def save_lora(tensors: dict[str, torch.Tensor], info: LoraInfo, path: str,
              save_dtype: str = "fp16", sidecar: bool = True) -> dict[str, str]:
    """Write the adapter file (+ NAME.json sidecar) atomically; return the metadata written.

    Floating tensors are cast to `save_dtype`, except `alpha` scalars which stay fp32 (kohya
    keeps them so; a bf16 alpha would round).
    """
    dtype = SAVE_DTYPES[save_dtype]
    final = {}
    for k, t in tensors.items():
        t = t.detach().cpu()
        if t.is_floating_point() and not k.endswith(".alpha"):
            t = t.to(dtype)
        final[k] = t.contiguous()
    meta = build_metadata(info)
    meta["ss_output_name"] = os.path.splitext(os.path.basename(path))[0]
    model_hash, legacy = _hashes(final, meta)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy
    atomic_save_safetensors(final, meta, path)
    if sidecar:
        write_sidecar(path, info)
    return meta


def write_sidecar(path: str, info: LoraInfo) -> str:
    """NAME.json as the WebUI's Lora card reads it."""
    side = os.path.splitext(path)[0] + ".json"
    data = {
        "description": info.comment or f"{info.algo} rank {info.rank} trained with lora-train-ext",
        "activation text": info.trigger_phrase,
        "preferred weight": 1.0,
        "sd version": SD_VERSION[info.arch],
        "notes": f"{info.steps} steps, seed {info.seed}, base {info.model_name or 'unknown'}",
    }
    atomic_write_text(side, json.dumps(data, indent=2) + "\n")
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
