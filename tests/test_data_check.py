"""The dataset check: every problem kind, layouts and repeats, regularization, masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lora_train_ext.core.config import DataConfig
from lora_train_ext.core.data import PROBLEM_KINDS, TrainData, check_dataset
from lora_train_ext.core.errors import UserError


def img(path, size=(64, 64), seed=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 4), np.uint8)
    if mode == "RGBA":
        arr[:, : w // 2, 3] = 0
        arr[:, w // 2:, 3] = 255
        Image.fromarray(arr, "RGBA").save(path)
    else:
        Image.fromarray(arr[..., :3], "RGB").save(path)
    return path


def cfg(root, **kw):
    base = dict(dataset_dir=str(root), resolution="64", min_bucket_side=32, max_bucket_side=128,
                bucket_step=32)
    base.update(kw)
    return DataConfig(**base)


# kind -> (build the case under root, the path the problem names, relative to root)
CASES = {
    "duplicate_stem": (lambda r: (img(r / "5_x" / "a.png"), img(r / "5_x" / "a.jpg")),
                       "5_x/a.png"),
    "unreadable": (lambda r: (r / "5_x").mkdir(parents=True, exist_ok=True) or
                   (r / "5_x" / "broken.png").write_bytes(b"garbage"), "5_x/broken.png"),
    "missing_caption": (lambda r: img(r / "5_x" / "nocap.png"), "5_x/nocap.png"),
    "empty_caption": (lambda r: (img(r / "5_x" / "e.png"),
                                 (r / "5_x" / "e.txt").write_text(" \n ,, ")), "5_x/e.txt"),
    "too_small": (lambda r: img(r / "5_x" / "tiny.png", (12, 12)), "5_x/tiny.png"),
    "bad_repeat_folder": (lambda r: img(r / "images" / "y.png"), "images"),
    "long_caption": (lambda r: (img(r / "5_x" / "l.png"),
                                (r / "5_x" / "l.txt").write_text(", ".join(["tag"] * 80))),
                     "5_x/l.png"),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_problem_kind(tmp_path, kind):
    root = tmp_path / "ds"
    build, where = CASES[kind]
    build(root)
    img(root / "5_x" / "good.png", seed=9)
    (root / "5_x" / "good.txt").write_text("fine")
    report = check_dataset(cfg(root))
    found = [p for p in report.problems if p.kind == kind]
    assert [p.path for p in found] == [str(root / where)], report.summary_text()
    assert found[0].detail
    assert kind in PROBLEM_KINDS
    obj = json.loads(report.to_json())
    assert {"path": str(root / where), "kind": kind, "detail": found[0].detail} in obj["problems"]
    assert kind in report.summary_text()


def test_bad_repeat_folder_zero_and_hidden(tmp_path):
    img(tmp_path / "0_none" / "a.png")
    img(tmp_path / ".hidden" / "b.png")
    img(tmp_path / "3_ok" / "c.png")
    (tmp_path / "logs").mkdir()  # no images: not a problem
    report = check_dataset(cfg(tmp_path))
    assert [(p.kind, p.path) for p in report.problems if p.kind == "bad_repeat_folder"] == [
        ("bad_repeat_folder", str(tmp_path / "0_none"))]
    assert report.images == 1 and report.repeats_total == 3


def test_messy_folder_never_crashes_and_trains_on_the_rest(tmp_path):
    root = tmp_path / "all"
    for kind in CASES:
        CASES[kind][0](root)
    data = TrainData(cfg(root), batch_size=2, seed=0)
    kinds = {p.kind for p in data.report.problems}
    assert kinds == set(CASES)
    # a.png, a.jpg, nocap, e, tiny, l (broken.png unreadable, images/ skipped)
    assert data.num_images == 6
    assert sum(len(b) for b in data.batches(0)) == 6 * 5
    text = data.report.summary_text()
    assert "unreadable x1" in text and "Steps per epoch" in text


def test_image_unreadable_at_run_time_is_skipped(tmp_path):
    for i in range(3):
        img(tmp_path / "1_x" / f"{i}.png", seed=i)
    data = TrainData(cfg(tmp_path), batch_size=3, seed=0)
    (tmp_path / "1_x" / "1.png").write_bytes(b"gone bad")
    batches = list(data.batches(0))
    assert sum(len(b) for b in batches) == 2
    assert [p.kind for p in data.report.problems] == ["missing_caption"] * 3 + ["unreadable"]


@pytest.mark.parametrize("layout, repeats, images, total, meta", [
    ({"a.png": None, "b.png": None}, 3, 2, 6, {"ds": {"n_repeats": 3, "img_count": 2}}),
    ({"10_c/a.png": None, "2_d/b.png": None, "2_d/c.png": None}, 1, 3, 14,
     {"10_c": {"n_repeats": 10, "img_count": 1}, "2_d": {"n_repeats": 2, "img_count": 2}}),
    ({"root.png": None, "4_c/a.png": None}, 2, 2, 6,
     {"ds": {"n_repeats": 2, "img_count": 1}, "4_c": {"n_repeats": 4, "img_count": 1}}),
])
def test_layouts_and_repeats(tmp_path, layout, repeats, images, total, meta):
    root = tmp_path / "ds"
    for i, rel in enumerate(layout):
        img(root / rel, seed=i)
    data = TrainData(cfg(root, repeats=repeats), batch_size=1, seed=0)
    assert (data.num_images, data.report.repeats_total, data.steps_per_epoch) == (
        images, total, total)
    assert data.dataset_dirs_meta() == meta
    assert sum(len(b) for b in data.batches(3)) == total
    if "root.png" in layout:
        assert any("directly in the dataset folder" in n for n in data.report.notes)


@pytest.mark.parametrize("caption_file, ext, default, trigger, expect", [
    ("cap from file", ".txt", "", "", "cap from file"),
    ("cap from file", ".caption", "", "", "cap from file"),
    (None, ".txt", "", "", "mychar"),                    # folder class name
    (None, ".txt", "a photo", "", "a photo"),            # default caption wins over class
    (None, ".txt", "", "sks", "sks, mychar"),
    ("x, sks, y", ".txt", "", "sks", "sks, x, y"),
    ("line one\nline two", "caption", "", "", "line one, line two"),  # ext without dot
])
def test_caption_sources(tmp_path, caption_file, ext, default, trigger, expect):
    img(tmp_path / "3_mychar" / "a.png")
    if caption_file is not None:
        suffix = ext if ext.startswith(".") else "." + ext
        (tmp_path / "3_mychar" / f"a{suffix}").write_text(caption_file, encoding="utf-8")
    data = TrainData(cfg(tmp_path, caption_extension=ext, default_caption=default,
                         trigger_word=trigger), batch_size=1, seed=0)
    assert {c for b in data.batches(0) for c in b.captions} == {expect}


def test_regularization_balanced_and_weighted(tmp_path):
    for i in range(3):
        img(tmp_path / "train" / "5_sks dog" / f"{i}.png", seed=i)
    for i in range(4):
        img(tmp_path / "reg" / "1_dog" / f"{i}.png", seed=10 + i)
    c = cfg(tmp_path / "train", reg_dir=str(tmp_path / "reg"), prior_loss_weight=0.5,
            trigger_word="sks")
    data = TrainData(c, batch_size=4, seed=0)
    assert data.report.reg_images == 4 and data.report.reg_repeats_total == 15
    samples = [(k, w, r, cap) for b in data.batches(0)
               for k, w, r, cap in zip(b.keys, b.loss_weight.tolist(), b.is_reg, b.captions)]
    assert len(samples) == 30
    reg = [s for s in samples if s[2]]
    assert len(reg) == 15 and {s[1] for s in reg} == {0.5} and {s[3] for s in reg} == {"dog"}
    assert {s[1] for s in samples if not s[2]} == {1.0}
    assert {s[3] for s in samples if not s[2]} == {"sks, sks dog"}  # no trigger on reg images
    counts = sorted(sum(1 for s in reg if s[0].endswith(f"{i}.png")) for i in range(4))
    assert counts == [3, 4, 4, 4]  # spread as evenly as kohya does
    assert data.reg_dataset_dirs_meta() == {"1_dog": {"n_repeats": 1, "img_count": 4}}
    assert "reg_images" in json.loads(data.report.to_json())


def test_too_many_reg_images_use_a_fixed_subset(tmp_path):
    img(tmp_path / "train" / "2_a" / "0.png")
    for i in range(6):
        img(tmp_path / "reg" / "1_b" / f"{i}.png", seed=i)
    c = cfg(tmp_path / "train", reg_dir=str(tmp_path / "reg"))
    data = TrainData(c, batch_size=1, seed=0)
    assert data.report.reg_repeats_total == 2
    assert any("not used" in n for n in data.report.notes)
    e0 = sorted(k for b in data.batches(0) for k in b.keys)
    e1 = sorted(k for b in data.batches(1) for k in b.keys)
    assert e0 == e1  # the same subset every epoch: steps per epoch stay fixed


def test_missing_reg_dir_and_bad_settings(tmp_path):
    img(tmp_path / "1_a" / "x.png")
    with pytest.raises(UserError) as e:
        TrainData(cfg(tmp_path, reg_dir=str(tmp_path / "nope")), batch_size=1, seed=0)
    assert e.value.field == "data.reg_dir"
    with pytest.raises(UserError) as e:
        TrainData(cfg(tmp_path, resolution="abc"), batch_size=1, seed=0)
    assert e.value.field == "data.resolution"
    with pytest.raises(UserError) as e:
        TrainData(cfg(tmp_path), batch_size=0, seed=0)
    assert e.value.field == "train.batch_size"
    with pytest.raises(UserError) as e:
        TrainData(cfg(tmp_path, repeats=0), batch_size=1, seed=0)
    assert e.value.field == "data.repeats"


def test_empty_dataset_error_names_the_skipped_folder(tmp_path):
    img(tmp_path / "My_Lora" / "x.png")
    with pytest.raises(UserError) as e:
        TrainData(cfg(tmp_path), batch_size=1, seed=0)
    assert e.value.field == "data.dataset_dir" and "My_Lora" in str(e.value)
    report = check_dataset(cfg(tmp_path))
    assert not report.ok and "Nothing to train on" in report.summary_text()


def test_masks_from_alpha_and_mask_dir(tmp_path):
    img(tmp_path / "ds" / "1_a" / "alpha.png", (64, 64), mode="RGBA")
    img(tmp_path / "ds" / "1_a" / "masked.png", (64, 64), seed=1)
    img(tmp_path / "ds" / "1_a" / "plain.png", (64, 64), seed=2)
    (tmp_path / "masks").mkdir()
    m = np.zeros((64, 64), np.uint8)
    m[:32] = 255
    Image.fromarray(m, "L").save(tmp_path / "masks" / "masked.png")
    c = cfg(tmp_path / "ds", masked_loss=True, mask_dir=str(tmp_path / "masks"))
    data = TrainData(c, batch_size=1, seed=0)
    assert [p.path.endswith("plain.png") for p in data.report.problems
            if p.kind == "missing_mask"] == [True]

    def masks(d):
        return {b.keys[0].rsplit("/", 1)[-1]: b.mask[0] for b in d.batches(0)}

    live = masks(data)
    assert live["alpha.png"].shape == (1, 64, 64)
    assert live["alpha.png"][0, :, :30].max() == 0 and live["alpha.png"][0, :, 34:].min() == 1
    assert live["masked.png"][0, :30].min() == 1 and live["masked.png"][0, 34:].max() == 0
    assert live["plain.png"].min() == 1
    data.cache_latents(lambda x: torch.nn.functional.avg_pool2d(x, 8).repeat(1, 2, 1, 1)[:, :4],
                       "v")
    cached = masks(data)
    assert all(torch.allclose(live[k], cached[k], atol=1 / 255) for k in live)


def test_flip_color_and_preview(tmp_path):
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32] = 255
    (tmp_path / "1_a").mkdir()
    Image.fromarray(arr).save(tmp_path / "1_a" / "half.png")
    c = cfg(tmp_path, flip=True, repeats=1)
    data = TrainData(c, batch_size=1, seed=0)
    lefts = {float(b.images[0, 0, 0, 0]) for e in range(12) for b in data.batches(e)}
    assert lefts == {1.0, -1.0}  # both orientations appear over epochs
    c.color_aug = True
    jittered = TrainData(c, batch_size=1, seed=0)
    x = next(iter(jittered.batches(0))).images
    assert x.min() >= -1 and x.max() <= 1
    plain = next(iter(TrainData(cfg(tmp_path), batch_size=1, seed=0).batches(0))).images
    assert not torch.equal(x, plain)
    preview = jittered.preview(1)
    assert preview[0][0].size == (64, 64) and preview[0][1] == "a"


def test_dataset_fingerprint_change_adds_a_note(tmp_path):
    for i in range(3):
        img(tmp_path / "2_a" / f"{i}.png", seed=i)
    data = TrainData(cfg(tmp_path), batch_size=1, seed=0)
    it = data.batches(0)
    next(it)
    state = data.state_dict()
    img(tmp_path / "2_a" / "3.png", seed=3)
    other = TrainData(cfg(tmp_path), batch_size=1, seed=0)
    other.load_state_dict(state)
    assert any("dataset changed" in n for n in other.report.notes)
    assert len(list(other.batches(0, start=state["batch_index"]))) == other.steps_per_epoch - 1


def test_second_scan_does_not_decode_again(tmp_path, monkeypatch):
    from lora_train_ext.core.data import scan

    for i in range(3):
        img(tmp_path / "1_a" / f"{i}.png", seed=i)
    calls = []
    real = scan.inspect_image
    monkeypatch.setattr(scan, "inspect_image", lambda *a, **k: calls.append(a) or real(*a, **k))
    check_dataset(cfg(tmp_path))
    TrainData(cfg(tmp_path), batch_size=1, seed=0)
    assert len(calls) == 3
    img(tmp_path / "1_a" / "0.png", size=(128, 40), seed=5)  # a changed file: inspected again
    data = TrainData(cfg(tmp_path), batch_size=1, seed=0)
    assert len(calls) == 4 and data.report.buckets == {"64x64": 2, "96x32": 1}
