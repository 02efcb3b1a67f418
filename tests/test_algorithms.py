"""Every algorithm (LoRA, LoCon, LoHa, LoKr, IA3, DoRA, full, OFT, BOFT) on the tiny SD1 model and
on single Linear / 1x1 conv / 3x3 conv layers: zero-init identity, hooked == merged, detach
bit-exact, save -> load exact, our delta == the WebUI loader's delta from the saved tensors (tests/
loader_oracle.py), module_delta (merge) == our delta, checkpoint merge == hooked model, a short
training run moves the adapter, inspect reports the algorithm. Cross-checked with the real
`lycoris-lora` package when it is importable (test-only)."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
from torch import nn

from conftest import MODEL_CAPTIONS, model_outputs, state_sha256
from loader_oracle import loader_delta, module_tensors
from lora_train_ext.core.config import NetworkConfig
from lora_train_ext.core.inspect import describe
from lora_train_ext.core.lora_file import LoraInfo, load_lora, save_lora
from lora_train_ext.core.merge import group_modules, merge_lora_into_checkpoint, module_bias_delta, \
    module_delta
from lora_train_ext.core.models.tiny import checkpoint_state_dict, write_checkpoint
from lora_train_ext.core.networks import SUPPORTED_ALGOS, AdapterNetwork, DoRAModule, FullModule, \
    IA3Module, LoHaModule, LoKrModule, LoRAModule, adapter_from_tensors, algo_of_tensors, \
    build_network
from lora_train_ext.core.networks.lokr import factorization, lokr_layout
from lora_train_ext.core.trainer import train
from lora_train_ext.demo import demo_config

RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 2.0, 3, 1.5  # alpha != rank everywhere

# name -> NetworkConfig changes; the first nine are the algorithms, the rest their layouts
# (OFT / BOFT: more of their layouts in tests/test_oft.py)
CASES = {
    "lora": dict(algo="lora"),
    "locon": dict(algo="locon", conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA),
    "loha": dict(algo="loha", conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA),
    "lokr": dict(algo="lokr", rank=2, alpha=0.5, conv_rank=2, conv_alpha=CONV_ALPHA),
    "ia3": dict(algo="ia3"),
    "dora": dict(algo="dora", conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA),
    "full": dict(algo="full", conv_rank=1),
    "oft": dict(algo="oft", oft_block_size=4, conv_rank=1),
    "boft": dict(algo="boft", oft_block_size=4, conv_rank=1),
    "loha_tucker": dict(algo="loha", conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA, use_tucker=True),
    "lokr_decompose_both": dict(algo="lokr", rank=2, alpha=0.5, decompose_both=True,
                                conv_rank=2, conv_alpha=CONV_ALPHA),
    "lokr_full_matrix": dict(algo="lokr", full_matrix=True, conv_rank=2),
    "lokr_factor4_tucker": dict(algo="lokr", rank=2, alpha=0.5, lokr_factor=4, use_tucker=True,
                                conv_rank=2, conv_alpha=CONV_ALPHA),
}
ALGOS = list(SUPPORTED_ALGOS)

# tensor names (after NAME.) each algorithm's modules may carry
TENSOR_NAMES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
             "alpha"},
    "ia3": {"weight", "on_input"},
    "full": {"diff", "diff_b"},
    "oft": {"oft_blocks", "alpha", "rescale"},
    "boft": {"oft_blocks", "alpha", "rescale"},
}
TENSOR_NAMES["locon"] = TENSOR_NAMES["lora"]


@pytest.fixture(scope="module")
def bundle():
    """One tiny SD1 model for the module: every test leaves it bit-identical (and checks that
    where it attaches or trains)."""
    from lora_train_ext.core.models.tiny import build_bundle

    return build_bundle("sd1", "tiny", seed=0)


@pytest.fixture(scope="module")
def base_checkpoint(bundle, tmp_path_factory):
    return write_checkpoint(bundle, str(tmp_path_factory.mktemp("ckpt") / "base.safetensors"))


def net_config(case: str) -> NetworkConfig:
    return dataclasses.replace(NetworkConfig(rank=RANK, alpha=ALPHA), **CASES[case])


def build(bundle, case: str, seed: int = 3) -> AdapterNetwork:
    return build_network(bundle.trainable_roots(), "sd1", net_config(case), seed=seed)


def randomise(network, seed: int = 1) -> None:
    """Give every zero-init tensor values (and DoRA magnitudes a change) so the adapter acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in network:
            for name, p in a.named_parameters():
                if name == "dora_scale":
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
                elif torch.count_nonzero(p) == 0:
                    std = {"weight": 0.3, "diff": 0.03, "diff_b": 0.03}.get(name, 0.2)
                    p.copy_(torch.randn(p.shape, generator=g) * std)


_outputs = model_outputs


def _merged_outputs(bundle, network):
    """Outputs with each adapter's delta written into its base weight (and bias), then restored."""
    saved = []
    with torch.no_grad():
        for a in network:
            saved.append((a.base.weight, a.base.weight.clone()))
            a.base.weight += a.delta_weight().to(a.base.weight.dtype)
            bias = a.delta_bias() if hasattr(a, "delta_bias") else None
            if bias is not None:
                saved.append((a.base.bias, a.base.bias.clone()))
                a.base.bias += bias.to(a.base.bias.dtype)
    try:
        return _outputs(bundle)
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)


# -- identity, hooked == merged, detach ----------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_identity_at_init_hooked_equals_merged_detach_exact(bundle, case):
    before = state_sha256(bundle.unet, *bundle.text_encoders.values())
    cond0, out0 = _outputs(bundle)
    net = build(bundle, case)
    assert net.algo == CASES[case]["algo"] and len(net) > 0
    # a new adapter is the identity: its delta is exactly zero and so is the output change
    for a in net:
        assert torch.count_nonzero(a.delta_weight()) == 0, a.name
    net.attach()
    try:
        cond1, out1 = _outputs(bundle)
    finally:
        net.detach()
    assert torch.equal(cond0, cond1)
    if case == "locon":
        # LoRAModule uses base.py's hook (`output + delta`): a zero delta on a stride-2 conv
        # with a (B, C, 1, 1) channels-last output comes back contiguous and the next conv
        # rounds differently (~5e-7). Our weight-form modules keep the output's strides.
        assert torch.allclose(out0, out1, atol=1e-5, rtol=0)
    else:
        assert torch.equal(out0, out1)

    # trained-like values at strength 0.7: hooked forward == forward with merged weights
    randomise(net)
    net.set_multiplier(0.7)
    net.attach()
    try:
        cond_h, out_h = _outputs(bundle)
    finally:
        net.detach()
    assert (out_h - out0).abs().max() > 1e-3  # the adapter really changes the output
    assert (cond_h - cond0).abs().max() > 1e-3
    cond_m, out_m = _merged_outputs(bundle, net)
    assert torch.allclose(cond_h, cond_m, atol=1e-5, rtol=0), (cond_h - cond_m).abs().max()
    assert torch.allclose(out_h, out_m, atol=1e-5, rtol=0), (out_h - out_m).abs().max()

    # detached: the model is bit-identical and has no hooks left
    assert state_sha256(bundle.unet, *bundle.text_encoders.values()) == before
    _, out2 = _outputs(bundle)
    assert torch.equal(out0, out2)
    assert all(not m._forward_hooks for root in bundle.trainable_roots().values()
               for m in root.modules())


# -- files: names, save -> load, loader oracle, merge's module_delta, inspect ----------------------

def _save(network, path, case):
    cfg = net_config(case)
    info = LoraInfo(arch="sd1", algo=cfg.algo, rank=cfg.rank, alpha=cfg.alpha,
                    conv_rank=cfg.conv_rank, conv_alpha=cfg.conv_alpha, output_name="t")
    save_lora(network.kohya_state_dict(), info, str(path), save_dtype="fp32", sidecar=False)
    return load_lora(str(path))[0]


@pytest.mark.parametrize("case", list(CASES))
def test_file_roundtrip_and_loader_oracle(bundle, case, tmp_path):
    algo = CASES[case]["algo"]
    net = build(bundle, case)
    randomise(net)
    tensors = _save(net, tmp_path / "a.safetensors", case)
    assert tensors.keys() == net.kohya_state_dict().keys()

    fresh = build(bundle, case, seed=99)
    fresh.load_kohya_state_dict(tensors)
    again = fresh.kohya_state_dict()
    assert all(torch.equal(again[k], tensors[k]) and again[k].dtype == tensors[k].dtype
               for k in tensors)

    bases = {a.name: a.base for a in net}
    for name, parts in group_modules(tensors).items():
        assert set(parts) <= TENSOR_NAMES[algo], (name, sorted(parts))
        assert algo_of_tensors(parts) == ("lora" if algo == "locon" else algo)
        adapter = fresh.adapters[name]
        ours = adapter.delta_weight()
        assert torch.equal(ours, net.adapters[name].delta_weight())
        # the WebUI loader's math on the saved tensors (at strength 0.6: DoRA's multiplier
        # scales the decomposed delta, not the update inside the norm)
        adapter.multiplier = 0.6
        expected, ex_bias = loader_delta(parts, bases[name].weight, multiplier=0.6)
        got = adapter.delta_weight().double()
        tol = 1e-5 * max(1.0, float(expected.abs().max()))
        assert torch.allclose(got, expected, atol=tol, rtol=0), \
            (name, float((got - expected).abs().max()))
        bias = adapter.delta_bias() if hasattr(adapter, "delta_bias") else None
        assert (bias is None) == (ex_bias is None), name
        if bias is not None:
            assert torch.allclose(bias.double(), ex_bias, atol=1e-7, rtol=0)
        adapter.multiplier = 1.0
        # the merge's delta from the same tensors
        merged = module_delta(parts, tuple(bases[name].weight.shape), name, bases[name].weight)
        assert torch.allclose(merged, ours, atol=1e-6, rtol=0), name
        if "diff_b" in parts:
            assert torch.equal(module_bias_delta(parts), parts["diff_b"].float())
        # a module built from the file's tensors alone is the same module
        rebuilt = adapter_from_tensors(name, bases[name], parts)
        assert type(rebuilt) is type(adapter)
        assert torch.equal(rebuilt.delta_weight(), ours)
    _check_inspect(str(tmp_path / "a.safetensors"), case, len(net))


def _check_inspect(path: str, case: str, modules: int) -> None:
    report = describe(path)
    cfg = net_config(case)
    assert report["algorithm"] == cfg.algo
    assert report["module_count"] == modules and report["unknown_module_count"] == 0
    if cfg.algo in ("lora", "locon", "loha", "dora"):
        conv = cfg.algo != "lora"
        assert set(report["ranks"]) == {cfg.rank} | ({cfg.conv_rank} if conv else set())
        assert report["conv_ranks"] == ([cfg.conv_rank] if conv else [])
        assert set(report["alphas"]) == {cfg.alpha} | ({cfg.conv_alpha} if conv else set())
    if cfg.algo in ("ia3", "full"):
        assert report["ranks"] == [] and report["alphas"] == []
    if cfg.algo in ("oft", "boft"):
        assert report["ranks"] == [] and report["alphas"] == [cfg.oft_constraint]
        assert report["block_sizes"] == [cfg.oft_block_size]
    if case.endswith("tucker"):
        assert "tucker" in report["options"]
    if case == "lokr_decompose_both":
        assert "decompose_both" in report["options"]
    if case == "lokr_full_matrix":
        assert "full_matrix" in report["options"] and report["ranks"] == []
    if case == "full":
        assert "diff_b" in report["options"]
    assert report["loaders"]["webui"] == "yes"


def test_tensor_layouts_and_counts(bundle):
    """What each algorithm saves on the tiny SD1 model (which modules, which tensors)."""
    nets = {case: build(bundle, case) for case in CASES}
    lora_names = set(nets["lora"].names())
    assert len(lora_names) == 264  # 192 UNet + 72 TE
    for case in ("loha", "lokr", "dora", "full", "locon", "oft", "boft"):
        assert lora_names < set(nets[case].names())  # plus the conv layers (conv_rank > 0)
        assert set(nets[case].names()) == set(nets["locon"].names())
    ia3 = nets["ia3"]
    assert all(isinstance(a, IA3Module) for a in ia3)
    assert all(n.endswith(("_to_k", "_to_v", "_ff_net_2", "_self_attn_k_proj",
                           "_self_attn_v_proj", "_mlp_fc2")) for n in ia3.names())
    ends = {n for n in ia3.names() if n.endswith(("_ff_net_2", "_mlp_fc2"))}
    assert ends and all(bool(ia3.adapters[n].on_input) for n in ends)
    assert not any(bool(ia3.adapters[n].on_input) for n in set(ia3.names()) - ends)
    # 16 transformer blocks x (attn1, attn2 to_k / to_v + ff.net.2) + 12 text layers x 3
    assert len(ia3) == 16 * 5 + 12 * 3

    loha = nets["loha_tucker"]
    assert any(hasattr(a, "hada_t1") for a in loha) and all(
        hasattr(a, "hada_t1") == (a.kind == "conv3x3") for a in loha)
    both = nets["lokr_decompose_both"]
    assert any(hasattr(a, "lokr_w1_a") for a in both)
    assert all(hasattr(a, "lokr_w2") and not hasattr(a, "lokr_w2_a")
               for a in nets["lokr_full_matrix"])
    assert all(float(a.alpha) == a.rank and a.scale == 1.0 for a in nets["lokr_full_matrix"])
    assert any(hasattr(a, "lokr_t2") for a in nets["lokr_factor4_tucker"])
    full = nets["full"]
    assert sum(a.diff_b is not None for a in full) == sum(
        a.base.bias is not None for a in full) > 0


def test_identity_is_exact_for_dora_magnitude(bundle):
    net = build(bundle, "dora")
    for a in net:
        w = a.base.weight.float()
        norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        assert torch.equal(a.dora_scale.reshape(-1), norm)
        assert tuple(a.dora_scale.shape) == (1, w.shape[1], *([1] * (w.dim() - 2)))


# -- single layers: Linear, 1x1 conv, 3x3 conv (stride 2), against the loader oracle -------------

LAYERS = {
    "linear": lambda: nn.Linear(24, 40),
    "conv1x1": lambda: nn.Conv2d(24, 40, 1),
    "conv3x3": lambda: nn.Conv2d(24, 40, 3, stride=2, padding=1),
}
MODULES = {
    "lora": lambda b: LoRAModule("m", b, 3, 1.5),
    "dora": lambda b: DoRAModule("m", b, 3, 1.5),
    "loha": lambda b: LoHaModule("m", b, 3, 1.5),
    "loha_tucker": lambda b: LoHaModule("m", b, 3, 1.5, use_tucker=True),
    "lokr": lambda b: LoKrModule("m", b, 2, 0.5),
    "lokr_both": lambda b: LoKrModule("m", b, 2, 0.5, decompose_both=True),
    "lokr_full": lambda b: LoKrModule("m", b, 2, 0.5, full_matrix=True),
    "lokr_f4_tucker": lambda b: LoKrModule("m", b, 1, 0.5, factor=4, use_tucker=True),
    "ia3_out": lambda b: IA3Module("m", b, on_input=False),
    "ia3_in": lambda b: IA3Module("m", b, on_input=True),
    "full": lambda b: FullModule("m", b),
}


def _layer(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LAYERS[kind]().requires_grad_(False)


def _layer_input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn((3, 24) if kind == "linear" else (2, 24, 9, 9), generator=g)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("module", list(MODULES))
def test_single_layer_against_loader(module, kind):
    base = _layer(kind)
    if module.startswith("ia3") and kind != "linear":
        with pytest.raises(TypeError):
            MODULES[module](base)  # the WebUI's IA3 cannot broadcast over a conv weight
        return
    a = MODULES[module](base)
    a.reset_parameters(torch.Generator().manual_seed(0))
    x = _layer_input(kind)
    with torch.no_grad():
        y0 = base(x)
        a.attach()
        y_init = base(x)
        a.detach()
    assert torch.equal(y0, y_init)
    randomise([a])
    a.multiplier = 0.8
    parts = {k: v.clone() for k, v in a.state_dict().items()}
    expected, ex_bias = loader_delta(parts, base.weight, multiplier=0.8)
    got = a.delta_weight()
    assert got.shape == base.weight.shape
    assert torch.allclose(got.double(), expected, atol=1e-6 * max(1.0, float(expected.abs().max())),
                          rtol=0), float((got.double() - expected).abs().max())
    if isinstance(a, FullModule):
        assert torch.allclose(a.delta_bias().double(), ex_bias, atol=1e-7, rtol=0)
    # hooked == the layer with the loader's weights
    with torch.no_grad():
        a.attach()
        y_hooked = base(x)
        a.detach()
        merged = copy.deepcopy(base)
        merged.weight += expected.float()
        if ex_bias is not None:
            merged.bias += ex_bias.float()
        y_merged = merged(x)
    assert (y_hooked - y0).abs().max() > 1e-3
    assert torch.allclose(y_hooked, y_merged, atol=1e-5, rtol=0)
    assert torch.equal(base(x), y0)  # detached: the layer is as it was


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradients_reach_every_factor(kind):
    for module, make in MODULES.items():
        base = _layer(kind)
        if module.startswith("ia3") and kind != "linear":
            continue
        a = make(base)
        randomise([a])
        a.train()
        a.attach()
        try:
            base(_layer_input(kind)).square().sum().backward()
        finally:
            a.detach()
        for name, p in a.named_parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, (module, name)
        assert base.weight.grad is None


# -- LoKr factorization --------------------------------------------------------------------------

@pytest.mark.parametrize("dim,factor,expected", [
    (127, -1, (1, 127)), (128, -1, (8, 16)), (128, 2, (2, 64)), (128, 4, (4, 32)),
    (250, -1, (10, 25)), (250, 8, (5, 50)), (360, -1, (18, 20)), (360, 8, (8, 45)),
    (360, 16, (15, 24)), (1024, -1, (32, 32)), (1024, 16, (16, 64)), (64, 16, (4, 16)),
    (96, 16, (6, 16)), (320, -1, (16, 20)), (640, -1, (20, 32)), (1280, -1, (32, 40)),
    (768, -1, (24, 32)), (4, 8, (2, 2)), (7, 1, (1, 7)),
])
def test_factorization(dim, factor, expected):
    assert factorization(dim, factor) == expected


def test_lokr_layout_rules():
    lay = lokr_layout((320, 320), rank=8)  # (16, 20) x (16, 20): 8 < 10 -> low-rank w2
    assert (lay.out_l, lay.out_k, lay.in_m, lay.in_n) == (16, 20, 16, 20)
    assert lay.w2_lowrank and not lay.w1_lowrank
    assert not lokr_layout((320, 320), rank=10).w2_lowrank  # rank >= half the side: full w2
    assert lokr_layout((320, 320), rank=4, decompose_both=True).w1_lowrank
    assert not lokr_layout((320, 320), rank=8, decompose_both=True).w1_lowrank
    full = lokr_layout((320, 320, 3, 3), rank=4, full_matrix=True, use_tucker=True)
    assert not (full.w1_lowrank or full.w2_lowrank or full.tucker)
    assert lokr_layout((320, 320, 3, 3), rank=4, use_tucker=True).tucker
    assert not lokr_layout((320, 320, 1, 1), rank=4, use_tucker=True).tucker


# -- training, merge into a checkpoint, inspect ---------------------------------------------------

ZERO_INIT = {"lora": ("lora_up.weight",), "locon": ("lora_up.weight",), "dora": ("lora_up.weight",),
             "loha": ("hada_w2_a",), "lokr": ("lokr_w2", "lokr_w2_b"), "ia3": ("weight",),
             "full": ("diff",), "oft": ("oft_blocks",), "boft": ("oft_blocks",)}


@pytest.mark.parametrize("algo", ALGOS)
def test_training_moves_adapter_and_keeps_base(bundle, tmp_path, algo):
    modules = bundle.base_modules()
    before = state_sha256(*modules)
    cfg = demo_config(str(tmp_path), steps=3, seed=0, rank=RANK, alpha=ALPHA, lr=1e-3,
                      batch_size=1, grad_accum=1)
    # the middle block (attention, res-block convs, 1x1 skip-free) and the text encoder: every
    # module kind, at a fraction of the full network's cost
    cfg.network = dataclasses.replace(net_config(algo), block_filter="MID")
    result = train(bundle, cfg)
    assert state_sha256(*modules) == before
    assert all(not m._forward_hooks for root in modules for m in root.modules())
    tensors, meta = load_lora(result.path)
    modules_in_file = group_modules(tensors)
    moved = [any(torch.count_nonzero(parts[k]) > 0 for k in ZERO_INIT[algo] if k in parts)
             for parts in modules_in_file.values()]
    assert all(moved), f"{moved.count(False)} of {len(moved)} modules did not move"
    if algo == "dora":
        fresh = build_network(bundle.trainable_roots(), "sd1", cfg.network, seed=0)
        assert any(not torch.equal(tensors[f"{a.name}.dora_scale"], a.dora_scale.detach())
                   for a in fresh)
    # the file loads exactly into a freshly built network
    fresh = build_network(bundle.trainable_roots(), "sd1", cfg.network, seed=7)
    fresh.load_kohya_state_dict(tensors)
    assert all(torch.equal(v, tensors[k]) for k, v in fresh.kohya_state_dict().items())
    report = describe(result.path)
    assert report["algorithm"] == algo
    assert report["module_count"] == len(modules_in_file)
    assert report["unknown_module_count"] == 0


def _merged_model_outputs(model, merged_path):
    """The model's outputs with the merged checkpoint's weights loaded, then its own restored;
    and how many checkpoint tensors the merge changed."""
    from safetensors.torch import load_file

    from lora_train_ext.core.models.tiny import load_checkpoint_state_dict

    merged = load_file(merged_path)
    base = {k: v.clone() for k, v in checkpoint_state_dict(model).items()}  # views otherwise
    changed = sum(not torch.equal(merged[k], v) for k, v in base.items())
    load_checkpoint_state_dict(model, merged)
    try:
        return _outputs(model), changed
    finally:
        load_checkpoint_state_dict(model, base)


@pytest.mark.parametrize("algo", ALGOS)
def test_checkpoint_merge_equals_hooked_model(bundle, base_checkpoint, tmp_path, algo):
    # UNet middle block (attention, 3x3 / 1x1 convs, linears) + text encoder; the name map of
    # every other module is the same for all algorithms (tests/test_core_lora.py covers it)
    cfg = dataclasses.replace(net_config(algo), block_filter="MID")
    net = build_network(bundle.trainable_roots(), "sd1", cfg, seed=3)
    randomise(net)
    path = tmp_path / f"{algo}.safetensors"
    _save(net, path, algo)
    out_path = str(tmp_path / "merged.safetensors")
    report = merge_lora_into_checkpoint(base_checkpoint, [(str(path), 1.0)], out_path, arch="sd1")
    assert report.changed_modules == len(net)
    net.attach()
    try:
        hooked = _outputs(bundle)
    finally:
        net.detach()
    before = state_sha256(*bundle.base_modules())
    (cond_m, out_m), changed = _merged_model_outputs(bundle, out_path)
    assert changed == report.changed_tensors
    assert state_sha256(*bundle.base_modules()) == before
    assert torch.allclose(cond_m, hooked[0], atol=1e-4, rtol=0), (cond_m - hooked[0]).abs().max()
    assert torch.allclose(out_m, hooked[1], atol=1e-4, rtol=0), (out_m - hooked[1]).abs().max()


@pytest.fixture(scope="module")
def arch_bundles(tmp_path_factory):
    """arch -> (tiny bundle, its checkpoint file), built on first use."""
    from lora_train_ext.core.models.tiny import build_bundle

    cache = {}

    def get(arch):
        if arch not in cache:
            model = build_bundle(arch, "tiny", seed=0)
            path = tmp_path_factory.mktemp(arch) / "base.safetensors"
            cache[arch] = (model, write_checkpoint(model, str(path)))
        return cache[arch]
    return get


def _cond(model) -> torch.Tensor:
    with torch.no_grad():
        cond = model.condition(MODEL_CAPTIONS)
    return torch.cat([v.flatten() for v in cond.values()]) if isinstance(cond, dict) \
        else cond.flatten()


# SD2: every algorithm; SDXL (same OpenCLIP mechanics in te2, a 32 MB tiny checkpoint to merge):
# the algorithms whose delta depends on the base weight or touches the bias
@pytest.mark.parametrize("arch,algo", [("sd2", algo) for algo in ALGOS]
                         + [("sdxl", algo) for algo in ("ia3", "dora", "full")])
def test_sd2_sdxl_text_encoders_loader_oracle_and_merge(arch_bundles, tmp_path, arch, algo):
    """OpenCLIP q / k / v / out are weight sites (rows of in_proj_weight): the loader reads each
    against its row block, with the MultiheadAttention's out_proj shape for DoRA's axes; the
    merge writes the rows (and the MLP biases for full). Text encoders only: the UNet modules
    are the same kinds as SD1's."""
    from safetensors.torch import load_file

    from lora_train_ext.core.models.tiny import load_checkpoint_state_dict
    from lora_train_ext.core.networks.mha import WeightSite

    model, base_path = arch_bundles(arch)
    before = state_sha256(*model.base_modules())
    cfg = dataclasses.replace(net_config(algo), train_on="te")
    net = build_network(model.trainable_roots(), arch, cfg, seed=3)
    randomise(net)
    assert any(isinstance(a.base, WeightSite) for a in net)
    for a in net:
        shape = None
        if isinstance(a.base, WeightSite) and a.base.tensor_name == "in_proj_weight":
            shape = tuple(a.base.owner.out_proj.weight.shape)
        parts = {k: v.detach() for k, v in a.state_dict().items()}
        expected, ex_bias = loader_delta(parts, a.base.weight, 1.0, module_weight_shape=shape)
        got = a.delta_weight().detach().double()
        assert torch.allclose(got, expected, atol=1e-5 * max(1.0, float(expected.abs().max())),
                              rtol=0), a.name
        bias = a.delta_bias() if hasattr(a, "delta_bias") else None
        assert (ex_bias is None) == (bias is None), a.name

    path = tmp_path / "f.safetensors"
    info = LoraInfo(arch=arch, algo=cfg.algo, rank=cfg.rank, alpha=cfg.alpha, output_name="f")
    save_lora(net.kohya_state_dict(), info, str(path), save_dtype="fp32", sidecar=False)
    merged_path = str(tmp_path / "merged.safetensors")
    report = merge_lora_into_checkpoint(base_path, [(str(path), 1.0)], merged_path, arch=arch)
    assert report.changed_modules == len(net)
    cond0 = _cond(model)
    net.attach()
    try:
        cond_h = _cond(model)
    finally:
        net.detach()
    assert (cond_h - cond0).abs().max() > 1e-3
    base = {k: v.clone() for k, v in checkpoint_state_dict(model).items()}
    load_checkpoint_state_dict(model, load_file(merged_path))
    try:
        cond_m = _cond(model)
    finally:
        load_checkpoint_state_dict(model, base)
    assert state_sha256(*model.base_modules()) == before
    assert (cond_h - cond_m).abs().max() < 1e-4


def test_module_delta_needs_base_for_ia3_and_dora(bundle):
    for algo in ("ia3", "dora"):
        net = build(bundle, algo)
        a = next(iter(net))
        parts = module_tensors(net.kohya_state_dict(), a.name)
        with pytest.raises(ValueError, match="base weight"):
            module_delta(parts, tuple(a.base.weight.shape), a.name)


# -- the real lycoris-lora package as a second oracle (test-only, skipped when missing) ----------

def _lycoris():
    os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")
    return pytest.importorskip("lycoris.modules")


def test_factorization_matches_lycoris():
    lycoris = _lycoris()
    for dim in list(range(1, 200)) + [320, 360, 640, 768, 1024, 1280, 2048, 2560, 5120]:
        for factor in (-1, 1, 2, 3, 4, 8, 16, 32):
            assert factorization(dim, factor) == lycoris.factorization(dim, factor), (dim, factor)


LYCORIS_CASES = {  # our module, the lycoris class name and its options
    "loha": (lambda b: LoHaModule("m", b, 3, 1.5), "LohaModule", dict(lora_dim=3, alpha=1.5)),
    "loha_tucker": (lambda b: LoHaModule("m", b, 3, 1.5, use_tucker=True), "LohaModule",
                    dict(lora_dim=3, alpha=1.5, use_tucker=True)),
    "lokr": (lambda b: LoKrModule("m", b, 2, 0.5), "LokrModule", dict(lora_dim=2, alpha=0.5)),
    "lokr_both": (lambda b: LoKrModule("m", b, 2, 0.5, decompose_both=True), "LokrModule",
                  dict(lora_dim=2, alpha=0.5, decompose_both=True)),
    "lokr_full": (lambda b: LoKrModule("m", b, 2, 0.5, full_matrix=True), "LokrModule",
                  dict(lora_dim=2, alpha=0.5, full_matrix=True)),
    "lokr_f4_tucker": (lambda b: LoKrModule("m", b, 1, 0.5, factor=4, use_tucker=True),
                       "LokrModule", dict(lora_dim=1, alpha=0.5, factor=4, use_tucker=True)),
    "ia3_in": (lambda b: IA3Module("m", b, on_input=True), "IA3Module", dict(train_on_input=True)),
    "ia3_out": (lambda b: IA3Module("m", b), "IA3Module", dict(train_on_input=False)),
    "dora": (lambda b: DoRAModule("m", b, 3, 1.5), "LoConModule",
             dict(lora_dim=3, alpha=1.5, weight_decompose=True, wd_on_out=False)),
    "full": (lambda b: FullModule("m", b), "FullModule", {}),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_matches_lycoris_modules(case, kind):
    """Same tensors, same output as LyCORIS's own module (its forward, not its merge_to, whose
    LoHa path scales twice when alpha != rank). Multiplier 1: LyCORIS and the WebUI disagree on
    how a DoRA multiplier applies; we follow the WebUI (test_single_layer_against_loader)."""
    lycoris = _lycoris()
    ours_factory, cls_name, options = LYCORIS_CASES[case]
    if case.startswith("ia3") and kind != "linear":
        return
    base = _layer(kind)
    ours = ours_factory(base)
    ours.reset_parameters(torch.Generator().manual_seed(2))
    randomise([ours], seed=4)
    tensors = {k: v.clone() for k, v in ours.state_dict().items()}
    twin = copy.deepcopy(base)
    theirs = getattr(lycoris, cls_name)("m", twin, 1.0, **options)
    assert set(theirs.state_dict()) == set(tensors), (sorted(theirs.state_dict()), sorted(tensors))
    assert all(tuple(theirs.state_dict()[k].shape) == tuple(v.shape) for k, v in tensors.items())
    theirs.load_state_dict(tensors)
    if case == "full":  # its forward calls the base after deleting the base's weight (4.0.0)
        diff, diff_b = theirs.get_diff_weight(1.0)
        assert torch.equal(diff, ours.delta_weight()) and torch.equal(diff_b, ours.delta_bias())
        return
    theirs.apply_to()
    x = _layer_input(kind)
    with torch.no_grad():
        y_theirs = twin(x)
        ours.attach()
        y_ours = base(x)
        ours.detach()
    assert (y_ours - base(x)).abs().max() > 1e-3
    assert torch.allclose(y_ours, y_theirs, atol=2e-5, rtol=0), (y_ours - y_theirs).abs().max()


@pytest.mark.parametrize("module", [m for m in MODULES if m != "dora"])
def test_scale_delta_scales_the_delta_exactly(module):
    """For max-norm regularisation: scale_delta_(f) multiplies the delta by f (all but DoRA,
    whose decomposed delta is not linear; there it scales the low-rank update)."""
    a = MODULES[module](_layer("conv3x3" if not module.startswith("ia3") else "linear"))
    randomise([a])
    before = a.delta_weight()
    a.scale_delta_(0.3)
    assert torch.allclose(a.delta_weight(), before * 0.3, atol=1e-7, rtol=1e-5)
