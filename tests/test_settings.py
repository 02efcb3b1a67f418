"""The settings table is the one source of truth: every entry point (config file / API body, the
command line, the tab) accepts and refuses the same values with the same field; one preflight
check is what the tab, the API, the CLI and the trainer run; settings that do nothing yet are
refused; the README's table is the table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_train_ext import cli
from lora_train_ext.core.presets import PRESETS, builtin_preset as preset
from lora_train_ext.core.config import (SETTINGS, RunConfig, settings_json,
                                        settings_markdown)
from lora_train_ext.core.errors import UserError, UserErrors
from lora_train_ext.core.preflight import preflight, trained_parts
from lora_train_ext.host.standalone import StandaloneHost
from lora_train_ext.runs import RunManager
from lora_train_ext.ui import tab
from lora_train_ext.demo import demo_pairs_dir

ROOT = Path(__file__).resolve().parents[1]
NUMERIC = [s for s in SETTINGS.values() if s.kind in (int, float) and not s.choices
           and (s.low is not None or s.high is not None) and not s.not_built]


def _below(spec):
    if spec.low_open:
        return spec.low
    return spec.low - (1 if spec.kind is int else 0.001 * max(1.0, abs(spec.low)))


def _above(spec):
    return spec.high + (1 if spec.kind is int else 0.001 * max(1.0, abs(spec.high)))


def _section(path: str, value) -> dict:
    section, name = path.split(".")
    return {section: {name: value}}


# -- entry points that only read settings (no model work) ----------------------------------------
def via_config(path: str, value) -> RunConfig:
    """A config file / the API body: RunConfig.from_dict, as POST /runs does."""
    return RunConfig.from_dict(_section(path, value), validate=True)


def via_cli(path: str, value) -> RunConfig:
    spec = SETTINGS[path]
    args = cli.build_parser().parse_args(["demo", spec.cli_flag, str(value)])
    return cli.demo_run_config(args)[0]


def via_tab(path: str, value) -> RunConfig:
    values = tab.form_values(RunConfig())
    values[[f.path for f in tab.ALL_FIELDS].index(path)] = value
    return tab.config_from_form(values).validate()


ENTRY_POINTS = {"config/API": via_config, "CLI": via_cli, "tab": via_tab}


def _field_of(make, path, value) -> str:
    """The field an entry point's error names (the CLI's `--flag (section.key)` -> key)."""
    with pytest.raises(UserError) as e:
        make(path, value)
    fields = [p.field for p in getattr(e.value, "problems", [e.value])]
    return fields[0].split("(")[-1].rstrip(")")


def test_every_setting_declares_type_default_help_and_a_valid_default():
    assert len(SETTINGS) > 90
    for spec in SETTINGS.values():
        assert spec.help and spec.label, spec.path
        assert spec.problem(spec.default) is None, spec.path
        if spec.kind in (int, float) and not spec.choices:
            assert spec.low is not None or spec.high is not None, f"{spec.path} has no range"
    flags = [f for s in SETTINGS.values() for f in (s.cli_flag, *s.aliases)]
    assert len(flags) == len(set(flags))
    RunConfig().validate()


@pytest.mark.parametrize("spec", NUMERIC, ids=lambda s: s.path)
def test_one_range_per_field_across_config_cli_and_tab(spec):
    """Values just outside the table's range are refused by every entry point naming the same
    field; the range's own ends are accepted by every entry point."""
    tab_paths = {f.path for f in tab.ALL_FIELDS}
    points = {n: f for n, f in ENTRY_POINTS.items() if n != "tab" or spec.path in tab_paths}
    bad = [v for v in ((_below(spec) if spec.low is not None else None),
                       (_above(spec) if spec.high is not None else None)) if v is not None]
    for value in bad:
        for name, make in points.items():
            assert _field_of(make, spec.path, value) == spec.path, (name, value)
    good = [v for v in (spec.low, spec.high) if v is not None and not
            (v == spec.low and spec.low_open)]
    for value in good:
        value = int(value) if spec.kind is int else value
        if spec.check is not None:
            try:
                spec.check(value)
            except UserError:
                continue  # e.g. bucket_step 1020 is in range but not a multiple of 8
        try:
            via_config(spec.path, value)
        except UserError:  # only a rule between settings (min bucket side above the max)
            assert spec.problem(value) is None
            continue
        for name, make in points.items():
            assert make(spec.path, value).get(spec.path) == value, (name, value)


@pytest.mark.parametrize("path, text", [("network.rank", "ten"), ("optim.lr", "nan"),
                                        ("train.batch_size", "1.5"), ("data.flip", "maybe")])
def test_text_that_is_not_a_value_is_refused_alike(path, text):
    for name, make in ENTRY_POINTS.items():
        if name != "config/API" and SETTINGS[path].kind is bool:
            continue  # a checkbox and a --flag / --no-flag cannot send text
        assert _field_of(make, path, text) == path, name


def test_every_problem_is_reported_at_once():
    with pytest.raises(UserErrors) as e:
        RunConfig.from_dict({"network": {"rank": 0, "algo": "nope"}, "optim": {"lr": -1},
                             "train": {"nonsense": 1}}, validate=True)
    assert {p.field for p in e.value.problems} == {"network.rank", "network.algo", "optim.lr",
                                                    "train.nonsense"}
    assert len(str(e.value).splitlines()) == 4


# -- learning rate 0 means the same everywhere ----------------------------------------------------
def test_lr_zero_means_do_not_train_and_empty_means_inherit_everywhere():
    for make in ENTRY_POINTS.values():
        cfg = make("optim.te_lr", 0)
        assert cfg.optim.te_lr == 0 and trained_parts(cfg) == ["unet"]
    values = tab.form_values(RunConfig())
    assert values[[f.path for f in tab.ALL_FIELDS].index("optim.te_lr")] == ""  # an empty field
    cfg = tab.config_from_form(values)
    assert cfg.optim.te_lr is None and cfg.te_lr == cfg.optim.lr
    assert RunConfig.from_dict({"optim": {"te_lr": ""}}).optim.te_lr is None


# -- settings that do nothing yet ----------------------------------------------------------------
def test_a_setting_not_built_yet_is_refused_not_ignored():
    """The table's `not_built` mark: any value but the default is refused with the reason (every
    setting of this version is built; the mark is how a new one waits for its feature)."""
    import dataclasses

    spec = dataclasses.replace(SETTINGS["train.ema"], not_built="EMA is not built yet")
    assert spec.problem(spec.default) is None
    problem = spec.problem(True)
    assert problem.field == "train.ema" and "not built yet" in problem.message
    assert not [s for s in SETTINGS.values() if s.not_built]


# -- presets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_chosen_in_the_tab_reaches_the_run_whole(name, tmp_path, demo_dataset):
    """The tab's Train handler: the preset's values arrive in the run config, also the ones the
    form does not show (before the fix: 75 tokens instead of 225, bucket side 256 not 320)."""
    host = StandaloneHost(str(tmp_path))
    manager = RunManager(host)
    captured = []
    manager.execute = lambda record: captured.append(record) or record  # no training here
    on_train = _tab_handler(host, manager, "lora_train_start")
    base = manager.preset_config(name)
    values = tab.form_values(base)
    index = {f.path: i for i, f in enumerate(tab.ALL_FIELDS)}
    # difference training reads image pairs: the demo's own pairs
    values[index["data.dataset_dir"]] = (demo_pairs_dir() if base.mode.kind == "difference"
                                         else demo_dataset)
    hidden = next(f for f in SETTINGS.values() if f.group is None and not f.not_built
                  and f.path != "model.arch")
    on_train("task(x)", name, *values)
    assert captured, "the run was not created"
    cfg = captured[0].config
    expected = preset(name)
    assert cfg.data.max_token_length == expected.data.max_token_length
    assert cfg.data.min_bucket_side == expected.data.min_bucket_side
    if name.startswith("easy-"):
        assert (expected.data.max_token_length, expected.data.min_bucket_side) == (225, 320)
    assert cfg.get(hidden.path) == base.get(hidden.path)
    for section, entries in PRESETS[name].items():
        for key, value in entries.items():
            if f"{section}.{key}" != "data.resolution":
                assert cfg.get(f"{section}.{key}") == value, (section, key)


def test_form_over_a_preset_keeps_what_the_form_does_not_show():
    base = preset("easy-prodigy")
    base.network.init_seed = 1234  # not in the tab
    values = tab.form_values(base)
    values[[f.path for f in tab.ALL_FIELDS].index("network.rank")] = 16
    cfg = tab.config_from_form(values, base=base)
    assert cfg.network.rank == 16 and cfg.network.init_seed == 1234
    assert cfg.optim.optimizer == "Prodigy" and cfg.data.max_token_length == 225


def _tab_handler(host, manager, elem_id):
    """The function the tab runs for the button with `elem_id` (the real gradio wiring)."""
    import gradio as gr  # noqa: F401

    blocks = tab.build_tab(host, manager, lambda fn, extra=None: fn)
    ids = {block._id: getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    for i, dep in enumerate(blocks.config["dependencies"]):
        if any(ids.get(t[0] if isinstance(t, (list, tuple)) else t) == elem_id
               for t in dep["targets"]):
            inputs = [ids.get(j) for j in dep["inputs"]]
            assert "lora_train_preset" in inputs  # the preset is an input of the handler
            return blocks.fns[i].fn
    raise AssertionError(f"no handler for {elem_id}")


# -- one preflight for every entry point ----------------------------------------------------------
def _bad_configs(tmp_path, dataset):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = {"data": {"dataset_dir": dataset, "resolution": "64", "enable_buckets": False},
            "train": {"max_steps": 2, "dtype": "fp32", "batch_size": 1},
            "save": {"output_name": "pre"}}

    def with_(path, value):
        out = {s: dict(v) for s, v in base.items()}
        section, key = path.split(".")
        out.setdefault(section, {})[key] = value
        return out

    return [
        ("data.dataset_dir", with_("data.dataset_dir", str(tmp_path / "missing"))),
        ("data.dataset_dir", with_("data.dataset_dir", str(empty))),
        ("optim.optimizer", with_("optim.optimizer", "adamx")),
        ("save.output_name", with_("save.output_name", "CON")),
        ("save.output_name", with_("save.output_name", "x" * 300)),
        ("network.rank", with_("network.rank", 0)),
        ("optim.lr", with_("optim.lr", 0)),
        ("data.validation_count", with_("data.validation_count", 8)),  # all 8 demo images
        ("data.validation_dir", with_("data.validation_dir", str(empty))),
    ]


def test_one_preflight_from_tab_api_cli_and_trainer(tmp_path, demo_dataset, sd1_bundle):
    """Each entry point refuses the same bad config naming the same field, before any file."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lora_train_ext.api import PREFIX, add_routes
    from lora_train_ext.core.trainer import train

    host = StandaloneHost(str(tmp_path / "host"))
    manager = RunManager(host)
    app = FastAPI()
    add_routes(app, host, manager)
    client = TestClient(app)
    out = tmp_path / "out"
    for field, body in _bad_configs(tmp_path, demo_dataset):
        body.setdefault("save", {})["output_dir"] = str(out)
        # the API
        r = client.post(PREFIX + "/runs", json=body)
        assert r.status_code == 422 and field in {p["field"] for p in r.json()["problems"]}, \
            (field, r.json())
        # the tab: the form's values over the defaults, through the run manager
        cfg = None
        try:
            cfg = RunConfig.from_dict(body)
            values = tab.form_values(cfg)
            with pytest.raises(UserError) as e:
                manager.create(tab.config_from_form(values, base=cfg))
            assert field in {p.field for p in getattr(e.value, "problems", [e.value])}
        except UserError as e:  # refused while reading the form: also before any run
            assert field in {p.field for p in getattr(e, "problems", [e])}
        # the command line
        flags = []
        for section, entries in body.items():
            for key, value in entries.items():
                spec = SETTINGS[f"{section}.{key}"]
                if isinstance(value, bool):
                    flags.append(spec.cli_flag if value else "--no-" + spec.cli_flag[2:])
                else:
                    flags += [spec.cli_flag, str(value)]
        args = ["demo", *flags]
        err = _cli_error(args)
        assert f"({field})" in err, (field, err)
        # the trainer itself
        if cfg is not None:
            with pytest.raises(UserError) as e:
                train(sd1_bundle, cfg)
            assert field in {p.field for p in getattr(e.value, "problems", [e.value])}, field
        assert not out.exists() or not os.listdir(out), field


def _cli_error(args) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = cli.main(args)
    assert code == 2, buf.getvalue()
    return buf.getvalue()


def test_preflight_reports_folders_and_package_problems_together(tmp_path):
    cfg = RunConfig()
    cfg.data.dataset_dir = str(tmp_path / "nope")
    cfg.data.reg_dir = str(tmp_path / "nope2")
    cfg.save.output_dir = str(tmp_path / "file")
    (tmp_path / "file").write_text("x")
    cfg.network.existing_lora = str(tmp_path / "missing.safetensors")
    result = preflight(cfg)
    assert {p.field for p in result.problems} == {
        "data.dataset_dir", "data.reg_dir", "save.output_dir", "network.existing_lora"}
    with pytest.raises(UserErrors):
        result.raise_if_failed()


def test_fp16_on_the_cpu_is_refused_by_preflight(demo_dataset):
    cfg = RunConfig()
    cfg.data.dataset_dir = demo_dataset
    cfg.train.dtype = "fp16"
    assert "train.dtype" in {p.field for p in preflight(cfg, device="cpu", scan=False).problems}


# -- the table in words ----------------------------------------------------------------------------
def test_readme_settings_table_is_the_settings_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert settings_markdown() in readme, \
        "README's settings table is stale: paste `python -m lora_train_ext settings` into it"


def test_settings_json_and_command(capsys):
    rows = {r["key"]: r for r in settings_json()}
    assert rows["network.rank"]["low"] == 1 and rows["network.rank"]["high"] == 1024
    assert all(r["available"] for r in rows.values())  # every setting is built now
    assert cli.main(["settings"]) == 0
    assert capsys.readouterr().out == settings_markdown()


def test_reference_data_lives_in_the_repository():
    from fixtures_path import FIXTURES_DIR, fixture_file

    assert FIXTURES_DIR.is_relative_to(ROOT)
    files = sorted(p.name for p in FIXTURES_DIR.rglob("*.tsv"))
    assert len(files) == 18 and "sdxl_unet.tsv" in files
    with pytest.raises(FileNotFoundError):
        fixture_file("no_such.tsv")  # a missing file fails the test; it never skips
    assert len(fixture_file("checkpoint_keys", "sd15_unet.tsv").read_text().splitlines()) == 686


def test_optional_numbers_are_text_fields_so_empty_stays_empty():
    """gradio's Number sends 0 for an empty field, and 0 means "do not train this part": the
    settings that may be empty are text fields in the tab (a browser saw every run refused)."""
    optional = [f for f in tab.ALL_FIELDS if f.optional]
    assert {f.path for f in optional} >= {"optim.unet_lr", "optim.te_lr"}
    assert all(tab.widget_kind(f) == "text" for f in optional)
    values = tab.form_values(RunConfig())
    cfg = tab.config_from_form(values)
    assert cfg.optim.unet_lr is None and cfg.optim.te_lr is None
    assert trained_parts(cfg) == ["unet", "te"]
    index = [f.path for f in tab.ALL_FIELDS].index("optim.te_lr")
    values[index] = "5e-05"
    assert tab.config_from_form(values).optim.te_lr == 5e-05
