"""Bad input, everywhere, before work starts: the command line, the API and the tab refuse the
same bad names, numbers and files with an error naming the field, write nothing, and the next
normal run works; hostile dataset folders never crash a scan or a run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from lora_train_ext import cli
from lora_train_ext.core.config import SETTINGS, RunConfig
from lora_train_ext.core.data import check_dataset
from lora_train_ext.core.errors import UserError
from lora_train_ext.host.standalone import StandaloneHost
from lora_train_ext.runs import RunManager
from lora_train_ext.ui import tab

BAD_NAMES = ["", "a/b", "a\\b", "..", "x\0y", "name.", " name", "CON", "nul.txt", "LPT1",
             "x" * 300, "ä" * 120, "tab\tname", "what?"]
GOOD_NAMES = ["ÄÖ_日本_lora", "my lora v2", "a.b-c_d"]
BAD_NUMBERS = [("network.rank", "0"), ("network.rank", "-3"), ("network.rank", "1e9"),
               ("optim.lr", "nan"), ("optim.lr", "inf"), ("train.batch_size", "abc"),
               ("train.max_steps", "0"), ("data.caption_dropout", "1.5"),
               ("train.seed", "-1"), ("data.min_bucket_side", "10")]


def _cli(args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(args)
    return code, err.getvalue()


@pytest.fixture()
def entry(tmp_path, demo_dataset):
    """One function per entry point: (path, value as text) -> the fields its error names."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lora_train_ext.api import PREFIX, add_routes

    host = StandaloneHost(str(tmp_path / "host"))
    manager = RunManager(host)
    app = FastAPI()
    add_routes(app, host, manager)
    client = TestClient(app)
    out = tmp_path / "out"
    base = {"data": {"dataset_dir": demo_dataset, "resolution": "64", "enable_buckets": False},
            "train": {"max_steps": 1, "dtype": "fp32"}, "save": {"output_dir": str(out)}}

    def body(path, value):
        b = {s: dict(v) for s, v in base.items()}
        section, key = path.split(".")
        b.setdefault(section, {})[key] = value
        return b

    def via_cli(path, value):
        code, err = _cli(["demo", "--out", str(out), "--steps", "1",
                          SETTINGS[path].cli_flag + "=" + value])
        assert code == 2, err
        return {line.split("(")[1].split(")")[0] for line in err.splitlines() if "(" in line}

    def via_api(path, value):
        r = client.post(PREFIX + "/runs", json=body(path, value))
        assert r.status_code == 422, r.text
        return {p["field"] for p in r.json()["problems"]}

    def via_tab(path, value):
        cfg = RunConfig.from_dict(base)
        values = tab.form_values(cfg)
        index = [f.path for f in tab.ALL_FIELDS].index(path)
        values[index] = value
        with pytest.raises(UserError) as e:
            manager.create(tab.config_from_form(values, base=cfg))
        return {p.field for p in getattr(e.value, "problems", [e.value])}

    yield {"CLI": via_cli, "API": via_api, "tab": via_tab}
    assert not out.exists() or not os.listdir(out), os.listdir(out)  # nothing written


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_output_names_are_refused_everywhere(entry, name):
    for where, make in entry.items():
        if where == "CLI" and "\0" in name:
            continue  # a command line cannot carry NUL
        assert "save.output_name" in make("save.output_name", name), where


@pytest.mark.parametrize("path, text", BAD_NUMBERS)
def test_bad_numbers_are_refused_everywhere(entry, path, text):
    for where, make in entry.items():
        value = text if where != "API" else _json_value(text)
        assert path in make(path, value), where


def _json_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_names_that_must_work_train_and_load(name, tmp_path):
    code, err = _cli(["demo", "--out", str(tmp_path), "--steps", "1", "--batch-size", "1",
                      "--output-name", name])
    assert code == 0, err
    assert os.path.isfile(tmp_path / f"{name}.safetensors")


# -- files given as input -------------------------------------------------------------------------
def _safetensors_with_header(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


FILES = {
    "empty": b"",
    "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    "huge header length": struct.pack("<Q", 2**60) + b"{}",
    "truncated": _safetensors_with_header(
        b'{"a":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}') + b"\0" * 10,
    "non-string metadata": _safetensors_with_header(
        b'{"__metadata__":{"ss_network_dim":8},"a":{"dtype":"F32","shape":[1],'
        b'"data_offsets":[0,4]}}') + b"\0" * 4,
}


@pytest.mark.parametrize("kind", list(FILES))
def test_broken_files_to_continue_from_are_refused_before_any_work(kind, tmp_path):
    path = tmp_path / f"{kind.replace(' ', '_')}.safetensors"
    path.write_bytes(FILES[kind])
    out = tmp_path / "out"
    code, err = _cli(["demo", "--out", str(out), "--steps", "1", "--existing-lora", str(path)])
    assert code == 2 and "(network.existing_lora)" in err, err
    assert not out.exists() or not os.listdir(out)
    code, err = _cli(["inspect", str(path)])
    assert code == 2 and "Traceback" not in err and err.startswith("error: "), err


def test_a_pickle_checkpoint_is_never_unpickled(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04K\x01.")  # a pickle; loading it would run code in general
    code, err = _cli(["demo", "--out", str(tmp_path / "o"), "--steps", "1",
                      "--existing-lora", str(path)])
    assert code == 2 and "(network.existing_lora)" in err, err
    code, err = _cli(["inspect", str(path)])
    assert code == 2, err


def test_a_file_for_another_arch_is_refused(tmp_path):
    code, err = _cli(["demo", "--arch", "sd2", "--out", str(tmp_path / "sd2"), "--steps", "1",
                      "--batch-size", "1"])
    assert code == 0, err
    code, err = _cli(["demo", "--out", str(tmp_path / "o"), "--steps", "1", "--existing-lora",
                      str(tmp_path / "sd2" / "demo_lora.safetensors")])
    assert code == 2 and "(network.existing_lora)" in err and "sd_v2" in err, err


def test_a_folder_where_a_file_is_expected_and_the_reverse(tmp_path, demo_dataset):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    code, err = _cli(["demo", "--out", str(tmp_path / "o"), "--dataset", str(afile)])
    assert code == 2 and "(data.dataset_dir)" in err
    code, err = _cli(["demo", "--out", str(afile), "--steps", "1"])
    assert code == 2 and "(save.output_dir)" in err
    code, err = _cli(["demo", "--out", str(tmp_path / "o"), "--existing-lora", str(tmp_path)])
    assert code == 2 and "(network.existing_lora)" in err


# -- hostile dataset folders ------------------------------------------------------------------------
def _hostile_dataset(root) -> str:
    folder = root / "2_things"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):  # the good ones
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / f"ok{i}.png")
        (folder / f"ok{i}.txt").write_text(f"good image {i}")
    (folder / "zero.png").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(folder / "tiny.png")
    Image.new("CMYK", (96, 96), (0, 128, 0, 0)).save(folder / "cmyk.jpg")
    frames = [Image.new("RGB", (96, 96), c) for c in ("red", "blue")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    (folder / "latin1.txt").write_bytes("caf\xe9 tag".encode("latin-1"))
    Image.new("RGB", (96, 96), "green").save(folder / "latin1.png")
    (folder / ".hidden.png").write_bytes(b"not an image")
    bomb = Image.new("1", (20000, 20000))  # 400 Mpx, far past Pillow's decompression-bomb limit
    bomb.save(folder / "bomb.png", optimize=True)
    try:
        os.symlink(folder, folder / "loop")
    except OSError:
        pass
    for name in ("0_zero", "-3_neg", "abc_x"):
        (root / name).mkdir()
        Image.new("RGB", (96, 96)).save(root / name / "a.png")
    return str(root)


def test_hostile_dataset_is_scanned_reported_and_trained_on_what_is_good(tmp_path):
    root = _hostile_dataset(tmp_path / "data")
    cfg = RunConfig.from_dict({"data": {"dataset_dir": root, "resolution": "64",
                                        "enable_buckets": False, "min_bucket_side": 64}})
    report = check_dataset(cfg.data)
    kinds = {p.kind for p in report.problems}
    assert report.ok and report.images >= 4, report.summary_text()
    assert {"unreadable", "too_small", "bad_repeat_folder"} <= kinds, kinds
    text = report.summary_text()
    assert "bomb.png" in text and "zero.png" in text
    out = tmp_path / "out"
    code, err = _cli(["demo", "--out", str(out), "--dataset", root, "--steps", "2",
                      "--batch-size", "2"])
    assert code == 0, err
    assert os.path.isfile(out / "demo_lora.safetensors")


def test_a_dataset_with_nothing_usable_is_refused_naming_the_field(tmp_path):
    folder = tmp_path / "bad" / "1_x"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_bytes(b"\xff\xd8 broken")
    code, err = _cli(["demo", "--out", str(tmp_path / "o"), "--dataset", str(tmp_path / "bad")])
    assert code == 2 and "(data.dataset_dir)" in err, err
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")
