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

Within one forward of the attention (the `scope`: the MHA, for `in_proj_weight` and for
`out_proj.weight` alike) each adapted weight is computed once, on its first read, and the same
tensor is given to every later read (`MultiheadAttention.forward` reads `in_proj_weight` three or
four times: its fast-path checks, then the call): computing it on every read made a weight-sized
tensor per read, four for q/k/v per block, and in a real WebUI the SDXL text encoder's forward
left ~1.9 GB more resident memory than its adapters need.

Plain LoRA adapters (`site_activation`) take a shorter way on a self-attention called as
open_clip calls it (query is key is value, no attention weights asked for): while they are
attached, the MHA gets an instance-level `forward` that runs the same operations as
`F.multi_head_attention_forward` (packed input projection, scaled-dot-product attention, output
projection) on the base weights and adds each adapter's `up(down(x))` to the projections'
outputs, so no weight-sized tensor is made at all (`_site_forward`). Other calls, and other
adapters (LoHa, LoKr, DoRA, full, ...), take the weight form above.

`WeightSite` is the adapter's `base`: a Linear-shaped stand-in for one weight (or a row block of
one), so every adapter class sees `in_features`, `out_features`, `weight` (the base weight, never
the adapted one) as with a real Linear, and `AdapterModule.attach()` calls its `attach_adapter`
instead of registering a forward hook. The delta comes from the adapter's `delta_weight()`, so any
algorithm with a weight delta works unchanged. Dropout on the adapter's hidden activations has no
weight form: `dropout` and `rank_dropout` do not act on these sites; `module_dropout` does (the
whole delta is left out for that forward).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

_STATE = "_lte_weight_deltas"  # owner.__dict__: tensor name -> [(adapter, rows)]
_MEMO = "_lte_memo"  # owner.__dict__ during a forward of its scope: name -> (key, adapted weight)
_SCOPE = "_lte_scope"  # scope.__dict__: {"owners": {id: [owner, count]}, "handles": [...],
#                        "forward": the instance-level `_site_forward` set, or None}
_ORIGINAL_CLASS = "_lte_original_class"
_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


class WeightSite(nn.Linear):
    """One weight, or the row block `rows` of one, seen as a Linear: (out_features, in_features).

    owner: the module that holds the tensor (the MHA for `in_proj_weight`, the `out_proj` Linear
    for `weight`); it is referenced, not a child, so the site owns no parameters. `weight` / `bias`
    read the base tensors (row views, no copy) even while adapters are attached.
    """

    def __init__(self, owner: nn.Module, tensor_name: str, rows: slice | None = None,
                 bias_name: str | None = None, scope: nn.Module | None = None):
        nn.Module.__init__(self)
        if tensor_name not in owner._parameters:
            raise ValueError(f"{type(owner).__name__} has no parameter {tensor_name!r}")
        self.__dict__["owner"] = owner
        self.__dict__["scope"] = scope  # the module whose forward reads the weight (memo)
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
        _enter_scope(self.scope, self.owner)
        return _SiteHandle(self.owner, self.tensor_name, adapter, self.scope)


class _SiteHandle:
    def __init__(self, owner: nn.Module, tensor_name: str, adapter: nn.Module,
                 scope: nn.Module | None = None):
        self.owner, self.tensor_name, self.adapter, self.scope = owner, tensor_name, adapter, scope

    def remove(self) -> None:
        if self.owner is not None:
            _remove(self.owner, self.tensor_name, self.adapter)
            _leave_scope(self.scope, self.owner)
            self.owner = None


def _memo_on(scope: nn.Module, *_args) -> None:
    for owner, _ in scope.__dict__[_SCOPE]["owners"].values():
        owner.__dict__[_MEMO] = {}


def _memo_off(scope: nn.Module, *_args) -> None:
    for owner, _ in scope.__dict__[_SCOPE]["owners"].values():
        owner.__dict__.pop(_MEMO, None)


def _enter_scope(scope: nn.Module | None, owner: nn.Module) -> None:
    """While `scope` runs its forward, `owner`'s adapted weights are computed once."""
    if scope is None:
        return
    state = scope.__dict__.get(_SCOPE)
    if state is None:
        try:  # the memo is dropped even when the forward raises (torch >= 2.1)
            post = scope.register_forward_hook(_memo_off, always_call=True)
        except TypeError:
            post = scope.register_forward_hook(_memo_off)
        state = scope.__dict__[_SCOPE] = {
            "owners": {}, "handles": [scope.register_forward_pre_hook(_memo_on), post],
            "forward": None}
        if isinstance(scope, nn.MultiheadAttention) and "forward" not in scope.__dict__:
            state["forward"] = scope.__dict__["forward"] = types.MethodType(_site_forward, scope)
    entry = state["owners"].setdefault(id(owner), [owner, 0])
    entry[1] += 1


def _leave_scope(scope: nn.Module | None, owner: nn.Module) -> None:
    state = None if scope is None else scope.__dict__.get(_SCOPE)
    if state is None:
        return
    entry = state["owners"].get(id(owner))
    if entry is not None:
        entry[1] -= 1
        if entry[1] <= 0:
            del state["owners"][id(owner)]
            owner.__dict__.pop(_MEMO, None)
    if not state["owners"]:
        for handle in state["handles"]:
            handle.remove()
        if state["forward"] is not None and scope.__dict__.get("forward") is state["forward"]:
            del scope.__dict__["forward"]
        del scope.__dict__[_SCOPE]


def _entries(module: nn.Module, name: str) -> list:
    return module.__dict__.get(_STATE, {}).get(name) or []


def _activation_form(attn: nn.MultiheadAttention, query, key, value, key_padding_mask,
                     need_weights, is_causal) -> bool:
    """Whether `_site_forward` computes this call: a self-attention as open_clip calls it, with
    only plain LoRA adapters, on row blocks of unit step."""
    if not (query is key and key is value) or need_weights or key_padding_mask is not None or \
            is_causal or query.dim() != 3 or attn.bias_k is not None or attn.add_zero_attn or \
            not attn._qkv_same_embed_dim or (attn.training and attn.dropout > 0.0):
        return False
    entries = _entries(attn, "in_proj_weight") + _entries(attn.out_proj, "weight")
    return all(getattr(a, "site_activation", False) and (rows is None or rows.step in (None, 1))
               for a, rows in entries)


def _add_deltas(out: torch.Tensor, x: torch.Tensor, entries) -> torch.Tensor:
    """out + each adapter's `site_delta(x)` on its columns of out's last axis."""
    width = out.shape[-1]
    parts = []
    for adapter, rows in entries:
        delta = adapter.site_delta(x)
        if delta is not None:
            parts.append((range(width)[rows] if rows is not None else range(width), delta))
    return out + _joined(parts, width, -1).to(out.dtype) if parts else out


def _joined(parts: list[tuple[range, torch.Tensor]], width: int, axis: int) -> torch.Tensor:
    """One tensor `width` long on `axis` holding each part's delta on its range (zeros elsewhere;
    parts on the same range add up): a single concatenation where the ranges tile 0..width once
    (q, k, v), else each added into zeros."""
    parts = sorted(parts, key=lambda part: part[0].start)
    spans = [(r.start, r.stop, r.step) for r, _ in parts]
    if all(step == 1 for *_, step in spans) and spans[0][0] == 0 and spans[-1][1] == width \
            and all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
        return torch.cat([d for _, d in parts], dim=axis)
    first = parts[0][1]
    shape = list(first.shape)
    shape[axis] = width
    joined = torch.zeros(shape, dtype=first.dtype, device=first.device)
    for r, d in parts:
        index = torch.arange(r.start, r.stop, r.step, device=d.device)
        joined = joined.index_add(axis % joined.dim(), index, d.to(joined.dtype))
    return joined


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean attention mask (True: not attended) as the additive float mask MHA uses."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _site_forward(attn: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                  need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """`MultiheadAttention.forward` with the attached LoRAs added to the projections' outputs
    (the same operations as `F.multi_head_attention_forward`'s path without weights); any other
    call goes to the class's forward, where the adapters change the weights."""
    if not _activation_form(attn, query, key, value, key_padding_mask, need_weights, is_causal):
        return type(attn).forward(attn, query, key, value, key_padding_mask=key_padding_mask,
                                  need_weights=need_weights, attn_mask=attn_mask,
                                  average_attn_weights=average_attn_weights, is_causal=is_causal)
    x = query.transpose(1, 0) if attn.batch_first else query  # (L, B, E)
    length, batch, width = x.shape
    heads = attn.num_heads
    proj = F.linear(x, attn._parameters["in_proj_weight"], attn._parameters["in_proj_bias"])
    proj = _add_deltas(proj, x, _entries(attn, "in_proj_weight"))
    proj = proj.unflatten(-1, (3, width)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    q, k, v = (t.view(length, batch * heads, width // heads).transpose(0, 1) for t in proj)
    mask = _float_mask(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.dim() == 2 else mask
        mask = mask.unsqueeze(0) if mask.size(0) == 1 else mask.view(batch, heads, -1, length)
    q, k, v = (t.view(batch, heads, length, width // heads) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False)
    o = o.permute(2, 0, 1, 3).contiguous().view(batch * length, width)
    out_proj = attn.out_proj
    out = F.linear(o, out_proj._parameters["weight"], out_proj._parameters["bias"])
    out = _add_deltas(out, o, _entries(out_proj, "weight")).view(length, batch, width)
    return (out.transpose(1, 0) if attn.batch_first else out), None


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
        if not entries:
            return base
        memo = self.__dict__.get(_MEMO)
        if memo is None:
            return adapted_weight(base, entries)
        key = _memo_key(base, entries)
        hit = memo.get(name)
        if hit is None or hit[0] != key:
            hit = memo[name] = (key, adapted_weight(base, entries))
        return hit[1]
    return read


def _memo_key(base: torch.Tensor, entries) -> tuple:
    """What an adapted weight was computed from: reused only while all of it is unchanged."""
    return (torch.is_grad_enabled(), base._version,
            tuple((getattr(a, "multiplier", 1.0), a.training) +
                  tuple(p._version for p in a.parameters()) for a, _ in entries))


def adapted_weight(base: torch.Tensor, entries: list[tuple[nn.Module, slice | None]]) -> torch.Tensor:
    """base + each adapter's `delta_weight()` (fp32, multiplier applied) on its rows, in the
    base's dtype. Adapters with multiplier 0, or left out by module dropout, add nothing. Row
    blocks that tile the weight once (q, k, v) are joined with one concatenation."""
    whole = None
    parts: list[tuple[range, torch.Tensor]] = []
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
            r = range(base.shape[0])[rows]
            parts.append((r, delta.reshape(len(r), *base.shape[1:])))
    blocks = _joined(parts, base.shape[0], 0) if parts else None
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
    sites = {qkv: WeightSite(mha, "in_proj_weight", slice(i * d, (i + 1) * d), "in_proj_bias",
                             scope=mha) for i, qkv in enumerate("qkv")}
    sites["out"] = WeightSite(mha.out_proj, "weight", None, "bias", scope=mha)
    return sites
