"""The run queue: runs train one after another in the order of the queue, queued runs can be
moved and cancelled, a failed run does not stop the ones after it, and the API says where a
new run stands in the queue."""

from __future__ import annotations

import time

import pytest

from lora_train_ext.core.config import RunConfig
from lora_train_ext.host.standalone import StandaloneHost
from lora_train_ext.runs import RunManager


def _cfg(dataset: str, name: str, **over) -> RunConfig:
    cfg = RunConfig.from_dict({
        "data": {"dataset_dir": dataset, "resolution": "64", "enable_buckets": False},
        "train": {"max_steps": 2, "dtype": "fp32", "batch_size": 2}, "optim": {"lr": 0.01},
        "network": {"rank": 2}, "save": {"output_name": name}})
    for path, value in over.items():
        cfg.set(path.replace("__", "."), value)
    return cfg


def _wait(condition, seconds: float = 600.0) -> None:
    """Wait for a state, with a generous bound (a busy 2-core machine is slow)."""
    end = time.time() + seconds
    while not condition():
        assert time.time() < end, "timed out waiting for the queue"
        time.sleep(0.05)


def test_queue_runs_in_order_moves_cancels_and_survives_a_failure(tmp_path, demo_dataset):
    host = StandaloneHost(str(tmp_path))
    manager = RunManager(host)
    started: list[str] = []
    execute = manager.execute
    manager.execute = lambda record: started.append(record.config.save.output_name) or \
        execute(record)
    with host.exclusive("held by the test"):  # nothing starts until the test lets go
        a = manager.enqueue(_cfg(demo_dataset, "a"))
        # b fails mid-run: its data folder disappears after the preflight
        b = manager.enqueue(_cfg(demo_dataset, "b"))
        c = manager.enqueue(_cfg(demo_dataset, "c"))
        d = manager.enqueue(_cfg(demo_dataset, "d"))
        _wait(lambda: manager.position(a.id) is None)  # the worker took a and waits for the lock
        assert [r.id for r in manager.queued()] == [b.id, c.id, d.id]
        assert manager.position(d.id) == 3
        manager.move(d.id, -1)
        assert [r.id for r in manager.queued()] == [b.id, d.id, c.id]
        manager.cancel(c.id)
        assert c.state == "cancelled" and manager.position(c.id) is None
        b.config.data.dataset_dir = str(tmp_path / "gone")
    _wait(lambda: all(r.state not in ("queued", "running") for r in (a, b, d)))
    assert started == ["a", "b", "d"]
    assert (a.state, b.state, c.state, d.state) == ("finished", "failed", "cancelled", "finished")
    assert "gone" in b.error and d.files and a.files


def test_api_reports_queue_position_and_cancels(tmp_path, demo_dataset):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lora_train_ext.api import PREFIX, add_routes

    host = StandaloneHost(str(tmp_path))
    manager = RunManager(host)
    app = FastAPI()
    add_routes(app, host, manager)
    client = TestClient(app)
    body = _cfg(demo_dataset, "x").to_dict()
    with host.exclusive("held by the test"):
        first = client.post(PREFIX + "/runs", json=body).json()
        _wait(lambda: manager.position(first["id"]) is None)
        second = client.post(PREFIX + "/runs", json=body).json()
        third = client.post(PREFIX + "/runs", json=body).json()
        assert (second["position"], third["position"]) == (1, 2)
        assert [r["id"] for r in client.get(PREFIX + "/queue").json()["queue"]] == \
            [second["id"], third["id"]]
        assert client.post(PREFIX + f"/runs/{third['id']}/move", json={"by": -1}).json() == \
            {"queue": [third["id"], second["id"]]}
        assert client.post(PREFIX + f"/runs/{second['id']}/cancel").json()["state"] == "cancelled"
    _wait(lambda: manager.get(third["id"]).state == "finished")
    assert client.post(PREFIX + f"/runs/{third['id']}/move", json={"by": 1}).status_code == 409


def test_run_reports_where_the_time_before_its_first_step_went(tmp_path, demo_dataset):
    """Train -> first optimizer step, in parts (issue 15.4): latent caching and the step-0
    sample are reported apart from the rest; the API's JSON and the tab's status carry it."""
    from lora_train_ext.ui.tab import status_html

    host = StandaloneHost(str(tmp_path))
    manager = RunManager(host)
    cfg = _cfg(demo_dataset, "timed", data__cache_latents=True,
               sample__prompts="shp style, red circle --s 1 --w 64 --h 64", sample__every_steps=1)
    record = manager.enqueue(cfg)
    _wait(lambda: record.state not in ("queued", "running"))
    assert record.state == "finished", record.error
    s = record.to_json()["startup"]
    parts = ("queued_s", "model_s", "guard_s", "set_up_s", "cache_s", "baseline_s",
             "first_step_s")
    assert set(s) == set(parts) | {"to_first_step_s", "click_to_first_step_s"}
    assert all(s[k] >= 0 for k in s)
    # the step-0 sample was drawn before the first step: its time is in baseline_s
    assert record.samples and record.samples[0][0] == 0 and s["baseline_s"] > 0
    assert s["cache_s"] > 0  # the demo images were encoded before the loop
    assert s["click_to_first_step_s"] == pytest.approx(
        s["to_first_step_s"] - s["cache_s"] - s["baseline_s"], abs=2e-3)
    # the parts were measured one after another inside the whole
    assert sum(s[k] for k in parts) <= s["to_first_step_s"] + 0.01
    assert f"First step {s['click_to_first_step_s']:.1f} s after Train" in status_html(manager)
    # a second run of the same manager has its own figures
    again = manager.enqueue(_cfg(demo_dataset, "timed2"))
    _wait(lambda: again.state not in ("queued", "running"))
    assert again.startup["baseline_s"] < s["baseline_s"] or not again.samples
    assert again.startup is not record.startup and "to_first_step_s" in again.startup
