"""Merging into the loaded model: merged at strength s draws what the unmerged model draws with
<lora:NAME:s>; Revert gives the weights back bit for bit; A/B shows both; Save writes the merged
model as a checkpoint the host lists; a LoRA for another arch is refused and changes nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_train_ext.core.config import RunConfig
from lora_train_ext.core.errors import UserError
from lora_train_ext.host.standalone import StandaloneHost
from lora_train_ext.merging import ModelMerger, parse_merge_lines
from lora_train_ext.runs import RunManager

from conftest import state_sha256


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lora_train_ext.demo import demo_dataset_dir

    root = tmp_path_factory.mktemp("merge")
    host = StandaloneHost(str(root))
    manager = RunManager(host)
    cfg = RunConfig.from_dict({
        "data": {"dataset_dir": demo_dataset_dir(), "resolution": "64", "enable_buckets": False},
        "train": {"max_steps": 6, "dtype": "fp32", "batch_size": 2}, "optim": {"lr": 0.02},
        "network": {"rank": 4}, "save": {"output_name": "mergeme", "save_dtype": "fp32"}})
    record = manager.execute(manager.create(cfg))
    assert record.state == "finished", record.error
    return host


def _image(host, prompt):
    return np.asarray(host.generate([prompt], "", 5, 3, 64, 64, 7.0)[0], dtype=np.int16)


def test_merged_equals_the_lora_tag_and_revert_is_exact(trained):
    host = trained
    merger = ModelMerger(host)
    before = state_sha256(*host.bundle.base_modules())
    tagged = _image(host, "shp style, red circle, <lora:mergeme:0.7>")
    plain = _image(host, "shp style, red circle")
    specs = parse_merge_lines("mergeme:0.7", host.find_lora)
    state = merger.merge(specs)
    assert state.backups and state_sha256(*host.bundle.base_modules()) != before
    merged = _image(host, "shp style, red circle")
    diff = np.abs(merged - tagged)
    assert diff.max() <= 2, (diff.max(), diff.mean())  # the same image within rounding
    assert np.abs(merged - plain).mean() > 0.5  # and not the base model's
    a, b = merger.compare("shp style, red circle", "", 5, 3, 64)
    assert np.array_equal(np.asarray(a, dtype=np.int16), plain)
    assert np.array_equal(np.asarray(b, dtype=np.int16), merged)
    assert merger.revert()
    assert state_sha256(*host.bundle.base_modules()) == before  # bit for bit
    assert np.array_equal(_image(host, "shp style, red circle"), plain)
    assert not merger.revert()  # nothing left to revert


def test_per_part_and_block_strengths(trained):
    host = trained
    merger = ModelMerger(host)
    before = {k: v.clone() for k, v in host.checkpoint_state().items()}
    merger.merge(parse_merge_lines("mergeme:1:0:1 blocks=IN:0,MID:0,OUT:1", host.find_lora))
    after = host.checkpoint_state()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.diffusion_model.output_blocks.") for k in changed)
    merger.revert()
    assert all(torch.equal(before[k], v) for k, v in host.checkpoint_state().items())


def test_save_as_checkpoint_writes_the_merged_weights(trained):
    host = trained
    merger = ModelMerger(host)
    merger.merge(parse_merge_lines("mergeme:1", host.find_lora))
    try:
        path = merger.save_checkpoint("merged_model", precision="fp32")
        state = host.checkpoint_state()
        saved = load_file(path)
        assert set(saved) == set(state)
        assert all(torch.equal(saved[k], state[k]) for k in state)
        with pytest.raises(UserError) as e:
            merger.save_checkpoint("merged_model")
        assert e.value.field == "name"
        with pytest.raises(UserError) as e:
            merger.save_checkpoint("bad/name")
        assert e.value.field == "name"
    finally:
        merger.revert()
    assert os.path.dirname(path) == host.checkpoint_dir()


def test_a_lora_for_another_arch_is_refused_and_nothing_changes(trained, tmp_path):
    from lora_train_ext import cli

    host = trained
    assert cli.main(["demo", "--arch", "sd2", "--out", str(tmp_path), "--steps", "1",
                     "--batch-size", "1"]) == 0
    before = state_sha256(*host.bundle.base_modules())
    merger = ModelMerger(host)
    with pytest.raises(UserError) as e:
        merger.merge(parse_merge_lines("x", lambda name: str(tmp_path / "demo_lora.safetensors")))
    assert "do not fit" in str(e.value) or "sd2" in str(e.value)
    assert state_sha256(*host.bundle.base_modules()) == before
    assert not merger.state.backups


@pytest.mark.parametrize("text, fragment", [("", "at least one"), ("nope:1", "no LoRA named"),
                                            ("mergeme:1:2", "give NAME"),
                                            ("mergeme:x", "not numbers"),
                                            ("mergeme:1 blocks=XX:1", "not BLOCK:VALUE")])
def test_bad_merge_lines_name_the_line(trained, text, fragment):
    with pytest.raises(UserError) as e:
        parse_merge_lines(text, trained.find_lora)
    assert fragment in str(e.value)


def test_merge_routes(trained):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lora_train_ext.api import PREFIX, add_routes

    host = trained
    app = FastAPI()
    add_routes(app, host, RunManager(host))
    client = TestClient(app)
    before = state_sha256(*host.bundle.base_modules())
    r = client.post(PREFIX + "/merge", json={"loras": ["mergeme:0.5"]})
    assert r.status_code == 200 and r.json()["merged"] and r.json()["loras"][0]["strength"] == 0.5
    r = client.post(PREFIX + "/merge/compare", json={"prompt": "shp style", "steps": 2, "size": 64})
    assert r.status_code == 200 and r.json()["a_png_base64"] != r.json()["b_png_base64"]
    assert client.post(PREFIX + "/merge", json={"loras": "nope:1"}).json()["field"] == "loras"
    assert client.get(PREFIX + "/merge").json()["merged"]  # a refused merge leaves it as it was
    r = client.post(PREFIX + "/merge/revert")
    assert r.json()["reverted"] is True and not r.json()["merged"]
    assert state_sha256(*host.bundle.base_modules()) == before
