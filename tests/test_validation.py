"""Validation loss: held-out images picked by the seed (or a folder), measured at fixed timesteps
with fixed noise in eval mode, so values compare across steps and runs; the training itself is
unchanged by it (with images held out: the same as training on the dataset without them)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import small_run_config

from lora_train_ext.core import optim as O
from lora_train_ext.core.bundle import TrainControl
from lora_train_ext.core.config import RunConfig
from lora_train_ext.core.data import TrainData
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.lora_file import load_lora
from lora_train_ext.core.models.tiny import build_bundle
from lora_train_ext.core.preflight import preflight
from lora_train_ext.core.trainer import train
from lora_train_ext.core.validation import fixed_timesteps

SHAPES = "4_shapes"


@pytest.fixture(scope="module")
def bundle():
    return build_bundle("sd1", "tiny", seed=0)


def _data_cfg(dataset: str, **kw) -> RunConfig:
    cfg = RunConfig()
    cfg.data.dataset_dir = dataset
    cfg.data.resolution = "64"
    cfg.data.enable_buckets = False
    for k, v in kw.items():
        setattr(cfg.data, k, v)
    return cfg


def _names(data: TrainData) -> list[str]:
    return sorted(os.path.basename(i.path) for i in data.train_scan.items)


def test_held_out_images_are_picked_by_the_seed_and_left_out_of_training(demo_dataset):
    cfg = _data_cfg(demo_dataset, validation_count=2)
    train_part = TrainData(cfg.data, batch_size=2, seed=0)
    val_part = TrainData(cfg.data, batch_size=2, seed=0, split="validation")
    everything = TrainData(_data_cfg(demo_dataset).data, batch_size=2, seed=0)
    assert len(_names(everything)) == 8
    assert len(_names(val_part)) == 2 and len(_names(train_part)) == 6
    assert sorted(_names(train_part) + _names(val_part)) == _names(everything)
    assert train_part.num_images == 6 and train_part.repeats_total == 6 * 4  # 4_shapes: x4
    assert val_part.repeats_total == 2  # each validation image once
    assert any("held out for validation" in n for n in train_part.report.notes)
    # the same seed picks the same images; other seeds others
    assert _names(TrainData(cfg.data, batch_size=1, seed=0, split="validation")) == \
        _names(val_part)
    picks = {tuple(_names(TrainData(cfg.data, batch_size=1, seed=s, split="validation")))
             for s in range(6)}
    assert len(picks) > 1
    # nothing random in what validation reads
    cfg.data.flip, cfg.data.shuffle_tags, cfg.data.caption_dropout = True, True, 0.5
    view = TrainData(cfg.data, batch_size=2, seed=0, split="validation").cfg
    assert not view.flip and not view.shuffle_tags and view.caption_dropout == 0
    assert view.crop == "center" and not view.color_aug


def test_validation_settings_are_checked_before_any_model_work(demo_dataset, tmp_path):
    with pytest.raises(UserError) as e:
        TrainData(_data_cfg(demo_dataset, validation_count=8).data, batch_size=1, seed=0)
    assert e.value.field == "data.validation_count"
    cfg = _data_cfg(demo_dataset, validation_count=2, validation_dir=demo_dataset)
    assert "data.validation_dir" in {p.field for p in cfg.problems()}
    cfg = _data_cfg(demo_dataset, validation_dir=str(tmp_path / "missing"))
    assert "data.validation_dir" in {p.field for p in preflight(cfg).problems}
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = _data_cfg(demo_dataset, validation_dir=str(empty))
    assert "data.validation_dir" in {p.field for p in preflight(cfg).problems}


def test_fixed_timesteps_spread_over_the_range():
    assert fixed_timesteps(0, 1000, 4) == [125, 375, 625, 875]
    assert fixed_timesteps(200, 300, 1) == [250]
    assert fixed_timesteps(0, 3, 5) == [0, 0, 1, 2, 2]


def _without(dataset: str, root, names: list[str]) -> str:
    """A copy of the demo dataset without `names` (and their captions)."""
    out = root / "without"
    shutil.copytree(dataset, out, ignore=shutil.ignore_patterns(".latent_cache"))
    for name in names:
        stem = os.path.splitext(name)[0]
        for ext in (".png", ".txt"):
            os.remove(out / SHAPES / (stem + ext))
    return str(out)


def _history(result) -> list[dict]:
    with open(result.history_path) as f:
        return json.load(f)


# The setup that learns reliably on the demo data: rank 2, AdamW lr 2e-2, batch 2, 30 steps.
STEPS, LR, EVERY = 30, 2e-2, 10
MARGIN = 0.9  # the last validation loss is below 90% of the one before training


def test_validation_loss_falls_is_reproducible_and_leaves_training_alone(bundle, demo_dataset,
                                                                         tmp_path):
    events = []
    control = TrainControl(lambda e: events.append(e) if e.kind == "validation" else None)
    cfg = small_run_config(tmp_path / "val", demo_dataset, STEPS, lr=LR, batch_size=2,
                           data__validation_count=2, train__validate_every_steps=EVERY)
    result = train(bundle, cfg, control)
    steps = [s for s, _ in result.val_losses]
    assert steps == [0, 10, 20, 30]
    assert [(e.step, e.loss) for e in events] == result.val_losses
    first, last = result.val_losses[0][1], result.val_losses[-1][1]
    print(f"validation loss: step 0 {first:.4f}, step {STEPS} {last:.4f}")
    assert last < MARGIN * first, result.val_losses
    history = _history(result)
    assert history[0] == {"step": 0, "val_loss": first}
    assert [h["step"] for h in history[1:]] == list(range(1, STEPS + 1))
    assert {h["step"]: h["val_loss"] for h in history if "val_loss" in h} == \
        dict(result.val_losses)
    assert result.validation_seconds > 0

    # the same seed, the same values (a shorter run: its steps 0 and 10 are the same steps)
    again = train(bundle, small_run_config(
        tmp_path / "again", demo_dataset, EVERY, lr=LR, batch_size=2, data__validation_count=2,
        train__validate_every_steps=EVERY))
    assert again.val_losses == result.val_losses[:2]

    # without validation, on the dataset without the two held-out images: the same weights
    held = _names(TrainData(cfg.data, batch_size=2, seed=0, split="validation"))
    plain = train(bundle, small_run_config(tmp_path / "plain", _without(demo_dataset, tmp_path,
                                                                        held),
                                           STEPS, lr=LR, batch_size=2))
    assert plain.val_losses == [] and "val_loss" not in json.dumps(_history(plain))
    a, b = load_lora(result.path)[0], load_lora(plain.path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plain.losses == result.losses
    assert result.metadata["ss_num_train_images"] == plain.metadata["ss_num_train_images"] == "6"


@pytest.mark.parametrize("optimizer", ["AdamW", "AdamWScheduleFree"])
def test_a_validation_folder_does_not_change_what_the_run_trains(optimizer, bundle, demo_dataset,
                                                                 tmp_path):
    """UNet and text encoder trained, network dropout and flips drawing from the RNGs: the
    weights are bit-identical with a validation folder measured every step."""
    ok, why = O.available_optimizers()[optimizer]
    if not ok:
        pytest.skip(why)
    folder = tmp_path / "valdir"
    folder.mkdir()
    for stem in ("00_red_circle", "05_blue_triangle"):
        for ext in (".png", ".txt"):
            shutil.copy(os.path.join(demo_dataset, SHAPES, stem + ext), folder / (stem + ext))
    common = dict(optim__optimizer=optimizer, network__dropout=0.1, data__flip=True,
                  data__cache_latents=False)
    plain = train(bundle, small_run_config(tmp_path / "a", demo_dataset, 4, lr=1e-2,
                                           batch_size=2, **common))
    checked = train(bundle, small_run_config(
        tmp_path / "b", demo_dataset, 4, lr=1e-2, batch_size=2, data__validation_dir=str(folder),
        train__validate_every_steps=1, train__validation_timesteps=2, **common))
    assert [s for s, _ in checked.val_losses] == [0, 1, 2, 3, 4]
    a, b = load_lora(plain.path)[0], load_lora(checked.path)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain.losses == checked.losses


def test_validation_noise_follows_the_image_not_the_seed_or_order(bundle, demo_dataset, tmp_path):
    """A LoRA starts as no change at all (up weights 0), so the loss before training depends only
    on the validation images, timesteps and noise: the same under another training seed, which
    orders the images differently."""
    folder = tmp_path / "valdir"
    folder.mkdir()
    for stem in ("01_blue_square", "02_green_triangle", "06_green_circle"):
        for ext in (".png", ".txt"):
            shutil.copy(os.path.join(demo_dataset, SHAPES, stem + ext), folder / (stem + ext))
    plans = []
    for seed in (0, 3):
        data = TrainData(_data_cfg(demo_dataset, validation_dir=str(folder)).data, batch_size=2,
                         seed=seed, split="validation")
        plans.append([sorted(os.path.basename(data.items[i].path) for i in b)
                      for b in data.epoch_plan(0)])
    assert plans[0] != plans[1]  # other batches, in another order
    first = {}
    for seed in (0, 3):
        cfg = small_run_config(tmp_path / f"s{seed}", demo_dataset, 1, lr=1e-2, batch_size=2,
                               data__validation_dir=str(folder), train__seed=seed)
        first[seed] = train(bundle, cfg).val_losses[0]
    assert first[0][0] == first[3][0] == 0
    assert first[0][1] == pytest.approx(first[3][1], rel=1e-6)


def test_run_manager_keeps_the_validation_losses(demo_dataset, tmp_path):
    from lora_train_ext.host.standalone import StandaloneHost
    from lora_train_ext.runs import RunManager

    manager = RunManager(StandaloneHost(str(tmp_path)))
    cfg = RunConfig.from_dict({
        "data": {"dataset_dir": demo_dataset, "resolution": "64", "enable_buckets": False,
                 "validation_count": 1},
        "train": {"max_steps": 2, "dtype": "fp32", "batch_size": 2, "ema": True},
        "optim": {"lr": 0.01}, "network": {"rank": 2}, "save": {"output_name": "validated"}})
    record = manager.execute(manager.create(cfg))
    assert record.state == "finished", record.error
    assert [s for s, _ in record.val_history] == [0, 2]
    data = record.to_json()
    assert data["val_loss"] == record.val_history[-1][1] and len(data["val_history"]) == 2
    assert [os.path.basename(p) for p in record.files] == ["validated.safetensors",
                                                           "validated-ema.safetensors"]
