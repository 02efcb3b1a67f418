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
