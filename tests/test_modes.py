"""Training modes beyond captioned images: a concept slider (LECO) trained from prompts alone
moves the target prompt's prediction toward the positive prompt's at +1 and toward the negative
one's at -1; difference training on image pairs makes the first image's prediction move toward
the second's; both write ordinary LoRA files that say how they were made."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

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


def _pairs(folder, count=3):
    folder.mkdir()
    for i in range(count):
        before = np.zeros((64, 64, 3), np.uint8)
        before[16 + i:48, 16:48] = (220, 30, 30)  # a red square
        after = before.copy()
        after[16 + i:48, 16:48] = (30, 30, 220)  # the change: it turns blue
        Image.fromarray(before).save(folder / f"{i:02d}.png")
        Image.fromarray(after).save(folder / f"{i:02d}_after.png")
        (folder / f"{i:02d}.txt").write_text("shp style, square")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "lonely.png")
    return str(folder)


def test_difference_training_moves_the_first_image_toward_the_second(tmp_path):
    bundle = build_bundle("sd1", "tiny", seed=0)
    data = _pairs(tmp_path / "pairs")
    cfg = _cfg(tmp_path / "out", mode={"kind": "difference"}, data={"dataset_dir": data},
               optim={"lr": 3e-4}, train={"max_steps": 60})
    pre = preflight(cfg)
    assert pre.ok and "3 image pair(s)" in pre.dataset_summary and "lonely.png" in pre.dataset_summary
    result = train(bundle, cfg)
    tensors, meta = load_lora(result.path)
    assert json.loads(meta["lora_train_ext.mode"])["mode"] == "difference"
    img = np.asarray(Image.open(f"{data}/00.png"), np.float32) / 127.5 - 1
    img_after = np.asarray(Image.open(f"{data}/00_after.png"), np.float32) / 127.5 - 1
    with torch.no_grad():
        lat = bundle.encode(torch.from_numpy(np.stack([img, img_after])).permute(0, 3, 1, 2))
    noise = torch.randn(lat[:1].shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500])
    a = bundle.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_before = a.sqrt() * lat[:1] + (1 - a).sqrt() * noise
    x_after = a.sqrt() * lat[1:] + (1 - a).sqrt() * noise
    caption = "shp style, square"
    goal = _predict(bundle, None, x_after, t, caption, 0)
    frozen = _predict(bundle, None, x_before, t, caption, 0)
    learned = _predict(bundle, tensors, x_before, t, caption, 1.0)
    assert (learned - goal).norm() < 0.9 * (frozen - goal).norm()


def test_mode_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(UserError) as e:
        RunConfig.from_dict({"mode": {"kind": "slider"}}, validate=True)
    assert {p.field for p in e.value.problems} == {"mode.target", "mode.positive"}
    cfg = _cfg(tmp_path, mode={"kind": "difference"}, data={"dataset_dir": str(tmp_path)})
    assert "data.dataset_dir" in {p.field for p in preflight(cfg).problems}  # no pairs there
    slider = _cfg(tmp_path, mode={"kind": "slider", "target": "a", "positive": "b"})
    assert preflight(slider).ok  # a slider needs no dataset
