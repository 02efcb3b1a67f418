"""An exponential moving average (EMA) of the adapter's trained weights (`train.ema`).

After each optimizer step s (counted from the run's start, a continued file's steps included):
    s <= start_step:  ema = w              (the copy follows the weights until the average starts)
    s >  start_step:  ema = d * ema + (1 - d) * w
so k steps after the start, ema = d^k * w_start + (1 - d) * sum_{i=1..k} d^(k-i) * w_i.

The copy is kept in fp32 (also for bf16 adapters, whose small updates would vanish in bf16), on
the adapter's device or on the CPU (`train.ema_on_cpu`). It is written as its own file,
NAME-ema.safetensors, beside the raw one (snapshots likewise: NAME-step00000300-ema.safetensors),
with the same metadata plus `ss_ema`; the run's saved state holds it exactly, so a resumed run
averages on bit-identically.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .config import TrainConfig
from .run_metadata import LoraInfo


class AdapterEMA:
    def __init__(self, network: nn.Module, decay: float, start_step: int = 0,
                 on_cpu: bool = False):
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.named = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
        with torch.no_grad():
            self.shadow = {n: p.detach().to(device="cpu" if on_cpu else p.device,
                                            dtype=torch.float32, copy=True)
                           for n, p in self.named}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1 for the first)."""
        follow = step <= self.start_step
        for name, p in self.named:
            s = self.shadow[name]
            w = p.detach().to(device=s.device, dtype=torch.float32)
            if follow:
                s.copy_(w)
            else:
                s.lerp_(w, 1.0 - self.decay)  # s + (1 - d) * (w - s) = d * s + (1 - d) * w

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, the network's parameters hold the EMA weights; afterwards their own values
        again, bit for bit."""
        with torch.no_grad():
            saved = [p.detach().clone() for _, p in self.named]
            for name, p in self.named:
                p.copy_(self.shadow[name].to(device=p.device, dtype=p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), old in zip(self.named, saved):
                    p.copy_(old)

    def label(self) -> str:
        """The file's `ss_ema` value."""
        return f"decay {self.decay:g}, from step {self.start_step}"

    def info(self, info: LoraInfo) -> LoraInfo:
        """The raw file's metadata for the EMA file: the same plus ss_ema."""
        return dataclasses.replace(info, extra={**(info.extra or {}), "ss_ema": self.label()})

    # -- saved state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step,
                "shadow": {n: t.detach().cpu().clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["shadow"]
        if set(saved) != set(self.shadow):
            raise KeyError("the saved EMA does not fit this network")
        with torch.no_grad():
            for name, t in self.shadow.items():
                t.copy_(saved[name])


def ema_for_run(t: TrainConfig, network: nn.Module, state: dict | None,
                warn: Callable[[str], None]) -> AdapterEMA | None:
    """The run's EMA (None when train.ema is off), taken over from a saved state when there is
    one; a state saved without EMA starts the average from the resumed weights."""
    if not t.ema:
        return None
    ema = AdapterEMA(network, t.ema_decay, t.ema_start_step, on_cpu=t.ema_on_cpu)
    saved = (state or {}).get("ema")
    if saved:
        try:
            ema.load_state_dict(saved)
        except KeyError as e:
            warn(f"{e.args[0]}; the average starts from the resumed weights")
    elif state is not None:
        warn("the saved state has no EMA; the average starts from the resumed weights")
    return ema
