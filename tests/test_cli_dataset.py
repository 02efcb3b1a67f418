"""`python -m lora_train_ext check-dataset` on a clean and a messy folder."""

from __future__ import annotations

import json

from PIL import Image

from test_checkpoint_and_cli import run_cli


def _img(path, size=(96, 96), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)


def test_check_dataset_reports_every_problem_kind(tmp_path):
    root = tmp_path / "messy"
    good = root / "3_thing"
    good.mkdir(parents=True)
    _img(good / "a.png")
    (good / "a.txt").write_text("thing, red")
    _img(good / "dup.png")
    _img(good / "dup.jpg")
    (good / "dup.txt").write_text("thing")
    _img(good / "nocap.png")
    _img(good / "empty.png")
    (good / "empty.txt").write_text("   ")
    (good / "broken.jpg").write_bytes(b"not a jpeg at all")
    _img(good / "tiny.png", size=(20, 20))
    (good / "tiny.txt").write_text("thing")
    (root / "bad_folder_name").mkdir()
    _img(root / "bad_folder_name" / "x.png")

    proc = run_cli("check-dataset", str(root), "--json", "--resolution", "64")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    kinds = {p["kind"] for p in report["problems"]}
    assert {"duplicate_stem", "unreadable", "missing_caption", "empty_caption", "too_small",
            "bad_repeat_folder"} <= kinds
    assert report["images"] >= 5 and report["repeats_total"] == 3 * report["images"]
    assert all(p["path"] for p in report["problems"])
    text = run_cli("check-dataset", str(root), "--resolution", "64").stdout
    assert "broken.jpg" in text and "duplicate" in text.lower()


def test_check_dataset_empty_folder_exits_1(tmp_path):
    proc = run_cli("check-dataset", str(tmp_path), "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["images"] == 0
