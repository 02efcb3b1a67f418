"""The speed levers give the numbers of the plain path.

The levers (docs/PERFORMANCE.md): the LoRA hook's fused up projection + scale + sum
(`LoRAModule.fused_delta`), alpha read once per value (`AdapterModule.cache_alpha`), the fused
AdamW kernel (`optim.FUSED_ADAM`), max-norm scaling reading every norm at once. With all of them
off the code runs exactly the path it ran before they were added; each test compares the two.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from conftest import small_run_config
from lora_train_ext.core import optim as O
from lora_train_ext.core.config import NetworkConfig
from lora_train_ext.core.lora_file import load_lora
from lora_train_ext.core.models.specs import arch_spec, build_unet
from lora_train_ext.core.networks import AdapterModule, LoRAModule, build_network
from lora_train_ext.core.trainer import Trainer, train


@pytest.fixture()
def plain_path(monkeypatch):
    """Switch every lever off (the code path before them)."""
    def switch():
        monkeypatch.setattr(LoRAModule, "fused_delta", False)
        monkeypatch.setattr(AdapterModule, "cache_alpha", False)
        monkeypatch.setattr(O, "FUSED_ADAM", False)
    return switch


RUNS = {
    "lora": {},
    "locon+dropouts+maxnorm": dict(network__algo="locon", network__dropout=0.1,
                                   network__rank_dropout=0.2, network__module_dropout=0.1,
                                   optim__scale_weight_norms=0.05),
    "lora+both+alpha": dict(network__train_on="both", network__alpha=1.0,
                            optim__scheduler="cosine"),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_twenty_steps_give_the_plain_paths_losses(name, sd1_bundle, demo_dataset, tmp_path,
                                                  plain_path):
    """20 steps on the tiny SD1 model with the levers on and off: the same loss curve and the
    same adapter (to float rounding: the fused kernels add in another order)."""
    settings = RUNS[name]
    fast = train(sd1_bundle, small_run_config(tmp_path / "fast", demo_dataset, steps=20,
                                              lr=3e-3, batch_size=2, **settings))
    plain_path()
    plain = train(sd1_bundle, small_run_config(tmp_path / "plain", demo_dataset, steps=20,
                                               lr=3e-3, batch_size=2, **settings))
    assert len(fast.losses) == len(plain.losses) == 20
    assert fast.losses == pytest.approx(plain.losses, rel=1e-4, abs=1e-6)
    a, b = load_lora(fast.path)[0], load_lora(plain.path)[0]
    assert a.keys() == b.keys()
    # absolute tolerance: the tiny model's middle block attends over one token, so its attn1
    # to_q / to_k get gradients that are float noise, and AdamW turns noise into steps of ~lr;
    # those weights stay ~1e-5 either way
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=5e-5,
                                   msg=key)


def _unet_and_inputs(arch: str):
    unet = build_unet(arch, "tiny", seed=0).requires_grad_(False)
    spec = arch_spec(arch, "tiny").unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([3, 500])
    ctx = torch.randn(2, 7, spec.context_dim, generator=g)
    y = torch.randn(2, spec.adm_in_channels, generator=g) if spec.adm_in_channels else None
    return unet, (x, t, ctx, y)


def _outputs_and_grads(unet, net, inputs, fused: bool, amp: bool):
    x, t, ctx, y = inputs
    for a in net:
        a.fused_delta = fused
    torch.manual_seed(7)  # the dropouts draw from the global RNG, in the same order both ways
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = unet(x, t, context=ctx, y=y)
    out.float().square().mean().backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                       for p in net.parameters()])
    net.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo, extra", [("lora", {}), ("locon", {}),
                                         ("lora", dict(dropout=0.1, rank_dropout=0.2,
                                                       module_dropout=0.1))])
def test_fused_hook_equals_plain_hook(arch, algo, extra):
    """Linear, 1x1-conv (SD1's proj_in / proj_out) and 3x3-conv (LoCon) adapters, in train mode
    with every dropout: output and gradients of the fused hook equal the plain one's in fp32,
    and under bf16 autocast they are as far from fp32 as the plain path is and of its dtype."""
    unet, inputs = _unet_and_inputs(arch)
    net = build_network({"unet": unet}, arch, NetworkConfig(algo=algo, rank=4, alpha=2,
                                                            train_on="unet", **extra), seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for a in net:
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g))
    net.train()
    net.attach()
    try:
        ref_out, ref_grad = _outputs_and_grads(unet, net, inputs, fused=False, amp=False)
        out, grad = _outputs_and_grads(unet, net, inputs, fused=True, amp=False)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
        plain_bf16, plain_bf16_grad = _outputs_and_grads(unet, net, inputs, fused=False, amp=True)
        fused_bf16, fused_bf16_grad = _outputs_and_grads(unet, net, inputs, fused=True, amp=True)
        assert fused_bf16.dtype == plain_bf16.dtype
        plain_err = (plain_bf16.float() - ref_out).abs().max()
        fused_err = (fused_bf16.float() - ref_out).abs().max()
        assert fused_err <= 2 * plain_err + 1e-3
        plain_gerr = (plain_bf16_grad - ref_grad).norm() / ref_grad.norm()
        fused_gerr = (fused_bf16_grad - ref_grad).norm() / ref_grad.norm()
        assert fused_gerr <= 2 * plain_gerr + 1e-3
    finally:
        net.detach()


@pytest.mark.parametrize("make_input", ["strided_base", "channels_last", "bf16_adapter"])
def test_unfusable_cases_take_the_plain_path(make_input):
    """A 1x1 base with a stride, a channels-last output and an adapter in another precision than
    the output (outside autocast): the same values as the plain hook."""
    torch.manual_seed(0)
    if make_input == "strided_base":
        base, x = nn.Conv2d(8, 6, 1, stride=2), torch.randn(2, 8, 6, 6)
    elif make_input == "channels_last":
        base = nn.Conv2d(8, 6, 1).to(memory_format=torch.channels_last)
        x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    else:
        base, x = nn.Linear(8, 6), torch.randn(3, 5, 8)
    dtype = torch.bfloat16 if make_input == "bf16_adapter" else torch.float32
    module = LoRAModule("m", base, rank=2, alpha=1, dtype=dtype)
    with torch.no_grad():
        module.lora_up.weight.normal_()
    module.attach()
    try:
        module.fused_delta = True
        fused = base(x)
        module.fused_delta = False
        plain = base(x)
    finally:
        module.detach()
    assert fused.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(fused, plain)


def test_alpha_is_read_again_when_it_changes():
    module = LoRAModule("m", nn.Linear(8, 8), rank=4, alpha=2)
    assert module.scale == 0.5
    with torch.no_grad():
        module.alpha.fill_(4.0)  # in place: the version counter moves
    assert module.scale == 1.0
    module.load_state_dict({**module.state_dict(), "alpha": torch.tensor(8.0)})
    assert module.scale == 2.0
    module.to(torch.float64)  # a new tensor
    with torch.no_grad():
        module.alpha.copy_(torch.tensor(1.0))
    assert module.scale == 0.25
    module.alpha = torch.tensor(12.0)  # a new buffer
    assert module.scale == 3.0
    with torch.inference_mode():  # a tensor without a version counter: read every time
        made = LoRAModule("n", nn.Linear(8, 8), rank=4, alpha=6)
    assert made.scale == 1.5


def test_alpha_from_a_loaded_file_counts(sd1_bundle):
    """Loading a file's tensors (in place) gives the file's alpha to the forward."""
    net = build_network(sd1_bundle.trainable_roots(), "sd1", NetworkConfig(rank=4, alpha=4),
                        seed=0)
    first = next(iter(net))
    assert first.scale == 1.0
    tensors = net.kohya_state_dict()
    tensors[f"{first.name}.alpha"] = torch.tensor(1.0)
    net.load_kohya_state_dict(tensors)
    assert first.scale == 0.25


def test_max_norm_scaling_equals_one_module_at_a_time(sd1_bundle):
    net = build_network(sd1_bundle.trainable_roots(), "sd1",
                        NetworkConfig(algo="locon", rank=4, alpha=2), seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for a in net:
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g)
                                   * float(torch.rand((), generator=g)))
    ref, before = copy.deepcopy(net), copy.deepcopy(net)
    with torch.no_grad():
        max_norm = float(torch.stack([a.delta_weight().norm() for a in net]).median())
    with torch.no_grad():  # the per-module loop it replaces
        for a in ref:
            norm = a.delta_weight().norm()
            if norm > max_norm:
                a.scale_delta_(float(max_norm / norm))
    net.scale_weight_norms_(max_norm)
    for a, b in zip(net, ref):
        assert torch.equal(a.lora_up.weight, b.lora_up.weight)
        assert torch.equal(a.lora_down.weight, b.lora_down.weight)
    scaled = sum(not torch.equal(a.lora_up.weight, c.lora_up.weight) for a, c in zip(net, before))
    assert 0 < scaled < len(net)
    with torch.no_grad():
        assert max(float(a.delta_weight().norm()) for a in net) <= max_norm * (1 + 1e-5)


def _params():
    return [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]


def test_fused_adamw_where_torch_has_it_and_never_over_the_users_choice():
    opt = O.build_optimizer("AdamW", [{"params": _params(), "lr": 1e-3}])
    try:
        expected = torch.optim.AdamW(_params(), lr=1e-3, fused=True) is not None
    except RuntimeError:
        expected = False
    assert O.uses_fused(opt) == [expected]
    for args in ("foreach=False", "fused=False"):
        opt = O.build_optimizer("AdamW", [{"params": _params(), "lr": 1e-3}], args)
        assert O.uses_fused(opt) == [False]
    assert O.uses_fused(O.build_optimizer("SGD", [{"params": _params(), "lr": 1e-3}])) == [False]


def test_fused_adamw_steps_like_the_plain_one(monkeypatch):
    a, b = _params(), None
    b = [nn.Parameter(p.detach().clone()) for p in a]
    fast = O.build_optimizer("AdamW", [{"params": a, "lr": 1e-2}])
    monkeypatch.setattr(O, "FUSED_ADAM", False)
    plain = O.build_optimizer("AdamW", [{"params": b, "lr": 1e-2}])
    for i in range(20):
        g = torch.Generator().manual_seed(i)
        for p, q in zip(a, b):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        fast.step()
        plain.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_state_saved_fused_resumes_where_there_is_no_fused_kernel(
        sd1_bundle, demo_dataset, tmp_path, monkeypatch):
    """Saved by a process with the fused kernel, resumed by one without (an older torch): the
    resumed optimizer steps per tensor, and the run goes on."""
    from lora_train_ext.core.bundle import TrainControl

    cfg = small_run_config(tmp_path / "a", demo_dataset, steps=3, lr=1e-3, batch_size=1)
    control = TrainControl()
    control.add_listener(lambda e: control.request_stop("test")
                         if e.kind == "step" and e.step == 1 else None)
    monkeypatch.setattr(O, "_fused_if_supported",
                        lambda spec, cls, groups, lr, kwargs: cls([dict(g) for g in groups],
                                                                  lr=lr, **kwargs))
    first = train(sd1_bundle, cfg, control)
    assert first.stopped and os.path.isdir(first.state_dir)
    state = torch.load(os.path.join(first.state_dir, "training_state.pth"), weights_only=True)
    # mark the saved groups as fused, as a process with the kernel writes them
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = True
    torch.save(state, os.path.join(first.state_dir, "training_state.pth"))
    monkeypatch.setattr(O, "FUSED_ADAM", False)
    trainer = Trainer(sd1_bundle, small_run_config(tmp_path / "a", demo_dataset, steps=3,
                                                   lr=1e-3, batch_size=1),
                      resume_dir=first.state_dir)
    result = trainer.run()
    assert result.steps == 3 and not result.stopped
    assert O.uses_fused(trainer.optimizer) == [False] * len(trainer.optimizer.param_groups)
