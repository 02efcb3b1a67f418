"""Continuing a plain LoRA file (`network.existing_lora`): a file without a saved training state.

`read_existing` reads the file and checks what its metadata and shapes say (arch, algorithm,
rank) before any model work; `load_existing` puts its weights into the run's freshly built
network (alphas must match) and says how many steps the file already had.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from .config import NetworkConfig
from .errors import UserError
from .inspect import algo_of_file, arch_from_version
from .lora_file import load_lora
from .networks import AdapterNetwork
from .run_metadata import BASE_MODEL_VERSION

FIELD = "network.existing_lora"


@dataclass
class ExistingLora:
    path: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def read_existing(path: str, arch: str, cfg: NetworkConfig) -> ExistingLora:
    """Read the file; raise UserError when it was made for another arch, algorithm or rank."""
    if not os.path.isfile(path):
        raise UserError(FIELD, f"file not found: {path}")
    try:
        tensors, meta = load_lora(path)
    except UserError as e:
        raise UserError(FIELD, e.message) from None
    name = os.path.basename(path)
    version = meta.get("ss_base_model_version", "")
    file_arch = arch_from_version(version)
    if file_arch and file_arch != arch:
        raise UserError(FIELD, f"{name} was trained for {version}; this model is {arch} "
                               f"({BASE_MODEL_VERSION.get(arch)})")
    file_algo = algo_of_file(meta, {k: tuple(t.shape) for k, t in tensors.items()})
    if file_algo not in ("", "unknown", cfg.algo) and {file_algo, cfg.algo} != {"lora", "locon"}:
        raise UserError(FIELD, f"{name} is a {file_algo} file; network.algo is {cfg.algo}")
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items()
                    if k.endswith("lora_down.weight") and t.dim() == 2})
    if ranks and ranks != [cfg.rank]:
        raise UserError(FIELD, f"{name} has rank {'/'.join(map(str, ranks))}; "
                               f"set network.rank to {ranks[0]} to continue it")
    return ExistingLora(path, tensors, meta)


def load_existing(existing: ExistingLora, network: AdapterNetwork, arch: str,
                  cfg: NetworkConfig) -> int:
    """Load the file's weights into `network`; return the steps it was trained for."""
    own = network.kohya_state_dict()
    for key, t in existing.tensors.items():
        if key.endswith(".alpha") and key in own and not torch.equal(
                t.float().reshape(()), own[key].float().reshape(())):
            setting = "network.oft_constraint" if cfg.algo in ("oft", "boft") else \
                "network.alpha / conv_alpha"
            raise UserError(FIELD, f"{existing.name} has alpha {float(t):g} "
                                   f"({key.split('.')[0]}), this network {float(own[key]):g}; "
                                   f"set {setting} to the file's values")
    try:
        network.load_kohya_state_dict(existing.tensors)
    except (KeyError, ValueError) as e:
        raise UserError(FIELD, f"{existing.name} does not fit this network (arch {arch}, algo "
                               f"{cfg.algo}, rank {cfg.rank}): {e}") from None
    return steps_from(existing.meta, existing.path)


def steps_from(meta: dict[str, str], path: str) -> int:
    """Steps already trained: `ss_steps` metadata, else the number in the file name as
    ComfyUI's node writes it (`name_1200_steps.safetensors`, `name_1200_steps_20250225_2037`)
    or as our snapshots do (`name-step00001200`); 0 when neither says."""
    try:
        return max(0, int(meta.get("ss_steps", "")))
    except ValueError:
        pass
    stem = os.path.splitext(os.path.basename(path))[0]
    m = re.search(r"(\d+)_steps(?:_|$)", stem) or re.search(r"-step(\d+)$", stem)
    return int(m.group(1)) if m else 0
