"""Freeze the base model for a run and give it back exactly as it was.

`BaseGuard` records every base parameter's `requires_grad` and every module's train/eval mode,
freezes them, and on `restore()` puts them back. `verify()` proves the weights were not changed:
each tensor's storage pointer, version counter (bumped by every in-place write through the
tensor) and the sum of its bytes as 64-bit words must equal what they were before the run.
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


WORD = 1 << 64  # the sums are of the bytes as 64-bit words, modulo 2**64
COPY_CHUNK = 1 << 23  # bytes copied at a time where a tensor's bytes can't be viewed as words


def _word_sums(t: torch.Tensor) -> list[torch.Tensor]:
    """A tensor's bytes, zero-padded to whole 8-byte words and read as int64, summed: one or
    more int64 sums (on the tensor's device; each wraps modulo 2**64) whose total is the tensor's
    `word_sum`. Reading the bytes as integers converts nothing: the sum runs at memory speed
    (a float64 sum converted every element: 2x the time on a quiet CPU, up to 30x on a busy
    one, and most of a run's start-up in a real WebUI on a CPU). A tensor whose bytes can't be
    viewed as words (storage not 8-byte aligned) is copied a chunk at a time, so no copy of a
    whole tensor is ever made."""
    raw = t.detach().reshape(-1).view(torch.uint8)
    whole = raw.numel() // 8 * 8
    parts = []
    if whole:
        try:
            parts.append(raw[:whole].view(torch.int64).sum().reshape(1))
        except RuntimeError:  # the storage offset is not a multiple of 8 bytes
            parts += [c.clone().view(torch.int64).sum().reshape(1)
                      for c in raw[:whole].split(COPY_CHUNK)]
    if whole < raw.numel():
        tail = torch.zeros(8, dtype=torch.uint8, device=raw.device)
        tail[:raw.numel() - whole] = raw[whole:]
        parts.append(tail.view(torch.int64).reshape(1))
    return parts


def word_sum(t: torch.Tensor) -> int:
    """The sum, modulo 2**64, of a tensor's bytes read as 64-bit words: exact (a change to any
    element changes it), the same on every device, thread count and storage offset."""
    return sum(int(v) for v in _word_sums(t)) % WORD


def fingerprint(modules: list[nn.Module]) -> dict[str, tuple]:
    """name -> (data_ptr, version, `word_sum`). One device sync for all sums of GPU tensors;
    a tensor gives the same sum on every device, so tensors moved between devices
    (`BaseGuard.accept_moved`) compare."""
    names, facts, parts = [], [], []
    with torch.no_grad():
        for name, t in _named_tensors(modules):
            names.append(name)
            facts.append((t.data_ptr(), t._version))
            parts.append(_word_sums(t))
    if not names:
        return {}
    flat = [p for ps in parts for p in ps]
    on_cpu = [p for p in flat if p.device.type == "cpu"]
    elsewhere = [p for p in flat if p.device.type != "cpu"]
    read = {id(p): v for p, v in zip(elsewhere, torch.cat(elsewhere).tolist() if elsewhere else [])}
    read.update({id(p): int(p) for p in on_cpu})
    sums = [sum(read[id(p)] for p in ps) % WORD for ps in parts]
    return {n: (*f, s) for n, f, s in zip(names, facts, sums)}


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
        the same values (the same sum); writes that put the same values back (the Lora
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
        same values (the same sum) are taken as the new baseline. A tensor whose sum differs keeps
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
