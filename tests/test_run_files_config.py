"""What a run writes beside its file: the history as JSON, CSV and (when the tensorboard package
is there) TensorBoard events, and its whole config as a versioned TOML that reads back to the same
bytes and, given to the demo again, trains the same weights."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys

import pytest
import torch

from conftest import small_run_config
from lora_train_ext import cli
from lora_train_ext.core import run_files as F
from lora_train_ext.core.presets import PRESETS
from lora_train_ext.core.config import (CONFIG_VERSION, RunConfig, migrate,
                                        read_config_file, to_toml)
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.lora_file import load_lora
from lora_train_ext.core.models.tiny import build_bundle
from lora_train_ext.core.trainer import train
from lora_train_ext.demo import demo_dataset_dir


@pytest.fixture(scope="module")
def bundle():
    return build_bundle("sd1", "tiny", seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """Three demo images in a flat folder: with batch 1, an epoch is 3 steps."""
    folder = tmp_path_factory.mktemp("data") / "img"
    folder.mkdir()
    source = os.path.join(demo_dataset_dir(), "4_shapes")
    for stem in ("00_red_circle", "01_blue_square", "02_green_triangle"):
        for ext in (".png", ".txt"):
            shutil.copy(os.path.join(source, stem + ext), folder / (stem + ext))
    return str(folder)


def read_csv(path: str) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# -- history: JSON and CSV ------------------------------------------------------------------------
def test_history_csv_has_one_line_per_step_with_the_json_values(bundle, images, tmp_path):
    cfg = small_run_config(tmp_path, images, steps=5, lr=1e-3, batch_size=1,
                           network__loraplus_ratio=4.0, save__save_every_steps=2)
    result = train(bundle, cfg)
    with open(result.history_path, encoding="utf-8") as f:
        history = json.load(f)
    rows = read_csv(os.path.join(tmp_path, "demo_lora.history.csv"))
    assert len(rows) == result.steps + 1 == 6  # the header and one line per optimizer step
    groups = list(history[0]["lr"])
    assert set(groups) == {"unet", "unet_up", "te", "te_up"}  # LoRA+: the up weights' own group
    assert rows[0] == ["step", "epoch", "loss", *(f"lr_{g}" for g in groups), "seconds"]
    for entry, row in zip(history, rows[1:]):
        assert int(row[0]) == entry["step"]
        assert int(row[1]) == entry["epoch"]
        assert float(row[2]) == entry["loss"]  # exactly: written as Python writes floats
        assert [float(v) for v in row[3:-1]] == [entry["lr"][g] for g in groups]
        assert float(row[-1]) == entry["seconds"]
    assert [e["step"] for e in history] == [1, 2, 3, 4, 5]
    assert [e["epoch"] for e in history] == [1, 1, 1, 2, 2]  # 3 steps an epoch
    seconds = [e["seconds"] for e in history]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    assert history[-1]["lr"] == result.lrs


def test_history_csv_of_a_snapshot_is_written_with_the_json(bundle, images, tmp_path):
    """At a snapshot both files hold the steps so far (the same moments as the JSON)."""
    seen = {}
    cfg = small_run_config(tmp_path, images, steps=3, lr=1e-3, batch_size=1,
                           save__save_every_steps=2)
    from lora_train_ext.core.bundle import TrainControl

    def on_event(event):
        if event.kind == "snapshot":
            with open(os.path.join(tmp_path, "demo_lora.history.json")) as f:
                seen["json"] = json.load(f)
            seen["csv"] = read_csv(os.path.join(tmp_path, "demo_lora.history.csv"))
    train(bundle, cfg, TrainControl(on_event))
    assert [e["step"] for e in seen["json"]] == [1, 2]
    assert [r[0] for r in seen["csv"][1:]] == ["1", "2"]


def test_history_csv_of_an_older_history_leaves_missing_values_empty():
    text = F.history_csv([{"step": 1, "loss": 0.5, "lr": {"unet": 1e-4}},
                          {"step": 2, "epoch": 1, "loss": 0.25, "lr": {"unet": 1e-4, "te": 5e-5},
                           "seconds": 1.5}])
    assert text.splitlines() == ["step,epoch,loss,lr_unet,lr_te,seconds",
                                 "1,,0.5,0.0001,,", "2,1,0.25,0.0001,5e-05,1.5"]


# -- TensorBoard ----------------------------------------------------------------------------------
def test_without_tensorboard_no_event_files_and_no_error(bundle, images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    result = train(bundle, small_run_config(tmp_path, images, steps=2, lr=1e-3, batch_size=1))
    assert result.steps == 2
    assert not os.path.exists(os.path.join(tmp_path, "demo_lora.tensorboard"))


def test_tensorboard_events_hold_loss_and_lr_per_step(bundle, images, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small_run_config(tmp_path, images, steps=4, lr=1e-3, batch_size=1)
    result = train(bundle, cfg)
    folder = os.path.join(tmp_path, "demo_lora.tensorboard")
    acc = EventAccumulator(folder)
    acc.Reload()
    with open(result.history_path) as f:
        history = json.load(f)
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert [e.value for e in acc.Scalars("lr/unet")] == pytest.approx(
        [h["lr"]["unet"] for h in history], rel=1e-6)
    # a fresh run of the same name replaces the events; it does not add a second curve
    train(bundle, cfg)
    acc = EventAccumulator(folder)
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]


# -- the run's config as TOML ----------------------------------------------------------------------
def test_a_run_writes_its_whole_config_as_versioned_toml(bundle, images, tmp_path):
    cfg = small_run_config(tmp_path, images, steps=2, lr=1e-3, batch_size=1,
                           optim__te_lr=5e-5, data__caption_prefix='say "hi" \\ ')
    train(bundle, cfg)
    path = os.path.join(tmp_path, "demo_lora.config.toml")
    raw = read_config_file(path)
    assert raw["version"] == CONFIG_VERSION
    assert RunConfig.read(path) == cfg
    with open(path, encoding="utf-8") as f:
        assert f.read() == to_toml(cfg.to_dict())


def test_the_saved_config_is_the_one_given_and_goes_to_the_run_folder(bundle, images, tmp_path):
    """The run fills in the disk cache's folder for itself; the saved config keeps it empty, so
    it runs again anywhere. Run files go to save.run_dir, the LoRA to the output folder."""
    cfg = small_run_config(tmp_path / "lora", images, steps=1, lr=1e-3, batch_size=1,
                           data__cache_to_disk=True, save__run_dir=str(tmp_path / "run"))
    given = RunConfig.from_dict(cfg.to_dict())
    train(bundle, cfg)
    saved = RunConfig.read(str(tmp_path / "run" / "demo_lora.config.toml"))
    assert saved == given and saved.data.cache_dir == ""
    assert (tmp_path / "run" / "demo_lora.history.csv").is_file()
    assert sorted(os.listdir(tmp_path / "lora")) == ["demo_lora.json", "demo_lora.safetensors"]


def _odd_config() -> RunConfig:
    cfg = RunConfig.from_dict(PRESETS["easy-prodigy"])
    cfg.data.dataset_dir = "C:\\data\\10_ä \"quoted\" \t tab"
    cfg.data.caption_prefix = "line\nbreak, \u00e9, \U0001f600, del\x7f"
    cfg.optim.lr = 1e-05
    cfg.optim.unet_lr = None
    cfg.optim.te_lr = 0.0
    cfg.train.seed = 2**63 - 1
    cfg.network.init_seed = 12345
    cfg.loss.huber_delta = 1 / 3
    cfg.save.comment = "'single' and [brackets] = # not a comment"
    return cfg.validate()


@pytest.mark.parametrize("make", [RunConfig, _odd_config] + [
    (lambda n=n: RunConfig.from_dict(PRESETS[n])) for n in PRESETS], ids=lambda m: getattr(
        m, "__name__", "preset"))
def test_toml_save_load_save_is_byte_identical(make, tmp_path):
    cfg = make()
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    cfg.write(str(first))
    loaded = RunConfig.read(str(first))
    assert loaded == cfg
    loaded.write(str(second))
    assert first.read_bytes() == second.read_bytes()


def test_toml_reads_the_same_with_the_toml_package_python_3_10_has():
    """The WebUI's Python 3.10 has no tomllib; its `toml` package must read what we write."""
    toml = pytest.importorskip("toml")
    text = to_toml(_odd_config().to_dict())
    try:
        import tomllib
    except ImportError:
        pytest.skip("no tomllib to compare with")
    assert toml.loads(text) == tomllib.loads(text)


# -- config versions -------------------------------------------------------------------------------
VERSION_1_FILE = """\
version = 1

[network]
rank = 16
alpha = 8.0

[optim]
optimizer = "prodigy"
lr = 1.0

[train]
max_steps = 300
"""


def test_a_version_1_file_loads(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text(VERSION_1_FILE, encoding="utf-8")
    cfg = RunConfig.read(str(path))
    assert (cfg.network.rank, cfg.network.alpha, cfg.optim.optimizer, cfg.train.max_steps) == \
        (16, 8.0, "Prodigy", 300)
    assert cfg.version == CONFIG_VERSION


def test_a_file_without_version_is_read_as_the_current_one():
    assert RunConfig.from_dict({"network": {"rank": 4}}).network.rank == 4


@pytest.mark.parametrize("version", [CONFIG_VERSION + 1, 99, 0, -1, "2", 1.5, True])
def test_an_unknown_version_is_refused_with_a_message(version, tmp_path):
    path = tmp_path / "future.json"
    path.write_text(json.dumps({"version": version, "network": {"rank": 4}}), encoding="utf-8")
    with pytest.raises(UserError) as e:
        RunConfig.read(str(path))
    assert e.value.field == "version"
    assert f"{version!r}" in e.value.message
    if isinstance(version, int) and not isinstance(version, bool) and version > CONFIG_VERSION:
        assert "newer" in e.value.message


def test_migrate_leaves_a_current_config_as_it_is():
    data = RunConfig().to_dict()
    assert migrate(dict(data)) == data


def test_a_future_version_given_to_the_demo_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "future.toml"
    path.write_text(f"version = {CONFIG_VERSION + 1}\n", encoding="utf-8")
    code = cli.main(["demo", "--config", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --config"), err
    assert "newer" in err


# -- the saved config trains the same weights again ------------------------------------------------
def test_rerunning_the_demo_from_its_saved_toml_gives_bit_identical_weights(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli.main(["demo", "--out", str(first), "--steps", "3", "--rank", "2",
                     "--batch-size", "2", "--lr", "1e-3", "--scheduler", "cosine",
                     "--warmup", "1", "--dropout", "0.1", "--flip"]) == 0
    saved = first / "demo_lora.config.toml"
    assert saved.is_file()
    assert cli.main(["demo", "--config", str(saved), "--out", str(second)]) == 0
    capsys.readouterr()
    a, _ = load_lora(str(first / "demo_lora.safetensors"))
    b, _ = load_lora(str(second / "demo_lora.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the second run's config is the first's but for the output folder and the tiny
    # checkpoint the demo writes there
    one, two = RunConfig.read(str(saved)), RunConfig.read(str(second / "demo_lora.config.toml"))
    assert one.save.output_dir != two.save.output_dir
    two.save.output_dir = one.save.output_dir
    two.model.checkpoint = one.model.checkpoint
    assert one == two

