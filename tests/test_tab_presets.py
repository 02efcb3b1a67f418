"""The tab's presets and config files go through the run manager: saved presets appear in the
list and fill the form, built-ins cannot be deleted, and a kohya config or our own TOML fills
the form with its values."""

from __future__ import annotations

import os

import pytest

from lora_train_ext.core.config import RunConfig
from lora_train_ext.core.errors import UserError
from lora_train_ext.host.standalone import StandaloneHost
from lora_train_ext.runs import RunManager

HERE = os.path.dirname(__file__)


@pytest.fixture()
def manager(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_TRAIN_PRESETS_DIR", str(tmp_path / "presets"))
    return RunManager(StandaloneHost(str(tmp_path / "host")))


def test_saved_preset_is_listed_and_comes_back(manager):
    cfg = manager.preset_config("easy-prodigy")
    cfg.network.rank = 24
    manager.save_preset("mine", cfg)
    assert manager.presets()[-1] == "mine" and "easy-prodigy" in manager.presets()
    back = manager.preset_config("mine")
    assert back.network.rank == 24 and back.optim.optimizer == "Prodigy"
    assert back.data.max_token_length == 225
    with pytest.raises(UserError):
        manager.delete_preset("easy-prodigy")
    manager.delete_preset("mine")
    assert "mine" not in manager.presets()


def test_defaults_follow_the_model(manager):
    cfg = manager.preset_config("default (AdamW, rank 8)")
    assert cfg.data.resolution == "64" and cfg.train.dtype == "fp32"  # the tiny model, CPU


def test_config_files_fill_the_form(manager, tmp_path):
    ours = RunConfig()
    ours.network.rank = 12
    ours.optim.optimizer = "Lion"
    ours.write(str(tmp_path / "run.config.toml"))
    cfg, notes = manager.load_config_file(str(tmp_path / "run.config.toml"))
    assert (cfg.network.rank, cfg.optim.optimizer, notes) == (12, "Lion", [])
    cfg, notes = manager.load_config_file(os.path.join(HERE, "data", "kohya_ss_gui.json"))
    assert any("kohya settings taken" in n for n in notes)
    cfg.validate()
    with pytest.raises(UserError) as e:
        manager.load_config_file(str(tmp_path / "missing.toml"))
    assert e.value.field == "config file"
