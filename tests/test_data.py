"""Dataset contract used by the trainer: scan, counts, batches, cache, resume, report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lora_train_ext.core.config import DataConfig
from lora_train_ext.core.data import Batch, DatasetReport, TrainData, check_dataset
from lora_train_ext.core.errors import UserError


def write_image(path, size=(64, 48), color=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(abs(hash((str(path), size))) % 2**32)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[..., 0] = color[0]
    Image.fromarray(arr, "RGB").convert(mode).save(path)
    return path


def fake_encode(x: torch.Tensor) -> torch.Tensor:
    """Mimics a VAE's output shape: (B, 3, H, W) -> (B, 4, H/8, W/8)."""
    pooled = torch.nn.functional.avg_pool2d(x, 8)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


@pytest.fixture()
def kohya_dir(tmp_path):
    root = tmp_path / "img"
    for i in range(3):
        write_image(root / "10_mychar" / f"a{i}.png", (96, 64))
    (root / "10_mychar" / "a0.txt").write_text("mychar, red hair, smile")
    for i in range(2):
        write_image(root / "2_style" / f"b{i}.jpg", (64, 96))
    return root


def cfg_for(root, **kw) -> DataConfig:
    base = dict(dataset_dir=str(root), resolution="64", min_bucket_side=32, max_bucket_side=128,
                bucket_step=32)
    base.update(kw)
    return DataConfig(**base)


def test_contract_counts_and_batches(kohya_dir):
    data = TrainData(cfg_for(kohya_dir), batch_size=2, seed=3)
    assert data.num_images == 5
    assert data.report.repeats_total == 3 * 10 + 2 * 2
    assert data.dataset_dirs_meta() == {"10_mychar": {"n_repeats": 10, "img_count": 3},
                                        "2_style": {"n_repeats": 2, "img_count": 2}}
    batches = list(data.batches(0))
    assert len(batches) == data.steps_per_epoch
    assert sum(len(b) for b in batches) == 34
    for b in batches:
        assert isinstance(b, Batch)
        assert b.latents is None and b.mask is None
        assert b.images.dtype == torch.float32 and b.images.shape[1] == 3
        assert b.images.min() >= -1 and b.images.max() <= 1
        assert b.loss_weight.tolist() == [1.0] * len(b)
        assert len(b.sizes) == len(b) and len(b.captions) == len(b)
    assert data.tag_frequency()["10_mychar"] == {"mychar": 3, "red hair": 1, "smile": 1}
    assert data.tag_frequency()["2_style"] == {"style": 2}


def test_missing_and_empty_dataset_raise_before_model_work(tmp_path):
    with pytest.raises(UserError) as e:
        TrainData(cfg_for(tmp_path / "nope"), batch_size=1, seed=0)
    assert e.value.field == "data.dataset_dir"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        TrainData(cfg_for(tmp_path / "empty"), batch_size=1, seed=0)
    assert e.value.field == "data.dataset_dir"
    assert check_dataset(cfg_for(tmp_path / "empty")).images == 0


def test_order_is_deterministic_and_resumes(kohya_dir):
    cfg = cfg_for(kohya_dir, shuffle_tags=True, flip=True, crop="random")
    a = TrainData(cfg, batch_size=2, seed=7)
    b = TrainData(cfg, batch_size=2, seed=7)
    run_a = [(x.captions, x.images) for x in a.batches(1)]
    run_b = [(x.captions, x.images) for x in b.batches(1)]
    assert [c for c, _ in run_a] == [c for c, _ in run_b]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(run_a, run_b))
    other = [x.keys for x in TrainData(cfg, batch_size=2, seed=8).batches(1)]
    assert other != [x.keys for x in a.batches(1)]
    # stop after 5 batches, save, resume in a fresh object
    c = TrainData(cfg, batch_size=2, seed=7)
    it = c.batches(1)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(c.state_dict()))
    assert (state["epoch"], state["batch_index"]) == (1, 5)
    d = TrainData(cfg, batch_size=2, seed=7)
    d.load_state_dict(state)
    assert d.state_dict() == state
    rest = [(x.captions, x.images) for x in d.batches(state["epoch"], start=state["batch_index"])]
    assert len(rest) == len(run_a) - 5
    assert [r[0] for r in rest] == [r[0] for r in run_a[5:]]
    assert all(torch.equal(x[1], y[1]) for x, y in zip(rest, run_a[5:]))
    # a trainer that skips by itself gets the same batches: load_state_dict never skips
    skipped = [x.captions for i, x in enumerate(d.batches(1)) if i >= 5]
    assert skipped == [r[0] for r in run_a[5:]]


def test_cached_latents_replace_images(kohya_dir):
    data = TrainData(cfg_for(kohya_dir), batch_size=2, seed=0)
    calls = []
    data.cache_latents(fake_encode, "vae-a", progress=lambda done, total: calls.append(
        (done, total)))
    assert calls[-1] == (5, 5)
    for b in data.batches(0):
        assert b.images is None
        h, w = b.sizes[0][4], b.sizes[0][5]
        assert b.latents.shape == (len(b), 4, h // 8, w // 8)


def test_report_json_shape(kohya_dir):
    report = check_dataset(cfg_for(kohya_dir), batch_size=2)
    assert isinstance(report, DatasetReport)
    obj = json.loads(report.to_json())
    assert {"images", "repeats_total", "buckets", "problems"} <= set(obj)
    assert obj["images"] == 5 and obj["repeats_total"] == 34
    assert sum(obj["buckets"].values()) == 5
    assert all(set(p) == {"path", "kind", "detail"} for p in obj["problems"])
    assert "Steps per epoch at batch size 2" in report.summary_text()
