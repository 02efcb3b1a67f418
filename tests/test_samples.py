"""Samples while training: kohya-style prompt lines, when they are due, images written with the
step in their name and the Lora card's preview, the training itself unchanged by sampling, and
the run manager / tab gallery fed with them."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lora_train_ext import cli
from lora_train_ext.core.config import RunConfig
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.lora_file import load_lora
from lora_train_ext.core.sampling import SamplePrompt, parse_sample_prompts, sample_due


def test_prompt_lines_take_kohya_options_over_the_defaults():
    defaults = SamplePrompt(prompt="", negative="ugly", width=64, height=64, seed=5, steps=20)
    got = parse_sample_prompts("a cat --n blurry --w 128 --h 96 --d 7 --l 5.5 --s 12 --ss DDIM\n"
                               "# a comment\n\n  a dog  ", defaults)
    assert got[0] == SamplePrompt("a cat", "blurry", 128, 96, 7, 5.5, 12, "DDIM")
    assert got[1] == SamplePrompt("a dog", "ugly", 64, 64, 5, 7.0, 20, "Euler a")


@pytest.mark.parametrize("text, fragment", [
    ("a cat --q 3", "unknown option --q"), ("a cat --w 100", "multiple of 8"),
    ("a cat --s 0", "1..1000"), ("a cat --d x", "not a number"), ("--n only", "no prompt"),
])
def test_bad_prompt_lines_are_refused_naming_the_line(text, fragment):
    with pytest.raises(UserError) as e:
        RunConfig.from_dict({"sample": {"prompts": "fine\n" + text}}, validate=True)
    assert e.value.field == "sample.prompts" and "line 2" in str(e.value) and fragment in str(e.value)


def test_samples_are_due_at_start_every_n_and_at_the_end():
    cfg = RunConfig.from_dict({"sample": {"prompts": "x", "every_steps": 4}})
    due = [s for s in range(0, 11) if sample_due(cfg, s, None, 10)]
    assert due == [0, 4, 8, 10]
    cfg.sample.at_start = False
    cfg.sample.every_steps, cfg.sample.every_epochs = 0, 2
    assert sample_due(cfg, 3, 2, 10) and not sample_due(cfg, 3, 1, 10) and not sample_due(cfg, 0, None, 10)
    assert not sample_due(RunConfig(), 10, None, 10)  # no prompts: never


def _demo(tmp_path, name, *extra):
    import contextlib
    import io
    import json

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["demo", "--out", str(tmp_path / name), "--steps", "4", "--batch-size", "2",
                         "--rank", "4", "--lr", "0.01", *extra])
    assert code == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_samples_during_a_run_do_not_change_what_it_trains(tmp_path):
    plain = _demo(tmp_path, "plain")
    sampled = _demo(tmp_path, "sampled", "--sample-prompt", "shp style, red circle --s 3",
                    "--sample-every", "2")
    a, _ = load_lora(plain["lora_path"])
    b, _ = load_lora(sampled["lora_path"])
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights
    assert plain["samples"] == [] and plain["final_loss"] == sampled["final_loss"]
    names = [os.path.basename(p) for p in sampled["samples"]]
    assert names == [f"demo_lora-step{s:08d}-00.png" for s in (0, 2, 4)]
    first, last = (np.asarray(Image.open(p), dtype=np.int16) for p in
                   (sampled["samples"][0], sampled["samples"][-1]))
    assert first.shape == (64, 64, 3) and np.abs(first - last).mean() > 0.5  # the LoRA shows
    preview = os.path.join(os.path.dirname(sampled["lora_path"]), "demo_lora.preview.png")
    assert np.array_equal(np.asarray(Image.open(preview)),
                          np.asarray(Image.open(sampled["samples"][-1])))
    assert sampled["sample_seconds"] > 0


def test_run_manager_collects_samples_for_the_gallery(tmp_path, demo_dataset):
    from lora_train_ext.host.standalone import StandaloneHost
    from lora_train_ext.runs import RunManager
    from lora_train_ext.ui.tab import sample_gallery

    host = StandaloneHost(str(tmp_path))
    manager = RunManager(host)
    cfg = RunConfig.from_dict({
        "data": {"dataset_dir": demo_dataset, "resolution": "64", "enable_buckets": False},
        "train": {"max_steps": 2, "dtype": "fp32", "batch_size": 2}, "optim": {"lr": 0.01},
        "network": {"rank": 2}, "save": {"output_name": "sampled"},
        "sample": {"prompts": "shp style --s 2", "every_steps": 1}})
    record = manager.execute(manager.create(cfg))
    assert record.state == "finished", record.error
    assert [s for s, _ in record.samples] == [0, 1, 2]
    assert all(os.path.isfile(p) for _, p in record.samples)
    gallery = sample_gallery(manager)
    assert [caption for _, caption in gallery] == ["step 2", "step 1", "step 0"]
    assert record.to_json()["samples"][0]["step"] == 0
