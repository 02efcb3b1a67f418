"""Moving frozen parts of the base model between the device and the CPU, and back exactly.

`Placement` records where every parameter and buffer of some modules lives and puts each one
back there later (tensor by tensor, so a model whose parts sat on different devices - the WebUI's
--lowvram - comes back as it was). The Parameter objects stay the same objects: only their data
moves (`param.data = param.data.to(device)`), so whatever holds them (the host's model, hooks,
optimizers of others) keeps working. A move is a copy, never a cast: the values are bit-identical
after a round trip.

`FrozenOffload` is the run's use of it (`train.offload_frozen`): once the latents are cached the
VAE is not needed on the device, and while the text encoders are not trained their outputs are
cached, so they go to the CPU too. A caption not yet in the cache brings the text encoders back
for that one encode (`using`), as do the host's samples and a pause (`home`); the run's end puts
every part back where it was (`restore`). On a device that is the CPU every move is a no-op.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

CPU = torch.device("cpu")


def _tensors(module: nn.Module) -> Iterator[tuple[nn.Module, str, str, torch.Tensor]]:
    """(owner, 'param' | 'buffer', name, tensor) of every tensor once, shared ones once."""
    seen: set[int] = set()
    for sub in module.modules():
        for kind, table in (("param", sub._parameters), ("buffer", sub._buffers)):
            for name, t in table.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                yield sub, kind, name, t


def move_tensors(module: nn.Module, device: torch.device | str) -> int:
    """Every parameter and buffer of `module` onto `device`, in place of the old data; returns
    how many had to move."""
    device = torch.device(device)
    moved = 0
    with torch.no_grad():
        for owner, kind, name, t in _tensors(module):
            if t.device == device:
                continue
            if kind == "param":
                t.data = t.data.to(device)
            else:
                owner._buffers[name] = t.to(device)
            moved += 1
    return moved


class Placement:
    """Where each tensor of some modules is now; `restore()` puts every one back there."""

    def __init__(self, modules: list[nn.Module]):
        self.places: list[tuple[nn.Module, str, str, torch.device]] = []
        seen: set[int] = set()
        for m in modules:
            if m is None:
                continue
            for owner, kind, name, t in _tensors(m):
                if id(t) not in seen:
                    seen.add(id(t))
                    self.places.append((owner, kind, name, t.device))

    def restore(self) -> int:
        moved = 0
        with torch.no_grad():
            for owner, kind, name, device in self.places:
                table = owner._parameters if kind == "param" else owner._buffers
                t = table.get(name)
                if t is None or t.device == device:
                    continue
                if kind == "param":
                    t.data = t.data.to(device)
                else:
                    table[name] = t.to(device)
                moved += 1
        return moved


class FrozenOffload:
    """Frozen parts (name -> module) kept on `away` (the CPU) between their uses.

    `moves` records every move as (part, device) in order: the trainer's tests read it (on a CPU
    machine the tensors themselves cannot show a move).
    """

    def __init__(self, parts: dict[str, nn.Module], home: torch.device,
                 away: torch.device = CPU):
        self.parts = {k: v for k, v in parts.items() if v is not None}
        self.home_device = torch.device(home)
        self.away_device = torch.device(away)
        self.placement = Placement(list(self.parts.values()))
        self.away: set[str] = set()
        self.moves: list[tuple[str, str]] = []

    def send_away(self, *names: str) -> None:
        for name in names or tuple(self.parts):
            if name in self.parts and name not in self.away:
                move_tensors(self.parts[name], self.away_device)
                self.away.add(name)
                self.moves.append((name, str(self.away_device)))
        self._empty_cache()

    def bring_home(self, *names: str) -> list[str]:
        """Back onto the device; returns the names that were away."""
        back = [n for n in (names or tuple(self.parts)) if n in self.away]
        for name in back:
            move_tensors(self.parts[name], self.home_device)
            self.away.discard(name)
            self.moves.append((name, str(self.home_device)))
        return back

    @contextlib.contextmanager
    def using(self, *names: str) -> Iterator[None]:
        """The named parts on the device for a while (a caption not yet cached), then away."""
        back = self.bring_home(*names)
        try:
            yield
        finally:
            if back:
                self.send_away(*back)

    def restore(self) -> None:
        """Every tensor where it was when the run began."""
        self.away.clear()
        self.placement.restore()
        self.moves += [(name, "restored") for name in self.parts]

    def _empty_cache(self) -> None:
        if self.home_device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()


def offload_plan(*, enabled: bool, te_trained: bool, cache_text: bool, latents_cached: bool,
                 te_names: list[str]) -> tuple[list[str], list[str]]:
    """(parts to keep on the CPU, messages about what stays on the device and why)."""
    if not enabled:
        return [], []
    parts, notes = [], []
    if latents_cached:
        parts.append("vae")
    else:
        notes.append("train.offload_frozen: the VAE stays on the device: the latents are not "
                     "cached (data.cache_latents off, or colour augmentation / a dataset that "
                     "encodes every step)")
    if te_trained:
        notes.append("train.offload_frozen: the text encoder is trained, so its outputs cannot "
                     "be cached; it stays on the device (set network.train_on to unet to "
                     "offload it)")
    elif not cache_text:
        notes.append("train.offload_frozen: the text encoder stays on the device: "
                     "data.cache_text is off")
    else:
        parts += te_names
    return parts, notes
