"""The foundation's invariants on the tiny SD1 model: identity at init, hooked == merged,
base weights bit-identical, training moves the adapter and lowers the loss, exact files."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

from conftest import model_outputs, requires_grad_flags, state_sha256
from fixtures_path import read_tsv
from lora_train_ext.core.bundle import Progress, TrainControl
from lora_train_ext.core.config import RunConfig
from lora_train_ext.core.errors import TrainingError
from lora_train_ext.core.lora_file import data_section_sha256, load_lora
from lora_train_ext.core.networks import build_network
from lora_train_ext.core.trainer import train
from lora_train_ext.demo import demo_config


_outputs = model_outputs


def _randomise_up(network, seed: int = 1, scale: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in network:
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g) * scale)


def test_zero_init_adapter_is_identity(sd1_bundle):
    cond0, out0 = _outputs(sd1_bundle)
    net = build_network(sd1_bundle.trainable_roots(), "sd1", RunConfig().network, seed=3)
    assert all(torch.count_nonzero(a.lora_up.weight) == 0 for a in net)
    assert all(torch.count_nonzero(a.lora_down.weight) > 0 for a in net)
    net.attach()
    cond1, out1 = _outputs(sd1_bundle)
    net.detach()
    assert torch.equal(cond0, cond1)
    assert torch.equal(out0, out1)


def test_hooked_forward_equals_merged_weights(sd1_bundle):
    net = build_network(sd1_bundle.trainable_roots(), "sd1", RunConfig().network, seed=3)
    _randomise_up(net)
    net.set_multiplier(0.7)
    cond0, out0 = _outputs(sd1_bundle)
    net.attach()
    cond_h, out_h = _outputs(sd1_bundle)
    net.detach()
    assert (out_h - out0).abs().max() > 1e-3  # the adapter really changes the output

    saved = {}
    with torch.no_grad():
        for a in net:
            w = a.base.weight
            saved[a.name] = w.clone()
            w += a.delta_weight().to(w.dtype)
    try:
        cond_m, out_m = _outputs(sd1_bundle)
    finally:
        with torch.no_grad():
            for a in net:
                a.base.weight.copy_(saved[a.name])
    assert torch.allclose(cond_h, cond_m, atol=1e-5, rtol=0)
    assert torch.allclose(out_h, out_m, atol=1e-5, rtol=0)


def test_detach_leaves_model_bit_identical(sd1_bundle):
    before = state_sha256(sd1_bundle.unet, *sd1_bundle.text_encoders.values())
    _, out0 = _outputs(sd1_bundle)
    net = build_network(sd1_bundle.trainable_roots(), "sd1", RunConfig().network, seed=3)
    _randomise_up(net)
    net.attach()
    _outputs(sd1_bundle)
    net.detach()
    _, out1 = _outputs(sd1_bundle)
    assert torch.equal(out0, out1)
    assert state_sha256(sd1_bundle.unet, *sd1_bundle.text_encoders.values()) == before
    assert all(not m._forward_hooks for m in sd1_bundle.unet.modules())


def _quick_cfg(tmp_path, steps=12, **train):
    cfg = demo_config(str(tmp_path), steps=steps, seed=0, rank=4, alpha=None, lr=2e-3,
                      batch_size=2, grad_accum=1)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_training_moves_adapter_and_keeps_base(sd1_bundle, tmp_path):
    modules = sd1_bundle.base_modules()
    before = state_sha256(*modules)
    flags = requires_grad_flags(*modules)
    modes = [m.training for root in modules for m in root.modules()]
    cfg = _quick_cfg(tmp_path, steps=40)
    result = train(sd1_bundle, cfg)
    assert state_sha256(*modules) == before
    assert requires_grad_flags(*modules) == flags
    assert [m.training for root in modules for m in root.modules()] == modes
    assert all(not m._forward_hooks for root in modules for m in root.modules())

    tensors, meta = load_lora(result.path)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert len(ups) == 264
    assert sum(int(torch.count_nonzero(u)) > 0 for u in ups) == 264  # every module moved
    assert all(torch.isfinite(torch.tensor(result.losses)))
    first = sum(result.losses[:8]) / 8
    last = sum(result.losses[-8:]) / 8
    assert last < first, (first, last)
    assert meta["ss_steps"] == "40"


def test_base_identical_after_exception_mid_run(sd1_bundle, tmp_path):
    modules = sd1_bundle.base_modules()
    before = state_sha256(*modules)
    flags = requires_grad_flags(*modules)

    def explode(event: Progress):
        if event.kind == "step" and event.step == 3:
            raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected failure"):
        train(sd1_bundle, _quick_cfg(tmp_path, steps=10), TrainControl(explode))
    assert state_sha256(*modules) == before
    assert requires_grad_flags(*modules) == flags
    assert all(not m._forward_hooks for root in modules for m in root.modules())
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_stop_request_saves_result_and_restores(sd1_bundle, tmp_path):
    before = state_sha256(*sd1_bundle.base_modules())
    control = TrainControl()
    control.add_listener(lambda e: control.request_stop("test stop")
                         if e.kind == "step" and e.step == 4 else None)
    result = train(sd1_bundle, _quick_cfg(tmp_path, steps=50), control)
    assert result.stopped and result.steps == 4
    assert os.path.isfile(result.path)
    assert state_sha256(*sd1_bundle.base_modules()) == before


def test_nonfinite_loss_stops_with_clear_message(sd1_bundle, tmp_path):
    before = state_sha256(*sd1_bundle.base_modules())
    cfg = _quick_cfg(tmp_path, steps=5)
    cfg.optim.lr = 1e30
    cfg.optim.max_grad_norm = 0
    with pytest.raises(TrainingError, match="loss became"):
        train(sd1_bundle, cfg)
    assert state_sha256(*sd1_bundle.base_modules()) == before


def test_save_load_roundtrip_metadata_and_hash(sd1_bundle, tmp_path):
    result = train(sd1_bundle, _quick_cfg(tmp_path, steps=3))
    tensors, meta = load_lora(result.path)
    net = build_network(sd1_bundle.trainable_roots(), "sd1", _quick_cfg(tmp_path).network, seed=99)
    net.load_kohya_state_dict(tensors)
    again = net.kohya_state_dict()
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)

    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                "ss_v2", "ss_sd_model_name", "ss_steps", "ss_seed", "ss_output_name",
                "ss_tag_frequency", "modelspec.architecture", "modelspec.sai_model_spec",
                "sshs_model_hash", "sshs_legacy_hash"):
        assert key in meta, key
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_output_name"] == "demo_lora"
    assert json.loads(meta["ss_tag_frequency"])  # tags of the demo captions were counted
    assert meta["sshs_model_hash"] == data_section_sha256(result.path)
    with open(result.path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        assert hashlib.sha256(f.read()).hexdigest() == meta["sshs_model_hash"]
    sidecar = json.loads(open(result.path[:-len(".safetensors")] + ".json").read())
    assert sidecar["sd version"] == "SD1"


def test_sd1_file_module_names_match_fixtures(sd1_bundle, tmp_path):
    result = train(sd1_bundle, _quick_cfg(tmp_path, steps=1))
    with safe_open(result.path, "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}
    unet = {r[0] for r in read_tsv("kohya_modules", "sd1_unet_lora.tsv")}
    te = {r[0] for r in read_tsv("kohya_modules", "sd1_te.tsv")}
    assert len(unet) == 192 and len(te) == 72
    assert {n for n in names if n.startswith("lora_unet_")} == unet
    assert {n for n in names if n.startswith("lora_te_")} == te
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    with safe_open(result.path, "pt") as f:
        shape = f.get_slice("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").get_shape()
    assert len(shape) == 4 and shape[2:] == [1, 1]  # SD1 proj_in is a 1x1 conv


def test_same_seed_same_weights_different_seed_differs(sd1_bundle, tmp_path):
    a = train(sd1_bundle, _quick_cfg(tmp_path / "a", steps=4))
    b = train(sd1_bundle, _quick_cfg(tmp_path / "b", steps=4))
    c = train(sd1_bundle, _quick_cfg(tmp_path / "c", steps=4, seed=5))
    ta, tb, tc = (load_lora(r.path)[0] for r in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)
