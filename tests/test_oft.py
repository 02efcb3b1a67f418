"""OFT (LyCORIS diag-OFT) and BOFT (butterfly OFT): layouts, the exact identity at init, the delta
against the WebUI 1.10.1 loader's math (tests/loader_oracle.py `_oft`) and against the real
`lycoris-lora` modules (test-only), the rotation's properties, the constraint and rescale, files
(keys, metadata, round trip, inspect's loader verdicts), training on the tiny SD1 model and merging
into a checkpoint. The plain `oft` / `boft` cases also run through every generic check of
tests/test_algorithms.py; here are their other layouts (constraint, rescale, BOFT's stages)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import model_outputs, state_sha256
from loader_oracle import loader_delta
from lora_train_ext.core.config import NetworkConfig, RunConfig
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.inspect import describe
from lora_train_ext.core.lora_file import LoraInfo, load_lora, save_lora
from lora_train_ext.core.lowrank import full_delta
from lora_train_ext.core.merge import group_modules, merge_lora_into_checkpoint, module_delta
from lora_train_ext.core.models.tiny import checkpoint_state_dict, write_checkpoint
from lora_train_ext.core.networks import (BOFTModule, OFTModule, adapter_from_tensors,
                                          algo_of_tensors, build_network)
from lora_train_ext.core.networks.from_file import network_from_tensors
from lora_train_ext.core.networks.oft import boft_layout, oft_layout, rotation_minus_identity
from lora_train_ext.core.trainer import train
from lora_train_ext.demo import demo_config

# -- layouts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("out,size,expected", [
    (320, 16, (16, 20)), (320, 32, (10, 32)), (640, 32, (20, 32)), (1280, 32, (32, 40)),
    (768, 16, (16, 48)), (64, 8, (8, 8)), (16, 16, (1, 16)), (127, 8, (1, 127)),
])
def test_oft_layout(out, size, expected):
    """LyCORIS's rule: (block size, blocks) = factorization(out, size), the smaller first."""
    assert oft_layout(out, size) == expected


@pytest.mark.parametrize("out,size,expected", [
    (320, 16, (10, 32, 6)), (640, 16, (10, 64, 7)), (768, 16, (12, 64, 7)),
    (1024, 16, (16, 64, 7)), (64, 8, (8, 8, 4)), (64, 64, (64, 1, 1)), (320, 8, None),
    (40, 8, None), (2, 2, (2, 1, 1)),
])
def test_boft_layout(out, size, expected):
    """(block size, blocks, stages): the largest even size <= `size` dividing out into a power of
    two of blocks; stages = log2(blocks) + 1."""
    assert boft_layout(out, size) == expected


def _lycoris():
    os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")
    return pytest.importorskip("lycoris.modules")


def test_layouts_match_lycoris():
    _lycoris()
    from lycoris.functional import factorization, power2factorization

    for out in list(range(2, 260)) + [320, 640, 768, 1024, 1280, 2560, 3072, 5120, 10240]:
        for size in (2, 3, 4, 6, 8, 10, 12, 16, 32, 64):
            b, n = factorization(out, size)
            assert oft_layout(out, size) == (b, n), (out, size)
            b2, n2 = power2factorization(out, size)
            ours = boft_layout(out, size)
            if n2 == 0:
                assert ours is None, (out, size)
            else:
                stages = sum(int(c) for c in f"{n2 - 1:b}") + 1  # ButterflyOFTModule's boft_m
                assert ours == (b2, n2, stages), (out, size)


# -- single layers ------------------------------------------------------------------------------

LAYERS = {
    "linear": lambda: nn.Linear(24, 64),
    "conv1x1": lambda: nn.Conv2d(24, 64, 1),
    "conv3x3": lambda: nn.Conv2d(24, 64, 3, stride=2, padding=1),
}
MODULES = {  # 64 output channels
    "oft": lambda b: OFTModule("m", b, 8),  # 8 blocks of 8
    "oft_4": lambda b: OFTModule("m", b, 4),  # 16 blocks of 4
    "oft_constraint": lambda b: OFTModule("m", b, 8, constraint=2e-3),  # |Q| <= 0.128
    "oft_rescaled": lambda b: OFTModule("m", b, 8, rescaled=True),
    "boft": lambda b: BOFTModule("m", b, 8),  # 4 stages of 8 blocks of 8
    "boft_2": lambda b: BOFTModule("m", b, 2),  # 6 stages of 32 blocks of 2
    "boft_constraint_rescaled": lambda b: BOFTModule("m", b, 4, constraint=2e-3, rescaled=True),
}


def _layer(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LAYERS[kind]().requires_grad_(False)


def _input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn((3, 24) if kind == "linear" else (2, 24, 9, 9), generator=g)


def randomise(adapters, seed: int = 1) -> None:
    """Trained-like values: blocks ~ N(0, 0.2), rescale ~ 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters:
            a.oft_blocks.copy_(torch.randn(a.oft_blocks.shape, generator=g) * 0.2)
            if a.rescale is not None:
                a.rescale.copy_(1 + torch.randn(a.rescale.shape, generator=g) * 0.1)


def _tensors(a) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in a.state_dict().items()}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("module", list(MODULES))
def test_single_layer_identity_loader_and_hook(module, kind):
    base = _layer(kind)
    a = MODULES[module](base)
    x = _input(kind)
    # a new adapter: the delta is exactly zero and the hooked layer gives the same bits
    assert torch.count_nonzero(a.delta_weight()) == 0
    with torch.no_grad():
        y0 = base(x)
        a.attach()
        y_init = base(x)
        a.detach()
    assert torch.equal(y0, y_init)

    randomise([a])
    a.multiplier = 0.8
    expected, ex_bias = loader_delta(_tensors(a), base.weight, multiplier=0.8)
    assert ex_bias is None
    got = a.delta_weight()
    assert got.shape == base.weight.shape and got.dtype == torch.float32
    tol = 1e-6 * max(1.0, float(expected.abs().max()))
    assert torch.allclose(got.double(), expected, atol=tol, rtol=0), \
        float((got.double() - expected).abs().max())
    # hooked == the layer with the loader's merged weight
    with torch.no_grad():
        a.attach()
        y_hooked = base(x)
        a.detach()
        merged = copy.deepcopy(base)
        merged.weight += expected.float()
        y_merged = merged(x)
    assert (y_hooked - y0).abs().max() > 1e-3
    assert torch.allclose(y_hooked, y_merged, atol=1e-5, rtol=0)
    assert torch.equal(base(x), y0)  # detached: as it was
    # the merge's delta from the same tensors, and a module rebuilt from them (strength 1)
    a.multiplier = 1.0
    parts = _tensors(a)
    assert torch.allclose(module_delta(parts, tuple(base.weight.shape), "m", base.weight),
                          a.delta_weight(), atol=1e-6, rtol=0)
    rebuilt = adapter_from_tensors("m", base, parts)
    assert type(rebuilt) is type(a) and torch.equal(rebuilt.delta_weight(), a.delta_weight())


@pytest.mark.parametrize("module", ["oft", "oft_4", "boft", "boft_2"])
def test_rotation_is_orthogonal(module):
    """Without rescale, W' = R W with R orthogonal: W'^T W' = W^T W (at multiplier 1), and R - I
    comes from a skew-symmetric Q."""
    base = _layer("conv3x3")
    a = MODULES[module](base)
    randomise([a])
    w = base.weight.double().reshape(64, -1)
    w2 = w + a.delta_weight().double().reshape(64, -1)
    assert torch.allclose(w2.T @ w2, w.T @ w, atol=1e-5, rtol=0)
    assert not torch.allclose(w2, w, atol=1e-3)
    rm = rotation_minus_identity(a.oft_blocks.detach(), 0.0).double()
    eye = torch.eye(rm.shape[-1], dtype=torch.float64)
    r = rm + eye
    assert torch.allclose(r @ r.transpose(-1, -2), eye.expand_as(r), atol=1e-6, rtol=0)


def test_constraint_clamps_q_norm():
    """COFT: |Q| over all blocks is clamped to alpha x out channels (the WebUI's clamp); a loose
    constraint changes nothing, a tight one the rotation."""
    base = _layer("linear")
    free = OFTModule("m", base, 8)
    randomise([free])
    q = free.oft_blocks.detach() - free.oft_blocks.detach().transpose(1, 2)
    norm = float(q.norm())
    loose = adapter_from_tensors("m", base, {**_tensors(free), "alpha": torch.tensor(norm)})
    assert torch.equal(loose.delta_weight(), free.delta_weight())  # bound 64 x |Q|: no clamp
    tight_alpha = norm / 64 / 4  # bound |Q| / 4
    tight = adapter_from_tensors("m", base, {**_tensors(free), "alpha": torch.tensor(tight_alpha)})
    scaled = OFTModule("m", base, 8)
    with torch.no_grad():
        scaled.oft_blocks.copy_(free.oft_blocks * ((norm / 4 + 1e-8) / (norm + 1e-8)))
    assert torch.allclose(tight.delta_weight(), scaled.delta_weight(), atol=1e-7, rtol=0)
    assert not torch.allclose(tight.delta_weight(), free.delta_weight(), atol=1e-3)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradients_reach_blocks_and_rescale(kind):
    for name in ("oft_rescaled", "boft_constraint_rescaled"):
        base = _layer(kind)
        a = MODULES[name](base)
        a.train()
        a.attach()
        try:
            base(_input(kind)).square().sum().backward()  # at init: Q = 0, R = I
        finally:
            a.detach()
        for pname, p in a.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (name, pname)
            assert torch.count_nonzero(p.grad) > 0, (name, pname)
        assert base.weight.grad is None


def test_scale_delta_scales_blocks_and_rescale():
    a = OFTModule("m", _layer("linear"), 8, rescaled=True)
    randomise([a])
    blocks, rescale = a.oft_blocks.detach().clone(), a.rescale.detach().clone()
    a.scale_delta_(0.5)
    assert torch.equal(a.oft_blocks, blocks * 0.5)
    assert torch.allclose(a.rescale, 1 + (rescale - 1) * 0.5, atol=1e-7, rtol=0)


# -- the real LyCORIS modules (test-only oracle) --------------------------------------------------

LYCORIS_CASES = {  # ours, lycoris class, its options (lora_dim = our block size setting)
    "oft": ("oft", "DiagOFTModule", dict(lora_dim=8)),
    "oft_4": ("oft_4", "DiagOFTModule", dict(lora_dim=4)),
    "oft_constraint": ("oft_constraint", "DiagOFTModule", dict(lora_dim=8, constraint=2e-3)),
    "oft_rescaled": ("oft_rescaled", "DiagOFTModule", dict(lora_dim=8, rescaled=True)),
    "boft": ("boft", "ButterflyOFTModule", dict(lora_dim=8)),
    "boft_2": ("boft_2", "ButterflyOFTModule", dict(lora_dim=2)),
    "boft_constraint_rescaled": ("boft_constraint_rescaled", "ButterflyOFTModule",
                                 dict(lora_dim=4, constraint=2e-3, rescaled=True)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_matches_lycoris_modules(case, kind):
    """The same settings make the same tensors (names, shapes, alpha) in LyCORIS; loaded with
    ours, its forward equals our hooked forward; its file reader rebuilds the same layout."""
    lycoris = _lycoris()
    ours_name, cls_name, options = LYCORIS_CASES[case]
    base = _layer(kind)
    ours = MODULES[ours_name](base)
    randomise([ours], seed=4)
    tensors = _tensors(ours)
    twin = copy.deepcopy(base)
    cls = getattr(lycoris, cls_name)
    theirs = cls("m", twin, 1.0, **options)
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in tensors.items()}
    assert float(theirs.state_dict()["alpha"]) == float(tensors["alpha"])
    theirs.load_state_dict(tensors)
    theirs.apply_to()
    x = _input(kind)
    with torch.no_grad():
        y_theirs = twin(x)
        ours.attach()
        y_ours = base(x)
        ours.detach()
    assert (y_ours - base(x)).abs().max() > 1e-3
    assert torch.allclose(y_ours, y_theirs, atol=2e-5, rtol=0), (y_ours - y_theirs).abs().max()
    state = {f"m.{k}": v for k, v in tensors.items()}
    assert cls.algo_check(state, "m")
    with torch.no_grad():  # as LyCORIS's own file loader calls it
        rebuilt = cls.make_module_from_state_dict("m", copy.deepcopy(base), tensors["oft_blocks"],
                                                  tensors.get("rescale"), tensors["alpha"])
        diff, _ = rebuilt.get_diff_weight(1.0)
    assert (rebuilt.block_size, rebuilt.block_num) == (ours.block_size, ours.num_blocks)
    assert torch.allclose(diff, ours.delta_weight().detach(), atol=2e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_oft_multiplier_matches_lycoris(kind):
    """OFT's multiplier scales the delta in LyCORIS as in the WebUI (without rescale); BOFT's
    blends each stage in LyCORIS (and ComfyUI), the whole delta in the WebUI and here."""
    lycoris = _lycoris()
    base = _layer(kind)
    ours = OFTModule("m", base, 8)
    randomise([ours], seed=6)
    twin = copy.deepcopy(base)
    theirs = lycoris.DiagOFTModule("m", twin, 0.6, lora_dim=8)
    theirs.load_state_dict(_tensors(ours))
    theirs.apply_to()
    ours.multiplier = 0.6
    x = _input(kind)
    with torch.no_grad():
        y_theirs = twin(x)
        ours.attach()
        y_ours = base(x)
        ours.detach()
    assert torch.allclose(y_ours, y_theirs, atol=2e-5, rtol=0)


# -- the tiny SD1 model: files, inspect, training, merge ------------------------------------------

CASES = {
    "oft_constraint_rescaled": dict(algo="oft", oft_block_size=8, oft_constraint=0.02,
                                    oft_rescaled=True, conv_rank=1),
    "boft_rescaled": dict(algo="boft", oft_block_size=4, oft_rescaled=True, conv_rank=1),
}


@pytest.fixture(scope="module")
def bundle():
    from lora_train_ext.core.models.tiny import build_bundle

    return build_bundle("sd1", "tiny", seed=0)


@pytest.fixture(scope="module")
def base_checkpoint(bundle, tmp_path_factory):
    return write_checkpoint(bundle, str(tmp_path_factory.mktemp("ckpt") / "base.safetensors"))


def net_config(case: str, **changes) -> NetworkConfig:
    return dataclasses.replace(NetworkConfig(), **CASES[case], **changes)


def _save(network, cfg: NetworkConfig, path) -> tuple[dict, dict]:
    info = LoraInfo(arch="sd1", algo=cfg.algo, rank=cfg.oft_block_size, alpha=cfg.oft_constraint,
                    network_args={"rescaled": str(cfg.oft_rescaled)}, output_name="t")
    save_lora(network.kohya_state_dict(), info, str(path), save_dtype="fp32", sidecar=False)
    return load_lora(str(path))


def _merged_outputs(bundle, network):
    saved = []
    with torch.no_grad():
        for a in network:
            saved.append((a.base.weight, a.base.weight.clone()))
            a.base.weight += a.delta_weight().to(a.base.weight.dtype)
    try:
        return model_outputs(bundle)
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)


@pytest.mark.parametrize("case", list(CASES))
def test_model_identity_hooked_equals_merged_and_file(bundle, case, tmp_path):
    before = state_sha256(bundle.unet, *bundle.text_encoders.values())
    cond0, out0 = model_outputs(bundle)
    cfg = net_config(case)
    net = build_network(bundle.trainable_roots(), "sd1", cfg, seed=3)
    algo = cfg.algo
    assert net.algo == algo and all(type(a) is (OFTModule if algo == "oft" else BOFTModule)
                                    for a in net)
    assert any(a.kind == "conv3x3" for a in net) and any(a.kind == "linear" for a in net)
    for a in net:
        assert torch.count_nonzero(a.delta_weight()) == 0, a.name
    net.attach()
    try:
        cond1, out1 = model_outputs(bundle)
    finally:
        net.detach()
    assert torch.equal(cond0, cond1) and torch.equal(out0, out1)

    randomise(net)
    net.set_multiplier(0.7)
    net.attach()
    try:
        cond_h, out_h = model_outputs(bundle)
    finally:
        net.detach()
    assert (out_h - out0).abs().max() > 1e-3 and (cond_h - cond0).abs().max() > 1e-3
    cond_m, out_m = _merged_outputs(bundle, net)
    assert torch.allclose(cond_h, cond_m, atol=1e-5, rtol=0)
    assert torch.allclose(out_h, out_m, atol=1e-5, rtol=0)
    assert state_sha256(bundle.unet, *bundle.text_encoders.values()) == before
    net.set_multiplier(1.0)

    # the file: LyCORIS's names and metadata, loaded back exactly
    path = tmp_path / "a.safetensors"
    tensors, meta = _save(net, cfg, path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == {"oft": "diag-oft", "boft": "boft"}[algo]
    assert float(args["constraint"]) == cfg.oft_constraint and args["rescaled"] == "True"
    assert meta["modelspec.architecture"].endswith("/lycoris-" + args["algo"])
    for name, parts in group_modules(tensors).items():
        assert set(parts) == {"oft_blocks", "alpha", "rescale"}, name
        assert parts["oft_blocks"].dim() == (3 if algo == "oft" else 4)
        assert float(parts["alpha"]) == pytest.approx(cfg.oft_constraint)
        assert algo_of_tensors(parts) == algo
    fresh = build_network(bundle.trainable_roots(), "sd1", cfg, seed=99)
    fresh.load_kohya_state_dict(tensors)
    assert all(torch.equal(v, tensors[k]) for k, v in fresh.kohya_state_dict().items())
    from_file = network_from_tensors(bundle.trainable_roots(), "sd1", tensors)
    assert from_file.algo == algo
    for name, parts in group_modules(tensors).items():
        a = net.adapters[name]
        ours = a.delta_weight()
        assert torch.equal(from_file.adapters[name].delta_weight(), ours)
        expected, _ = loader_delta(parts, a.base.weight)
        tol = 1e-5 * max(1.0, float(expected.abs().max()))
        assert torch.allclose(ours.double(), expected, atol=tol, rtol=0), name
        assert torch.allclose(module_delta(parts, tuple(a.base.weight.shape), name,
                                           a.base.weight), ours, atol=1e-6, rtol=0)

    report = describe(str(path))
    assert report["algorithm"] == algo and report["unknown_module_count"] == 0
    assert report["ranks"] == [] and report["block_sizes"] == sorted({a.block_size for a in net})
    assert "rescaled" in report["options"]
    loaders = report["loaders"]
    assert loaders["webui"] == "yes" and loaders["forge"].startswith("no")
    assert loaders["diffusers"].startswith("no") and loaders["kohya"] == "yes (with LyCORIS)"
    if algo == "oft":  # ComfyUI loads rescale for OFT without applying it; SD.Next ignores it
        assert loaders["comfyui"].startswith("partial") and "rescale" in loaders["comfyui"]
        assert loaders["sdnext"].startswith("partial")
    else:
        assert loaders["comfyui"] == "yes" and loaders["sdnext"].startswith("no")
    assert any(n.startswith(algo.upper() + ":") for n in report["loader_notes"])


@pytest.mark.parametrize("case", list(CASES))
def test_training_moves_adapter_and_keeps_base(bundle, tmp_path, case):
    modules = bundle.base_modules()
    before = state_sha256(*modules)
    cfg = demo_config(str(tmp_path), steps=3, seed=0, rank=4, alpha=None, lr=1e-3,
                      batch_size=1, grad_accum=1)
    cfg.network = net_config(case, block_filter="MID")
    result = train(bundle, cfg)
    assert state_sha256(*modules) == before
    assert all(not m._forward_hooks for root in modules for m in root.modules())
    tensors, meta = load_lora(result.path)
    for name, parts in group_modules(tensors).items():
        assert torch.count_nonzero(parts["oft_blocks"]) > 0, name
        assert not torch.equal(parts["rescale"], torch.ones_like(parts["rescale"])), name
    # a run's metadata: LyCORIS's dim is the block size, its constraint the alpha
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_dim"] == str(cfg.network.oft_block_size)
    assert float(meta["ss_network_alpha"]) == cfg.network.oft_constraint
    assert float(args["constraint"]) == cfg.network.oft_constraint
    assert args["rescaled"] == "True" and args["conv_dim"] == str(cfg.network.oft_block_size)
    fresh = build_network(bundle.trainable_roots(), "sd1", cfg.network, seed=7)
    fresh.load_kohya_state_dict(tensors)
    assert all(torch.equal(v, tensors[k]) for k, v in fresh.kohya_state_dict().items())
    assert describe(result.path)["algorithm"] == cfg.network.algo


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_merge_equals_hooked_model(bundle, base_checkpoint, tmp_path, case):
    """At strength 0.7 (the delta scales linearly, as in the WebUI), and two files in a row: the
    second rotates the weight the first left (the WebUI applies them one after the other)."""
    from lora_train_ext.core.models.tiny import load_checkpoint_state_dict

    cfg = net_config(case, block_filter="MID")
    nets, paths = [], []
    for seed in (1, 2):
        net = build_network(bundle.trainable_roots(), "sd1", cfg, seed=3)
        randomise(net, seed=seed)
        path = tmp_path / f"{seed}.safetensors"
        _save(net, cfg, path)
        nets.append(net)
        paths.append(str(path))
    out_path = str(tmp_path / "merged.safetensors")
    report = merge_lora_into_checkpoint(base_checkpoint, [(paths[0], 0.7), (paths[1], 1.0)],
                                        out_path, arch="sd1")
    assert report.changed_modules == 2 * len(nets[0])
    # the hooked model: the first file's delta merged at 0.7, then the second file hooked on top
    before = state_sha256(*bundle.base_modules())
    base = {k: v.clone() for k, v in checkpoint_state_dict(bundle).items()}
    first = nets[0]
    first.set_multiplier(0.7)
    try:
        with torch.no_grad():
            deltas = [(a, a.delta_weight()) for a in first]
            for a, d in deltas:
                a.base.weight += d.to(a.base.weight.dtype)
        nets[1].attach()
        try:
            hooked = model_outputs(bundle)
        finally:
            nets[1].detach()
    finally:
        load_checkpoint_state_dict(bundle, base)
    assert state_sha256(*bundle.base_modules()) == before
    load_checkpoint_state_dict(bundle, load_file(out_path))
    try:
        merged = model_outputs(bundle)
    finally:
        load_checkpoint_state_dict(bundle, base)
    assert state_sha256(*bundle.base_modules()) == before
    for h, m in zip(hooked, merged):
        assert torch.allclose(h, m, atol=1e-4, rtol=0), (h - m).abs().max()


# -- files from elsewhere, inspect's verdicts, refusals -------------------------------------------

def _hand_file(path, blocks: torch.Tensor, alpha: float | None, meta: dict | None = None):
    """One SD1 module (attn1.to_q of the middle block: 64 rows on the tiny model) with these
    tensors."""
    name = "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q"
    tensors = {f"{name}.oft_blocks": blocks}
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata=meta or {})
    return str(path)


def test_inspect_verdicts_follow_the_constraint(tmp_path):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randn(8, 8, 8, generator=g) * 0.2
    q_norm = float((blocks - blocks.transpose(1, 2)).norm())
    # no constraint: SD.Next (and WebUI before 1.10) clamp to alpha x channels = 0
    report = describe(_hand_file(tmp_path / "a.safetensors", blocks, 0.0))
    assert report["algorithm"] == "oft" and report["loaders"]["webui"] == "yes"
    assert report["loaders"]["comfyui"] == "yes"
    assert report["loaders"]["sdnext"].startswith("no") and "0" in report["loaders"]["sdnext"]
    # a constraint above |Q|: every loader reads the same
    report = describe(_hand_file(tmp_path / "b.safetensors", blocks, q_norm * 2))
    assert report["loaders"]["sdnext"] == "yes" and report["loaders"]["comfyui"] == "yes"
    # below |Q| but above |Q| / 64 channels: ComfyUI's bound (alpha itself) clamps, the WebUI's not
    report = describe(_hand_file(tmp_path / "c.safetensors", blocks, q_norm / 2))
    assert report["oft_over_alpha"] == 1
    assert report["loaders"]["comfyui"].startswith("partial: 1 modules")
    assert report["loaders"]["webui"] == "yes"
    # BOFT by its 4 axes, whatever the metadata says; old LyCORIS oft_diag: WebUI / SD.Next only
    report = describe(_hand_file(tmp_path / "d.safetensors", torch.zeros(4, 8, 8, 8), 0.0,
                                 {"ss_network_module": "lycoris.kohya",
                                  "ss_network_args": json.dumps({"algo": "diag-oft"})}))
    assert report["algorithm"] == "boft" and report["loaders"]["sdnext"].startswith("no")
    name = "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.oft_diag": torch.zeros(8, 8, 8)}, str(tmp_path / "e.safetensors"))
    report = describe(str(tmp_path / "e.safetensors"))
    assert report["algorithm"] == "oft_diag"
    assert report["loaders"]["webui"] == "yes" and report["loaders"]["comfyui"].startswith("no")


def test_module_delta_needs_the_base_weight_and_merge_loras_refuses(tmp_path):
    parts = {"oft_blocks": torch.zeros(8, 8, 8), "alpha": torch.tensor(0.0)}
    with pytest.raises(ValueError, match="base weight"):
        module_delta(parts, (64, 64), "m")
    with pytest.raises(UserError, match="base weight"):
        full_delta(parts, "m", "sd1")
    boft = {"oft_blocks": torch.zeros(4, 8, 8, 8), "alpha": torch.tensor(0.0)}
    assert algo_of_tensors(boft) == "boft" and algo_of_tensors(set(boft)) == "oft"
    with pytest.raises(ValueError, match="base weight"):
        module_delta(boft, (64, 64), "m")


def test_settings_and_refusals():
    cfg = RunConfig()
    cfg.network.algo = "boft"
    assert not cfg.problems()
    cfg.set("network.oft_block_size", "1")
    assert any(p.field == "network.oft_block_size" for p in cfg.problems())
    cfg.set("network.oft_block_size", "8")
    cfg.set("network.oft_constraint", "-1")
    assert any(p.field == "network.oft_constraint" for p in cfg.problems())
    # a layer BOFT's butterfly cannot split: refused naming the setting
    with pytest.raises(ValueError, match="BOFT cannot split 40 channels"):
        BOFTModule("m", nn.Linear(8, 40), 8)


def test_continue_from_an_oft_file_checks_the_constraint(bundle, tmp_path):
    from lora_train_ext.core.continue_from import load_existing, read_existing

    cfg = net_config("oft_constraint_rescaled", block_filter="MID")
    net = build_network(bundle.trainable_roots(), "sd1", cfg, seed=3)
    randomise(net)
    path = tmp_path / "c.safetensors"
    _save(net, cfg, path)
    existing = read_existing(str(path), "sd1", cfg)
    again = build_network(bundle.trainable_roots(), "sd1", cfg, seed=5)
    load_existing(existing, again, "sd1", cfg)
    assert all(torch.equal(a.oft_blocks, net.adapters[a.name].oft_blocks) for a in again)
    other = dataclasses.replace(cfg, oft_constraint=0.5)
    with pytest.raises(UserError, match="oft_constraint"):
        load_existing(existing, build_network(bundle.trainable_roots(), "sd1", other, seed=5),
                      "sd1", other)
    with pytest.raises(UserError, match="oft file; network.algo is boft"):
        read_existing(str(path), "sd1", dataclasses.replace(cfg, algo="boft"))
