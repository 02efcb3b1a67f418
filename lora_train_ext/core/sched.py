"""LR schedules as multipliers of each group's LR, with the curves of kohya / transformers'
`get_scheduler`: a linear warmup from 0, then the named decay.

The multiplier is a pure function (`lr_factor`) so it can be tested and charted without an
optimizer. `build_scheduler` wraps it in a `LambdaLR` whose per-group factor objects carry their
settings, so `state_dict()` / `load_state_dict()` restore a run's schedule exactly.
"""

from __future__ import annotations

import math

import torch

from .config import SCHEDULERS  # the settings table names them
from .errors import UserError

LR_END = 1e-7  # polynomial decays to this absolute LR (transformers' default lr_end)


def lr_factor(name: str, step: int, total: int, warmup: int = 0, cycles: int = 1,
              power: float = 1.0, lr_init: float = 1.0, lr_end: float = LR_END) -> float:
    """Multiplier of the initial LR after `step` scheduler steps.

    `constant` ignores warmup, as in kohya (use constant_with_warmup). `cosine` is one half
    cosine to 0 and ignores `cycles`; `cosine_with_restarts` does `cycles` hard restarts.
    `polynomial` goes from lr_init to the absolute `lr_end` as
    ((lr_init - lr_end) * (1 - progress) ** power + lr_end) / lr_init, then stays there; it
    depends on `lr_init` (the group's initial LR) for that reason. With lr_init <= lr_end it
    decays to 0 instead.
    """
    if name not in SCHEDULERS:
        raise UserError("optim.scheduler",
                        f"{name!r} is not valid; choose one of {', '.join(SCHEDULERS)}")
    if name == "constant":
        return 1.0
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if name == "constant_with_warmup":
        return 1.0
    progress = float(step - warmup) / float(max(1, total - warmup))
    if name == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if name == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * progress) % 1.0))))
    # polynomial
    remaining = max(0.0, 1.0 - progress)
    if lr_init <= lr_end:
        return remaining ** power
    if step > total:
        return lr_end / lr_init
    return ((lr_init - lr_end) * remaining ** power + lr_end) / lr_init


def warmup_steps_for(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Warmup in steps: `warmup_steps` when > 0, else round(warmup_ratio * total_steps)."""
    if warmup_steps > 0:
        return int(warmup_steps)
    return int(round(max(0.0, warmup_ratio) * total_steps))


class ScheduleFactor:
    """Picklable per-group multiplier; LambdaLR's state_dict stores its __dict__."""

    def __init__(self, name: str, total: int, warmup: int, cycles: int, power: float,
                 lr_init: float):
        self.name = name
        self.total = total
        self.warmup = warmup
        self.cycles = cycles
        self.power = power
        self.lr_init = lr_init

    def __call__(self, step: int) -> float:
        return lr_factor(self.name, step, self.total, self.warmup, self.cycles, self.power,
                         self.lr_init)

    def __repr__(self) -> str:
        return f"ScheduleFactor({self.__dict__})"


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_steps: int = 0, warmup_ratio: float = 0.0, cycles: int = 1,
                    power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR for `name` over `total_steps` optimizer steps; call `.step()` after each
    optimizer step. Each param group is scaled from its own initial LR (UNet / TE / LoRA+ up
    weights keep their ratios)."""
    if name not in SCHEDULERS:
        raise UserError("optim.scheduler",
                        f"{name!r} is not valid; choose one of {', '.join(SCHEDULERS)}")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise UserError("train.max_steps", f"{total_steps!r} is not valid; give at least 1 step")
    if cycles < 1:
        raise UserError("optim.scheduler_cycles", f"{cycles!r} is not valid; give at least 1")
    if not power > 0:
        raise UserError("optim.scheduler_power", f"{power!r} is not valid; give a number > 0")
    warmup = warmup_steps_for(total_steps, warmup_steps, warmup_ratio)
    factors = []
    for group in optimizer.param_groups:
        lr_init = group.get("initial_lr", group.get("lr"))
        lr_init = 1.0 if lr_init is None else float(lr_init)
        factors.append(ScheduleFactor(name, total_steps, warmup, int(cycles), float(power), lr_init))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
