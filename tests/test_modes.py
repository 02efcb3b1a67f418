"""Training modes beyond captioned images: a concept slider (LECO) trained from prompts alone
moves the target prompt's prediction toward the positive prompt's at +1 and toward the negative
one's at -1, and writes an ordinary LoRA file that says how it was made."""

from __future__ import annotations

import json

import pytest
import torch

from lora_train_ext.core.config import RunConfig
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.inspect import describe, format_report
from lora_train_ext.core.lora_file import load_lora
from lora_train_ext.core.models.tiny import build_bundle
from lora_train_ext.core.networks.from_file import network_from_tensors
from lora_train_ext.core.preflight import preflight
from lora_train_ext.core.trainer import train


def _cfg(out, **sections) -> RunConfig:
    base = {"data": {"resolution": "64", "enable_buckets": False},
            "train": {"max_steps": 30, "dtype": "fp32", "batch_size": 2, "seed": 0},
            "optim": {"lr": 0.02}, "network": {"rank": 4, "alpha": 4.0, "train_on": "unet"},
            "save": {"output_dir": str(out), "output_name": "mode_lora", "save_dtype": "fp32"}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return RunConfig.from_dict(base, validate=True)


def _predict(bundle, tensors, x, t, caption, strength):
    with torch.no_grad():
        if tensors is None:
            return bundle.denoise(x, t, bundle.condition([caption])).float()
        net = network_from_tensors(bundle.trainable_roots(), bundle.arch, tensors)
        net.set_multiplier(strength)
        net.attach()
        try:
            return bundle.denoise(x, t, bundle.condition([caption])).float()
        finally:
            net.detach()


def test_a_slider_moves_the_target_toward_positive_at_plus_and_negative_at_minus(tmp_path):
    bundle = build_bundle("sd1", "tiny", seed=0)
    # a concept whose target lies between its two ends (as "person" between "smiling person"
    # and "frowning person"): on this tiny model "square" between "red square" and "blue square"
    target, positive, negative = ("shp style, square", "shp style, red square",
                                  "shp style, blue square")
    cfg = _cfg(tmp_path, mode={"kind": "slider", "target": target, "positive": positive,
                               "negative": negative, "guidance": 0.5},
               optim={"lr": 3e-4}, train={"max_steps": 80})
    result = train(bundle, cfg)
    tensors, meta = load_lora(result.path)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([600])
    base = _predict(bundle, None, x, t, target, 0)
    e_pos = _predict(bundle, None, x, t, positive, 0)
    e_neg = _predict(bundle, None, x, t, negative, 0)
    plus = _predict(bundle, tensors, x, t, target, 1.0)
    minus = _predict(bundle, tensors, x, t, target, -1.0)
    direction = (e_pos - e_neg).flatten()
    assert float((plus - base).flatten() @ direction) > 0  # +1 goes the positive way
    assert float((minus - base).flatten() @ direction) < 0  # -1 the negative way
    assert (plus - e_pos).norm() < (base - e_pos).norm()
    assert (minus - e_neg).norm() < (base - e_neg).norm()
    mode = json.loads(meta["lora_train_ext.mode"])
    assert mode["mode"] == "slider" and mode["positive"] == positive
    report = describe(result.path)
    assert "slider training" in format_report(report) and result.modules == {"unet": 192}


def test_mode_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(UserError) as e:
        RunConfig.from_dict({"mode": {"kind": "slider"}}, validate=True)
    assert {p.field for p in e.value.problems} == {"mode.target", "mode.positive"}
    slider = _cfg(tmp_path, mode={"kind": "slider", "target": "a", "positive": "b"})
    assert preflight(slider).ok  # a slider needs no dataset


def test_the_slider_preset_is_a_valid_slider():
    from lora_train_ext.core.presets import PRESETS

    cfg = RunConfig.from_dict(PRESETS["concept-slider"], validate=True)
    assert cfg.mode.kind == "slider" and cfg.network.train_on == "unet"
    assert preflight(cfg).ok
