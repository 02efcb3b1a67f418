"""Freeze the base model for a run and give it back exactly as it was.

`BaseGuard` records every base parameter's `requires_grad` and every module's train/eval mode,
freezes them, and on `restore()` puts them back. `verify()` proves the weights were not changed:
each tensor's storage pointer, version counter (bumped by every in-place write through the
tensor) and a float64 sum must equal what they were before the run.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import TrainingError


def _named_tensors(modules: list[nn.Module]):
    seen = set()
    for i, m in enumerate(modules):
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            yield f"{i}.{name}", t


SUM_CHUNK = 1 << 20  # elements summed at a time on the CPU (an 8 MiB float64 temporary)


def _cpu_sum(t: torch.Tensor) -> float:
    """float64 sum of a CPU tensor, a chunk at a time. Summing it whole makes a float64 copy of
    the tensor; those copies, freed between small tensors that stay, left the C allocator's heap
    fragmented: about 2 GiB of resident memory held after a fingerprint of SD1.5 in fp32."""
    flat = t.detach().reshape(-1)
    if not t.is_floating_point():
        flat = flat.double()
    return sum(float(c.sum(dtype=torch.float64)) for c in flat.split(SUM_CHUNK))


def fingerprint(modules: list[nn.Module]) -> dict[str, tuple]:
    """name -> (data_ptr, version, float64 sum). One device sync for all sums of GPU tensors;
    CPU tensors are summed in chunks (`_cpu_sum`)."""
    names, facts, sums = [], [], []
    with torch.no_grad():
        for name, t in _named_tensors(modules):
            names.append(name)
            facts.append((t.data_ptr(), t._version))
            if t.device.type == "cpu":
                sums.append(_cpu_sum(t))
            else:
                sums.append(t.detach().sum(dtype=torch.float64).reshape(1) if
                            t.is_floating_point() else t.detach().double().sum().reshape(1))
    if not names:
        return {}
    device_sums = [s for s in sums if isinstance(s, torch.Tensor)]
    values = iter(torch.cat([s.cpu() for s in device_sums]).tolist() if device_sums else [])
    total = [s if not isinstance(s, torch.Tensor) else next(values) for s in sums]
    return {n: (*f, s) for n, f, s in zip(names, facts, total)}


class BaseGuard:
    def __init__(self, modules: list[nn.Module], check_sums: bool = True):
        self.modules = [m for m in modules if m is not None]
        self.check_sums = check_sums
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._training: list[tuple[nn.Module, bool]] = []
        self._before: dict[str, tuple] = {}

    def freeze(self) -> None:
        self._before = fingerprint(self.modules) if self.check_sums else {}
        seen = set()
        for m in self.modules:
            for sub in m.modules():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    self._training.append((sub, sub.training))
            for p in m.parameters():
                self._requires_grad.append((p, p.requires_grad))
                p.requires_grad_(False)
        for m in self.modules:
            m.eval()

    def restore(self) -> None:
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        for sub, flag in self._training:
            sub.training = flag
        self._requires_grad.clear()
        self._training.clear()

    def accept_same_values(self) -> None:
        """After the host had the model (a pause): each tensor must sit where it did and hold
        the same values (float64 sum); writes that put the same values back (the Lora
        extension's restore from its backups) are accepted by taking their version counters.
        Raises TrainingError otherwise."""
        if not self.check_sums:
            return
        after = fingerprint(self.modules)
        changed = [n for n, (ptr, _, total) in self._before.items()
                   if n not in after or after[n][0] != ptr or after[n][2] != total]
        if changed:
            raise TrainingError(f"base weights changed while the run was paused ({len(changed)} "
                                f"tensors, e.g. {changed[:3]})")
        self._before = after

    def accept_moved(self) -> None:
        """After frozen parts went to the CPU and came back (`offload.FrozenOffload`): their
        tensors have new storage, so the pointers and version counters of tensors holding the
        same values (float64 sum) are taken as the new baseline. A tensor whose sum differs keeps
        its old entry, so `verify()` still reports it."""
        if not self.check_sums:
            return
        after = fingerprint(self.modules)
        for name, before in list(self._before.items()):
            now = after.get(name)
            if now is not None and now[2] == before[2]:
                self._before[name] = now

    def verify(self) -> None:
        if not self.check_sums:
            return
        after = fingerprint(self.modules)
        changed = [n for n, v in self._before.items() if after.get(n) != v]
        if changed or set(after) != set(self._before):
            raise TrainingError(
                f"base weights changed during the run ({len(changed)} tensors, e.g. "
                f"{changed[:3]}); this is a bug: please report it")
