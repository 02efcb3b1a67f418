"""Build an adapter network that matches a file's tensors (any rank / alpha per module).

Used to apply a saved file to a model for sampling outside the WebUI (the preview host, tests);
inside the WebUI its own Lora extension applies files.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .base import AdapterNetwork
from .lora import LoRAModule
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
        if "lora_down.weight" not in parts:
            raise UserError("lora", f"{name}: only LoRA/LoCon files can be applied here")
        down = parts["lora_down.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        adapter = LoRAModule(name, target.module, rank=down.shape[0], alpha=alpha)
        adapters.append(adapter)
    network = AdapterNetwork(adapters, arch=arch, algo="lora")
    network.load_kohya_state_dict({k: v.float() if k.endswith("weight") else v
                                   for k, v in tensors.items()})
    return network.eval()
