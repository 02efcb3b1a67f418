"""Merging LoRA files into the loaded model, in memory: merge, compare A (the original weights)
with B (merged) at the same prompt and seed, revert, save as a checkpoint.

The merge copies exactly the tensors it changes before changing them; Revert copies them back,
so the model is bit-identical to before (never by subtracting the delta). The tab and the API
both go through one `ModelMerger` per host, under the host's lock.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .core.config import check_output_name
from .core.dtypes import TORCH_DTYPES
from .core.errors import UserError
from .core.fsio import atomic_write
from .core.lora_file import data_section_sha256
from .core.merge import LoraSpec, merge_into_state, restore_state
from .core.networks.targets import parse_block_values

SPEC_HELP = "NAME[:STRENGTH[:TE:UNET]] [blocks=IN:0.5,OUT:1], one per line"


def parse_merge_lines(text: str, resolve, field_name: str = "loras") -> list[LoraSpec]:
    """Lines `NAME[:STRENGTH[:TE:UNET]] [blocks=...]` -> LoraSpecs; `resolve(name)` gives the
    file of a LoRA name (UserError / FileNotFoundError when there is none)."""
    specs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        blocks: dict[str, float] = {}
        m = re.search(r"\s+blocks=(\S+)$", line)
        if m:
            blocks = parse_block_values(m.group(1).replace(",", ", "), field_name)
            line = line[:m.start()].strip()
        pieces = line.split(":")
        name, numbers = pieces[0].strip(), pieces[1:]
        if len(numbers) not in (0, 1, 3):
            raise UserError(field_name, f"line {number}: give {SPEC_HELP}")
        try:
            values = [float(n) for n in numbers]
        except ValueError:
            raise UserError(field_name, f"line {number}: {':'.join(numbers)!r} are not numbers; "
                                        f"give {SPEC_HELP}") from None
        try:
            path = resolve(name)
        except (FileNotFoundError, KeyError):
            raise UserError(field_name, f"line {number}: no LoRA named {name!r}") from None
        specs.append(LoraSpec(path, *values, blocks=blocks))
    if not specs:
        raise UserError(field_name, f"give at least one LoRA: {SPEC_HELP}")
    return specs


@dataclass
class MergeState:
    specs: list[LoraSpec] = field(default_factory=list)
    backups: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    model: str = ""  # the model the merge was made on
    merged_at: float = 0.0

    def to_json(self) -> dict:
        return {"merged": bool(self.backups), "model": self.model,
                "loras": [s.to_dict() for s in self.specs],
                "changed_tensors": len(self.backups), "merged_at": self.merged_at or None}


class ModelMerger:
    """One per host: what is merged into the resident model now, and how to undo it."""

    def __init__(self, host):
        self.host = host
        self.state = MergeState()

    # -- called with the host's lock held ---------------------------------------------------
    def merge(self, specs: list[LoraSpec]) -> MergeState:
        """Revert what was merged before, then merge `specs` (all or nothing)."""
        self.revert()
        info = self.host.model_info()
        if info.problem:
            raise UserError("model", info.problem)
        self.host.release_networks()
        state = self.host.checkpoint_state()
        try:
            backups, report = merge_into_state(state, specs, info.arch)
        finally:
            self.host.checkpoint_written(state)
        self.state = MergeState(specs=list(specs), backups=backups, report=report,
                                model=info.hash or info.name, merged_at=time.time())
        self.host.model_changed()
        return self.state

    def revert(self) -> bool:
        """Give the model its original weights back (bit for bit); False when nothing was
        merged, or the merge was made on a model that is no longer loaded."""
        if not self.state.backups:
            return False
        info = self.host.model_info()
        if (info.hash or info.name) != self.state.model:
            self.state = MergeState()  # that model was unloaded: its weights went with it
            return False
        self.host.release_networks()
        state = self.host.checkpoint_state()
        restore_state(state, self.state.backups)
        self.host.checkpoint_written(state)
        self.state = MergeState()
        self.host.model_changed()
        return True

    def compare(self, prompt: str, negative: str, seed: int, steps: int, size: int,
                cfg_scale: float = 7.0):
        """(A: the original weights, B: merged) at the same prompt and seed."""
        if not self.state.backups:
            raise UserError("merge", "nothing is merged: merge first, then compare")
        if not prompt.strip():
            raise UserError("prompt", "write a prompt to compare with")
        state = self.host.checkpoint_state()
        merged = {k: state[k].detach().clone() for k in self.state.backups}
        b = self.host.generate([prompt], negative, seed, steps, size, size, cfg_scale)[0]
        self.host.release_networks()
        state = self.host.checkpoint_state()  # generating may have moved the weights
        restore_state(state, self.state.backups)
        self.host.checkpoint_written(state)
        self.host.model_changed()
        try:
            a = self.host.generate([prompt], negative, seed, steps, size, size, cfg_scale)[0]
        finally:
            self.host.release_networks()
            state = self.host.checkpoint_state()
            restore_state(state, merged)
            self.host.checkpoint_written(state)
            self.host.model_changed()
        return a, b

    def save_checkpoint(self, name: str, precision: str = "fp16", vae: str = "") -> str:
        """Write the merged model as NAME.safetensors in the host's checkpoint folder (metadata:
        the sources, strengths and hashes) and list it there without a restart."""
        from .core.stream_io import SafetensorsWriter, TensorSpec

        if not self.state.backups:
            raise UserError("merge", "nothing is merged: merge first, then save")
        try:
            check_output_name(name)
        except UserError as e:
            raise UserError("name", e.message) from None
        if precision not in TORCH_DTYPES:
            raise UserError("precision", f"{precision!r} is not valid; choose fp16, bf16 or fp32")
        folder = self.host.checkpoint_dir()
        path = os.path.join(folder, f"{name}.safetensors")
        if os.path.exists(path):
            raise UserError("name", f"{name}.safetensors exists in the checkpoint folder; "
                                    "choose another name")
        self.host.release_networks()
        state = self.host.save_state(list(self.state.backups))
        vae_state = self._read_vae(vae, state) if vae else {}
        for key, t in vae_state.items():
            state[key] = t
        dtype = TORCH_DTYPES[precision]
        out = {k: (dtype if t.is_floating_point() else t.dtype) for k, t in state.items()}
        meta = {"format": "pt", "lora_train_ext.merge": json.dumps({
            "tool": "lora-train-ext merge (in memory)", "base": self.state.model,
            "loras": [dict(s.to_dict(), sha256=data_section_sha256(s.path))
                      for s in self.state.specs],
            "vae": os.path.basename(vae) if vae else None, "precision": precision})}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                writer = SafetensorsWriter(f, [(k, TensorSpec(out[k], tuple(t.shape)))
                                               for k, t in state.items()], meta)
                for k, t in state.items():
                    writer.write(k, t.detach().to(out[k]))
                writer.finish()
        atomic_write(path, write)
        self.host.refresh_checkpoints()
        return path

    def _read_vae(self, path: str, state: dict) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if not os.path.isfile(path):
            raise UserError("vae", f"file not found: {path}")
        try:
            raw = load_file(path)
        except Exception as e:
            raise UserError("vae", f"cannot read {os.path.basename(path)}: {e}") from None
        own = {k for k in state if k.startswith("first_stage_model.")}
        vae = {(k if k.startswith("first_stage_model.") else "first_stage_model." + k): t
               for k, t in raw.items()}
        vae = {k: t for k, t in vae.items() if k in own}
        if not vae or len(vae) < len(own) * 0.9:
            raise UserError("vae", f"{os.path.basename(path)} is not a VAE for this model "
                                   f"({len(vae)} of {len(own)} VAE tensors match)")
        return vae
