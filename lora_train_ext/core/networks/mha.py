"""Adapters on weights a module reads directly: OpenCLIP's `nn.MultiheadAttention`.

MHA's forward passes `in_proj_weight` (q, k, v stacked: (3d, d)) and `out_proj.weight` straight to
`F.multi_head_attention_forward`; neither is a module call a forward hook could see. So the
adapters of q, k, v and out change those weights instead: while attached, reading
`mha.in_proj_weight` (or `out_proj.weight`) gives base + the adapters' deltas (q/k/v on their row
block), computed from the adapter parameters on every read, so gradients reach them.

Mechanism (a parametrization without `torch.nn.utils.parametrize`): the owner's class is swapped
for a subclass with a property of the weight's name; the base `Parameter` stays where it is, in
`owner._parameters`, untouched. `parametrize.register_parametrization` would do the same class swap
but also move the parameter (the state dict's keys change while attached) and `set_()` it onto
itself, which bumps its version counter, so `BaseGuard.verify` could no longer tell it from an
in-place write. Detaching the last adapter of an owner restores its original class: the module is
then exactly what it was (same class, same parameter objects, same bits, same state-dict keys).

`WeightSite` is the adapter's `base`: a Linear-shaped stand-in for one weight (or a row block of
one), so every adapter class sees `in_features`, `out_features`, `weight` (the base weight, never
the adapted one) as with a real Linear, and `AdapterModule.attach()` calls its `attach_adapter`
instead of registering a forward hook. The delta comes from the adapter's `delta_weight()`, so any
algorithm with a weight delta works unchanged. Dropout on the adapter's hidden activations has no
weight form: `dropout` and `rank_dropout` do not act on these sites; `module_dropout` does (the
whole delta is left out for that forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_STATE = "_lte_weight_deltas"  # owner.__dict__: tensor name -> [(adapter, rows)]
_ORIGINAL_CLASS = "_lte_original_class"
_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


class WeightSite(nn.Linear):
    """One weight, or the row block `rows` of one, seen as a Linear: (out_features, in_features).

    owner: the module that holds the tensor (the MHA for `in_proj_weight`, the `out_proj` Linear
    for `weight`); it is referenced, not a child, so the site owns no parameters. `weight` / `bias`
    read the base tensors (row views, no copy) even while adapters are attached.
    """

    def __init__(self, owner: nn.Module, tensor_name: str, rows: slice | None = None,
                 bias_name: str | None = None):
        nn.Module.__init__(self)
        if tensor_name not in owner._parameters:
            raise ValueError(f"{type(owner).__name__} has no parameter {tensor_name!r}")
        self.__dict__["owner"] = owner
        self.tensor_name = tensor_name
        self.bias_name = bias_name
        self.rows = rows
        full = owner._parameters[tensor_name]
        self.in_features = full.shape[1]
        self.out_features = full.shape[0] if rows is None else len(range(full.shape[0])[rows])

    @property
    def weight(self) -> torch.Tensor:
        w = self.owner._parameters[self.tensor_name]
        return w if self.rows is None else w[self.rows]

    @property
    def bias(self) -> torch.Tensor | None:
        if self.bias_name is None or self.owner._parameters.get(self.bias_name) is None:
            return None
        b = self.owner._parameters[self.bias_name]
        return b if self.rows is None else b[self.rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """What this block computes without adapters (for tests and inspection)."""
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        rows = "" if self.rows is None else f"[{self.rows.start}:{self.rows.stop}]"
        return f"{type(self.owner).__name__}.{self.tensor_name}{rows}, " + super().extra_repr()

    def attach_adapter(self, adapter: nn.Module) -> "_SiteHandle":
        """Make reads of the owner's weight include `adapter.delta_weight()` on this site's rows;
        the returned handle's `remove()` undoes it."""
        _add(self.owner, self.tensor_name, adapter, self.rows)
        return _SiteHandle(self.owner, self.tensor_name, adapter)


class _SiteHandle:
    def __init__(self, owner: nn.Module, tensor_name: str, adapter: nn.Module):
        self.owner, self.tensor_name, self.adapter = owner, tensor_name, adapter

    def remove(self) -> None:
        if self.owner is not None:
            _remove(self.owner, self.tensor_name, self.adapter)
            self.owner = None


def is_adapted(module: nn.Module) -> bool:
    """True while some weight of `module` has an adapter attached this way."""
    return _STATE in module.__dict__


def attached_adapters(module: nn.Module) -> dict[str, list[nn.Module]]:
    """tensor name -> adapters attached to it (empty when none)."""
    state = module.__dict__.get(_STATE, {})
    return {name: [a for a, _ in entries] for name, entries in state.items() if entries}


def _add(owner: nn.Module, name: str, adapter: nn.Module, rows: slice | None) -> None:
    state = owner.__dict__.get(_STATE)
    if state is None:
        if hasattr(owner, "parametrizations"):
            raise RuntimeError(f"{type(owner).__name__} is already parametrized by "
                               "torch.nn.utils.parametrize; detach that first")
        state = owner.__dict__[_STATE] = {}
        owner.__dict__[_ORIGINAL_CLASS] = type(owner)
    entries = state.setdefault(name, [])
    if any(a is adapter for a, _ in entries):
        return
    entries.append((adapter, rows))
    _set_class(owner, tuple(sorted(state)))


def _remove(owner: nn.Module, name: str, adapter: nn.Module) -> None:
    state = owner.__dict__.get(_STATE)
    if state is None or name not in state:
        return
    state[name] = [(a, r) for a, r in state[name] if a is not adapter]
    if not any(state.values()):
        owner.__class__ = owner.__dict__.pop(_ORIGINAL_CLASS)
        del owner.__dict__[_STATE]


def _set_class(owner: nn.Module, names: tuple[str, ...]) -> None:
    original = owner.__dict__[_ORIGINAL_CLASS]
    key = (original, names)
    cls = _CLASSES.get(key)
    if cls is None:
        props = {n: property(_reader(n), doc=f"{n} with the attached adapters' deltas")
                 for n in names}
        cls = type(f"Adapted{original.__name__}", (original,), props)
        _CLASSES[key] = cls
    owner.__class__ = cls


def _reader(name: str):
    def read(self: nn.Module) -> torch.Tensor:
        base = self._parameters[name]
        entries = self.__dict__.get(_STATE, {}).get(name)
        return adapted_weight(base, entries) if entries else base
    return read


def adapted_weight(base: torch.Tensor, entries: list[tuple[nn.Module, slice | None]]) -> torch.Tensor:
    """base + each adapter's `delta_weight()` (fp32, multiplier applied) on its rows, in the
    base's dtype. Adapters with multiplier 0, or left out by module dropout, add nothing."""
    whole = None
    blocks = None
    for adapter, rows in entries:
        if getattr(adapter, "multiplier", 1.0) == 0.0:
            continue
        p = getattr(adapter, "module_dropout", 0.0)
        if adapter.training and p and torch.rand((), device="cpu").item() < p:
            continue
        delta = adapter.delta_weight()
        if rows is None:
            whole = delta if whole is None else whole + delta
        else:
            if blocks is None:
                blocks = torch.zeros(base.shape, dtype=delta.dtype, device=delta.device)
            index = torch.arange(base.shape[0], device=delta.device)[rows]
            blocks = blocks.index_add(0, index, delta.reshape(len(index), *base.shape[1:]))
    out = base
    for delta in (whole, blocks):
        if delta is not None:
            out = out + delta.reshape(base.shape).to(device=base.device, dtype=base.dtype)
    return out


def mha_sites(mha: nn.MultiheadAttention) -> dict[str, WeightSite]:
    """'q', 'k', 'v' (row blocks of `in_proj_weight`) and 'out' (`out_proj.weight`) of a
    self-attention with a fused input projection (open_clip's text blocks)."""
    if not getattr(mha, "_qkv_same_embed_dim", True) or mha._parameters.get("in_proj_weight") is None:
        raise ValueError("only MultiheadAttention with a fused in_proj_weight is supported")
    d = mha.embed_dim
    sites = {qkv: WeightSite(mha, "in_proj_weight", slice(i * d, (i + 1) * d), "in_proj_bias")
             for i, qkv in enumerate("qkv")}
    sites["out"] = WeightSite(mha.out_proj, "weight", None, "bias")
    return sites
