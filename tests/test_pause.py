"""Pause and test: a paused run writes NAME-stepN, lets go of the host's lock so generations
run (with the snapshot hot-loaded), takes the lock back and ends with the weights of a run that
never paused, bit for bit; the base weights are unchanged during the pause; a model switched
during the pause ends the run with its state saved."""

from __future__ import annotations

import os
import threading
import time

import torch

from lora_train_ext.core.config import RunConfig
from lora_train_ext.core.lora_file import load_lora
from lora_train_ext.host.standalone import StandaloneHost
from lora_train_ext.runs import RunManager

from conftest import state_sha256


def _cfg(dataset: str, name: str, steps: int = 6) -> RunConfig:
    return RunConfig.from_dict({
        "data": {"dataset_dir": dataset, "resolution": "64", "enable_buckets": False},
        "train": {"max_steps": steps, "dtype": "fp32", "batch_size": 2}, "optim": {"lr": 0.01},
        "network": {"rank": 4, "dropout": 0.1}, "save": {"output_name": name}})


def _wait(condition, seconds: float = 600.0) -> None:
    end = time.time() + seconds
    while not condition():
        assert time.time() < end, "timed out"
        time.sleep(0.02)


def _pause_at(manager, record, step: int) -> None:
    def listener(event):
        if event.kind == "step" and event.step == step:
            manager.pause(record.id)
    record.control.add_listener(listener)


def test_pause_lends_the_model_and_resume_ends_like_an_unpaused_run(tmp_path, demo_dataset):
    host = StandaloneHost(str(tmp_path))
    manager = RunManager(host)
    plain = manager.execute(manager.create(_cfg(demo_dataset, "plain")))
    assert plain.state == "finished"
    base_before = state_sha256(*host.bundle.base_modules())

    with host.exclusive("the test holds the lock until the run is queued"):
        record = manager.enqueue(_cfg(demo_dataset, "paused"))
        _pause_at(manager, record, 3)
    _wait(lambda: record.state == "paused")
    snapshot = os.path.join(str(tmp_path), "Lora", "paused-step00000003.safetensors")
    assert record.paused_snapshot == snapshot and os.path.isfile(snapshot)
    # the lock is free: a generation with the paused snapshot runs now, in this thread
    got = threading.Event()
    with host.exclusive("a generation during the pause"):
        assert state_sha256(*host.bundle.base_modules()) == base_before
        images = host.generate(["shp style, <lora:paused-step00000003:1>", "shp style"], "", 3,
                               2, 64, 64, 7.0)
        got.set()
    assert got.is_set() and len(images) == 2
    assert record.state == "paused" and record.step == 3
    manager.resume(record.id)
    _wait(lambda: record.state not in ("paused", "running", "queued"))
    assert record.state == "finished", record.error
    a, _ = load_lora(plain.files[0])
    b, _ = load_lora(record.files[0])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert state_sha256(*host.bundle.base_modules()) == base_before


def test_a_model_switch_during_the_pause_ends_the_run_with_its_state(tmp_path, demo_dataset):
    host = StandaloneHost(str(tmp_path))
    manager = RunManager(host)
    with host.exclusive("queued first"):
        record = manager.enqueue(_cfg(demo_dataset, "switched"))
        _pause_at(manager, record, 2)
    _wait(lambda: record.state == "paused")
    real_hash = host.bundle.model_hash
    host.bundle.model_hash = "another-model"  # what a checkpoint switch looks like to the host
    try:
        manager.resume(record.id)
        _wait(lambda: record.state not in ("paused", "running", "queued"))
    finally:
        host.bundle.model_hash = real_hash
    assert record.state == "stopped", (record.state, record.error)
    assert "switched" in record.message and "state is saved" in record.message
    state_dir = os.path.join(str(tmp_path), "runs", "switched-state")
    assert os.path.isfile(os.path.join(state_dir, "training_state.pth"))
    assert record.step == 2
