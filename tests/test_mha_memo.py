"""Adapters on OpenCLIP's MultiheadAttention weights (core/networks/mha.py). The weight form:
each adapted weight is computed once per forward of the attention, with the same values and
gradients as computing it on every read, and nothing of the memo stays after the forward or after
detaching. The activation form (plain LoRA, open_clip's call): the same outputs and gradients as
the weight form, the base path bit-identical to torch's MultiheadAttention, no weight delta made."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt
from torch import nn

from lora_train_ext.core.models.openclip import causal_mask
from lora_train_ext.core.networks import LoRAModule
from lora_train_ext.core.networks import mha as M


@pytest.fixture
def weight_form(monkeypatch):
    monkeypatch.setattr(LoRAModule, "site_activation", False)


def _attention(seed=0, d=16, heads=2, batch_first=False):
    torch.manual_seed(seed)
    attn = nn.MultiheadAttention(d, heads, batch_first=batch_first).requires_grad_(False)
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    adapters = {}
    for which, site in M.mha_sites(attn).items():
        a = LoRAModule(f"lora_te_x_{which}", site, rank=3, alpha=1.5)
        with torch.no_grad():
            a.lora_up.weight.normal_(std=0.2)
        adapters[which] = a
    return attn, adapters


def _count_deltas(monkeypatch) -> list:
    calls = []
    original = LoRAModule.delta_weight

    def counted(self):
        calls.append(id(self))
        return original(self)

    monkeypatch.setattr(LoRAModule, "delta_weight", counted)
    return calls


def test_one_delta_per_adapter_per_forward(monkeypatch, weight_form):
    attn, adapters = _attention()
    for a in adapters.values():
        a.attach()
    x = torch.randn(5, 3, 16)
    calls = _count_deltas(monkeypatch)
    attn(x, x, x, need_weights=False, attn_mask=causal_mask(5))
    assert sorted(calls) == sorted(id(a) for a in adapters.values())  # once each
    assert M._MEMO not in attn.__dict__ and M._MEMO not in attn.out_proj.__dict__
    calls.clear()
    _ = attn.in_proj_weight, attn.in_proj_weight  # outside a forward: no memo, computed each read
    assert len(calls) == 6


def test_values_and_gradients_equal_the_merged_reference(weight_form):
    attn, adapters = _attention()
    for a in adapters.values():
        a.attach()
    x = torch.randn(5, 3, 16)
    mask = causal_mask(5)
    out = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    out.square().sum().backward()
    grads = {w: a.lora_up.weight.grad.clone() for w, a in adapters.items()}

    d = 16
    base_in = attn._parameters["in_proj_weight"]
    for a in adapters.values():
        a.lora_up.weight.grad = None
    merged_in = torch.cat([base_in[i * d:(i + 1) * d] + adapters[w].delta_weight()
                           for i, w in enumerate("qkv")])
    merged_out = attn.out_proj._parameters["weight"] + adapters["out"].delta_weight()
    ref, _ = F.multi_head_attention_forward(
        x, x, x, d, 2, merged_in, attn.in_proj_bias, None, None, False, 0.0, merged_out,
        attn.out_proj.bias, training=False, need_weights=False, attn_mask=mask)
    assert torch.equal(out, ref)
    ref.square().sum().backward()
    for w, a in adapters.items():
        assert torch.allclose(grads[w], a.lora_up.weight.grad, atol=1e-6, rtol=1e-5), w
        assert grads[w].abs().sum() > 0


def test_new_values_after_an_optimizer_step():
    """The memo lives for one forward: the next forward sees the adapters' new weights."""
    attn, adapters = _attention()
    for a in adapters.values():
        a.attach()
    x = torch.randn(5, 3, 16)
    with torch.no_grad():
        first = attn(x, x, x, need_weights=False)[0]
        adapters["v"].lora_up.weight.add_(0.5)
        second = attn(x, x, x, need_weights=False)[0]
    assert not torch.allclose(first, second)


def test_checkpointed_gradients_equal_plain(weight_form):
    attn, adapters = _attention()
    for a in adapters.values():
        a.attach()
    x = torch.randn(5, 3, 16)

    def run(use_ckpt: bool):
        for a in adapters.values():
            a.lora_up.weight.grad = None
        f = lambda t: attn(t, t, t, need_weights=False)[0]  # noqa: E731
        out = ckpt.checkpoint(f, x, use_reentrant=False) if use_ckpt else f(x)
        out.square().sum().backward()
        return [a.lora_up.weight.grad.clone() for a in adapters.values()]

    for plain, checkpointed in zip(run(False), run(True)):
        assert torch.equal(plain, checkpointed)


def test_memo_dropped_when_the_forward_raises(weight_form):
    attn, adapters = _attention()
    for a in adapters.values():
        a.attach()
    x = torch.randn(5, 3, 16)
    with pytest.raises(Exception):
        attn(x, x[:, :, :7], x, need_weights=False)  # key of the wrong width
    if "always_call" in nn.Module.register_forward_hook.__code__.co_varnames:
        assert M._MEMO not in attn.__dict__ and M._MEMO not in attn.out_proj.__dict__


def test_detach_removes_hooks_and_memo():
    attn, adapters = _attention()
    hooks = (dict(attn._forward_pre_hooks), dict(attn._forward_hooks))
    for a in adapters.values():
        a.attach()
    assert attn._forward_pre_hooks and M._SCOPE in attn.__dict__
    adapters["q"].detach()
    assert M._SCOPE in attn.__dict__  # the others stay attached
    for a in adapters.values():
        a.detach()
    assert (dict(attn._forward_pre_hooks), dict(attn._forward_hooks)) == hooks
    assert M._SCOPE not in attn.__dict__ and type(attn) is nn.MultiheadAttention


def test_tiled_rows_equal_the_index_add_path():
    """q, k, v tiling the weight are joined by one concatenation; the values equal adding each
    row block into zeros (the path for row blocks that do not tile)."""
    attn, adapters = _attention()
    base = attn._parameters["in_proj_weight"]
    entries = [(adapters[w], slice(i * 16, (i + 1) * 16)) for i, w in enumerate("kqv")]
    fast = M.adapted_weight(base, entries)
    slow = base.clone()
    for a, rows in entries:
        slow[rows] += a.delta_weight()
    assert torch.equal(fast, slow)
    partial = M.adapted_weight(base, entries[:2])  # q and k only: not tiled
    assert torch.equal(partial[32:], base[32:]) and torch.equal(partial[:32], slow[:32])


def _both_forms(attn, adapters, x, mask, monkeypatch):
    """(output, gradients) of the activation form, then of the weight form."""
    results = []
    for activation in (True, False):
        monkeypatch.setattr(LoRAModule, "site_activation", activation)
        for a in adapters.values():
            a.lora_up.weight.grad = None
            a.lora_down.weight.grad = None
        out = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for a in adapters.values()
                                       for p in (a.lora_up.weight, a.lora_down.weight)]))
    return results


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask_kind", ["float", "bool", "none"])
def test_activation_form_equals_weight_form(monkeypatch, batch_first, mask_kind):
    attn, adapters = _attention(batch_first=batch_first)
    for a in adapters.values():
        a.attach()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    mask = {"float": causal_mask(5), "none": None,
            "bool": torch.ones(5, 5, dtype=torch.bool).triu(1)}[mask_kind]
    calls = _count_deltas(monkeypatch)
    (out_a, grads_a), (out_w, grads_w) = _both_forms(attn, adapters, x, mask, monkeypatch)
    assert len(calls) == 4  # the weight form's four deltas; the activation form made none
    assert torch.allclose(out_a, out_w, atol=1e-5, rtol=1e-5)
    assert (out_a - out_w).abs().max() < 1e-5
    for ga, gw in zip(grads_a, grads_w):
        assert torch.allclose(ga, gw, atol=1e-5, rtol=1e-4)
        assert ga.abs().sum() > 0


def test_activation_form_base_path_is_torchs(monkeypatch):
    """With the adapters' up projections at zero the output is bit-identical to torch's own
    MultiheadAttention: the base path runs the same operations."""
    attn, adapters = _attention()
    x = torch.randn(5, 3, 16)
    mask = causal_mask(5)
    with torch.no_grad():
        plain = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        for a in adapters.values():
            a.lora_up.weight.zero_()
            a.attach()
        assert "forward" in attn.__dict__
        adapted = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert torch.equal(plain, adapted)
    for a in adapters.values():
        a.detach()
    assert "forward" not in attn.__dict__


def test_activation_form_with_some_rows_and_checkpointing(monkeypatch):
    """q and v only (the rows do not tile the weight), under non-reentrant checkpointing."""
    attn, adapters = _attention()
    for w in ("q", "v"):
        adapters[w].attach()
    x = torch.randn(5, 3, 16)
    grads = []
    for activation in (True, False):
        monkeypatch.setattr(LoRAModule, "site_activation", activation)
        for w in ("q", "v"):
            adapters[w].lora_up.weight.grad = None
        f = lambda t: attn(t, t, t, need_weights=False)[0]  # noqa: E731
        ckpt.checkpoint(f, x, use_reentrant=False).square().sum().backward()
        grads.append([adapters[w].lora_up.weight.grad.clone() for w in ("q", "v")])
    for ga, gw in zip(*grads):
        assert torch.allclose(ga, gw, atol=1e-5, rtol=1e-4) and ga.abs().sum() > 0


def test_other_calls_take_the_weight_form(monkeypatch):
    """Attention weights asked for, or a cross-attention: the class's forward with the adapted
    weights (delta_weight is used)."""
    attn, adapters = _attention()
    for a in adapters.values():
        a.attach()
    x = torch.randn(5, 3, 16)
    calls = _count_deltas(monkeypatch)
    out, weights = attn(x, x, x, need_weights=True)
    assert weights is not None and len(calls) == 4
    calls.clear()
    y = torch.randn(4, 3, 16)
    attn(x, y, y, need_weights=False)
    assert len(calls) == 4
