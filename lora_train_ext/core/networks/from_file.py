"""Build an adapter network that matches a file's tensors (any algorithm, rank, alpha).

Used to apply a saved file to a model for sampling outside the WebUI (the preview host, tests);
inside the WebUI its own Lora extension applies files.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from . import adapter_from_tensors, algo_of_tensors
from .base import AdapterNetwork
from .targets import find_targets


def network_from_tensors(roots: dict[str, nn.Module], arch: str,
                         tensors: dict[str, torch.Tensor]) -> AdapterNetwork:
    by_name = {t.name: t for t in find_targets(roots, arch, "both", conv=True)}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, rest = key.partition(".")
        grouped.setdefault(name, {})[rest] = value
    adapters = []
    for name, parts in grouped.items():
        target = by_name.get(name)
        if target is None:
            raise UserError("lora", f"module {name} does not exist in this {arch} model")
        adapters.append(adapter_from_tensors(name, target.module, parts))
    algos = {algo_of_tensors(p) for p in grouped.values()}
    return AdapterNetwork(adapters, arch=arch, algo=algos.pop() if len(algos) == 1 else "mixed").eval()
