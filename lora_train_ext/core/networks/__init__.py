"""Adapter networks: pick targets, build one adapter per target, attach them with hooks."""

from __future__ import annotations

import torch
from torch import nn

from ..config import NetworkConfig
from ..errors import UserError
from .base import AdapterModule, AdapterNetwork, part_of
from .lora import LoRAModule
from .targets import Target, find_targets

__all__ = ["AdapterModule", "AdapterNetwork", "LoRAModule", "Target", "build_network",
           "find_targets", "part_of", "SUPPORTED_ALGOS"]

SUPPORTED_ALGOS = ("lora", "locon")


def build_network(roots: dict[str, nn.Module], arch: str, cfg: NetworkConfig, seed: int,
                  dtype: torch.dtype = torch.float32) -> AdapterNetwork:
    """One adapter per target; initial weights depend only on `seed` (the global RNG is untouched).

    LoRA targets the transformer blocks; LoCon (or LoRA with conv_rank > 0) adds the 3x3 convs
    with their own rank / alpha.
    """
    if cfg.algo not in SUPPORTED_ALGOS:
        raise UserError("network.algo",
                        f"{cfg.algo!r} is not available yet; choose one of {', '.join(SUPPORTED_ALGOS)}")
    conv_rank = cfg.conv_rank or (cfg.rank if cfg.algo == "locon" else 0)
    conv_alpha = cfg.conv_alpha if cfg.conv_rank else cfg.alpha
    targets = find_targets(roots, arch, cfg.train_on, conv=conv_rank > 0,
                           block_filter=cfg.block_filter)
    if not targets:
        raise UserError("network.block_filter" if cfg.block_filter else "network.train_on",
                        "selects no module to train")
    generator = torch.Generator().manual_seed(int(seed) % (2**63))
    adapters = []
    for t in targets:
        conv3 = t.kind == "conv3x3"
        rank, alpha = (conv_rank, conv_alpha) if conv3 else (cfg.rank, cfg.alpha)
        a = LoRAModule(t.name, t.module, rank, alpha, dropout=cfg.dropout,
                       rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
                       dtype=dtype)
        a.reset_parameters(generator)
        adapters.append(a)
    return AdapterNetwork(adapters, arch=arch, algo=cfg.algo)
