"""Presets: the built-ins (always valid, never overwritten or deleted) and the user's own, saved as
TOML of the settings that differ from the defaults; the `presets` command."""

from __future__ import annotations

import json
import os

import pytest

from lora_train_ext import cli
from lora_train_ext.core import presets as P
from lora_train_ext.core.config import RunConfig, read_config_file
from lora_train_ext.core.presets import PRESETS, builtin_preset as preset
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.optim import available_optimizers


def test_the_builtin_presets():
    assert list(PRESETS)[:2] == ["easy-dadaptadam", "easy-prodigy"]
    assert {"lowvram-sd15", "sdxl-12gb"} <= set(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_builtin_preset_passes_validate(name):
    cfg = preset(name).validate()
    assert cfg == P.load_preset(name)
    assert RunConfig.from_dict(read_toml_text(P.show_preset(name))) == cfg


def read_toml_text(text: str) -> dict:
    from lora_train_ext.core.config import _load_toml

    return _load_toml(text)


def test_low_vram_presets_follow_kohyas_advice():
    sd15, sdxl = preset("lowvram-sd15"), preset("sdxl-12gb")
    optimizer = "AdamW8bit" if available_optimizers()["AdamW8bit"][0] else "AdamW"
    for cfg in (sd15, sdxl):
        assert cfg.train.gradient_checkpointing and cfg.train.batch_size == 1
        assert cfg.data.cache_latents and cfg.optim.optimizer == optimizer
        assert 16 <= cfg.network.rank <= 32
        assert cfg.save.save_dtype in ("fp16", "bf16")
    assert (sd15.data.resolution, sd15.data.max_bucket_side) == ("512", 1024)
    assert (sdxl.data.resolution, sdxl.data.max_bucket_side) == ("1024", 2048)
    assert sdxl.network.train_on == "unet"  # kohya: "highly recommended for SDXL LoRA"


def test_save_list_load_delete_a_user_preset(tmp_path):
    cfg = preset("easy-prodigy")
    cfg.network.rank = 24
    cfg.data.dataset_dir = "/somewhere/images"  # one run's: not kept in a preset
    cfg.save.output_name = "run_name"
    path = P.save_preset("my-style", cfg, str(tmp_path))
    assert path == os.path.join(tmp_path, "my-style.toml")
    saved = read_config_file(path)
    assert saved["version"] == 1 and saved["network"]["rank"] == 24
    assert "dataset_dir" not in saved.get("data", {}) and "save" not in saved
    assert "model" not in saved  # only what differs from the defaults
    assert P.list_presets(str(tmp_path)) == [*PRESETS, "my-style"]
    loaded = P.load_preset("my-style", str(tmp_path))
    cfg.data.dataset_dir, cfg.save.output_name = "", RunConfig().save.output_name
    assert loaded == cfg
    # saving again replaces it; the file reads back to the same bytes
    before = open(path, "rb").read()
    P.save_preset("my-style", loaded, str(tmp_path))
    assert open(path, "rb").read() == before
    P.delete_preset("my-style", str(tmp_path))
    assert P.user_presets(str(tmp_path)) == [] and not os.path.exists(path)


@pytest.mark.parametrize("name", ["easy-prodigy", "EASY-PRODIGY", "sdxl-12gb"])
def test_builtins_cannot_be_overwritten_or_deleted(name, tmp_path):
    with pytest.raises(UserError, match="built-in"):
        P.save_preset(name, RunConfig(), str(tmp_path))
    with pytest.raises(UserError, match="built-in"):
        P.delete_preset(name, str(tmp_path))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["", "a/b", "..", "con", "x" * 300, " lead", "trail.", "a:b"])
def test_preset_names_follow_the_output_name_rules(name, tmp_path):
    with pytest.raises(UserError) as e:
        P.save_preset(name, RunConfig(), str(tmp_path))
    assert e.value.field == "preset"
    assert not os.listdir(tmp_path)


def test_an_invalid_config_is_not_saved(tmp_path):
    cfg = RunConfig()
    cfg.network.rank = 0
    with pytest.raises(UserError):
        P.save_preset("broken", cfg, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_a_broken_preset_file_names_the_preset_and_the_setting(tmp_path):
    (tmp_path / "bad.toml").write_text("[network]\nrank = 0\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        P.load_preset("bad", str(tmp_path))
    assert e.value.field == "preset bad (network.rank)"
    with pytest.raises(UserError, match="no preset 'missing'"):
        P.load_preset("missing", str(tmp_path))


def test_the_presets_folder_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(P.PRESETS_DIR_ENV, str(tmp_path))
    assert P.default_presets_dir() == str(tmp_path)
    monkeypatch.delenv(P.PRESETS_DIR_ENV)
    assert os.path.basename(P.default_presets_dir()) == "presets"


# -- the command -----------------------------------------------------------------------------------
def test_presets_command_save_list_show_delete(tmp_path, capsys):
    config = tmp_path / "run.config.toml"
    cfg = preset("lowvram-sd15")
    cfg.network.rank = 20
    cfg.write(str(config))
    folder = str(tmp_path / "presets")
    assert cli.main(["presets", "save", "mine", "--config", str(config), "--dir", folder]) == 0
    assert "mine.toml" in capsys.readouterr().out
    assert cli.main(["presets", "list", "--dir", folder, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["builtin"] == list(PRESETS) and listed["user"] == ["mine"]
    assert cli.main(["presets", "show", "mine", "--dir", folder]) == 0
    shown = read_toml_text(capsys.readouterr().out)
    assert shown["network"]["rank"] == 20
    assert cli.main(["presets", "show", "sdxl-12gb", "--dir", folder]) == 0
    assert 'resolution = "1024"' in capsys.readouterr().out
    assert cli.main(["presets", "delete", "mine", "--dir", folder]) == 0
    capsys.readouterr()
    assert cli.main(["presets", "--dir", folder]) == 0  # list is the default
    assert "mine" not in capsys.readouterr().out


@pytest.mark.parametrize("args, flag", [
    (["presets", "delete", "easy-prodigy"], "preset"),
    (["presets", "save", "x"], "--config"),
    (["presets", "save", "x", "--config", "/nonexistent.toml"], "--config"),
    (["presets", "show"], "name"),
    (["presets", "show", "nope"], "preset"),
    (["presets", "rename", "x"], "action"),
])
def test_presets_command_errors_exit_2_with_one_line(args, flag, tmp_path, capsys):
    code = cli.main([*args, "--dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {flag}"), err
