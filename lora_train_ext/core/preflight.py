"""The one check every entry point runs before any model work (tab, API, CLI, trainer).

`preflight(cfg, ...)` returns a `Preflight` with every problem found (each a UserError naming its
field) and the guide's warnings; `raise_if_failed()` raises the first problems as one error.
"""

from __future__ import annotations

import torch

from . import optim as O
from .config import RunConfig
from .errors import UserError
from .networks.targets import parse_block_values


def trained_parts(cfg: RunConfig, te_parts: tuple[str, ...] = ("te",)) -> list[str]:
    """The parts a run trains with a non-zero LR: 'unet' and/or the text encoders' parts."""
    want = {"both": ["unet", *te_parts], "unet": ["unet"], "te": list(te_parts)}[cfg.network.train_on]
    return [p for p in want if (cfg.unet_lr if p == "unet" else cfg.te_lr) > 0]


def check_settings(cfg: RunConfig, te_parts: tuple[str, ...] = ("te",)) -> list[str]:
    """Check the optimizer settings before any model work; return the guide's warnings.

    The optimizer is built once on stand-in tensors with the run's parameter groups (one per
    trained part, two with LoRA+), so a missing package, an unknown argument or LRs an adaptive
    optimizer refuses are a UserError here rather than a crash at the first step.
    """
    o, n = cfg.optim, cfg.network
    parts = trained_parts(cfg, te_parts)
    if not parts:
        raise UserError("optim.lr", "every trained part has learning rate 0")
    spec = O.get_spec(o.optimizer)
    parse_block_values(n.block_ranks, "network.block_ranks", integer=True)
    block_weights = parse_block_values(n.block_lr_weights, "network.block_lr_weights")
    if spec.same_lr and "unet" in parts and any(w != 1.0 for w in block_weights.values()):
        raise UserError("network.block_lr_weights",
                        f"{spec.name} needs one LR for every parameter, and per-block LR weights "
                        "give some blocks another; clear them or pick a non-adaptive optimizer")
    base_lrs = {cfg.unet_lr if p == "unet" else cfg.te_lr for p in parts}
    if spec.same_lr and n.loraplus_ratio != 1.0 and len(base_lrs) == 1:
        raise UserError("network.loraplus_ratio",
                        f"{spec.name} needs one LR for every parameter, and LoRA+ (ratio "
                        f"{n.loraplus_ratio:g}) gives the up weights another; set it to 1")
    groups = []
    for p in parts:
        lr = cfg.unet_lr if p == "unet" else cfg.te_lr
        groups.append({"params": [torch.zeros(1, requires_grad=True)], "lr": lr, "name": p})
        if n.loraplus_ratio != 1.0:
            groups.append({"params": [torch.zeros(1, requires_grad=True)],
                           "lr": lr * n.loraplus_ratio, "name": f"{p}_up"})
    O.build_optimizer(o.optimizer, groups, o.optimizer_args)
    return O.adaptive_warnings(
        o.optimizer, cfg.unet_lr if "unet" in parts else None,
        cfg.te_lr if any(p != "unet" for p in parts) else None, o.scheduler,
        args_text=o.optimizer_args, warmup_steps=o.warmup_steps, warmup_ratio=o.warmup_ratio,
        loraplus_ratio=n.loraplus_ratio)
