"""The HTTP API on the standalone host: auth, field errors, a run from start to files, stop, grid."""

from __future__ import annotations

import base64
import io
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lora_train_ext.api import PREFIX, add_routes, parse_api_auth  # noqa: E402
from lora_train_ext.host.standalone import StandaloneHost  # noqa: E402
from lora_train_ext.runs import RunManager  # noqa: E402

RUN = {"data": {"dataset_dir": "", "resolution": "64", "enable_buckets": False},
       "train": {"max_steps": 4, "dtype": "fp32", "batch_size": 2}, "optim": {"lr": 0.01},
       "network": {"rank": 4}, "save": {"output_name": "api_lora"}}


@pytest.fixture()
def client(tmp_path):
    host = StandaloneHost(str(tmp_path))
    app = FastAPI()
    add_routes(app, host, RunManager(host), credentials=parse_api_auth("alice:secret,bob:pw:x"))
    return TestClient(app)


def test_auth_is_required_when_set(client):
    assert parse_api_auth("alice:secret,bob:pw:x") == {"alice": "secret", "bob": "pw:x"}
    assert client.get(PREFIX + "/runs").status_code == 401
    assert client.get(PREFIX + "/runs", auth=("alice", "wrong")).status_code == 401
    assert client.get(PREFIX + "/runs", auth=("bob", "pw:x")).status_code == 200


def test_bad_fields_get_422_naming_the_field(client, demo_dataset):
    auth = ("alice", "secret")
    r = client.post(PREFIX + "/runs", json={"network": {"rank": 0}}, auth=auth)
    assert r.status_code == 422 and r.json()["field"] == "network.rank"
    r = client.post(PREFIX + "/runs", json={"train": {"nonsense": 1}}, auth=auth)
    assert r.status_code == 422 and r.json()["field"] == "train.nonsense"
    r = client.post(PREFIX + "/runs", json={"data": {"dataset_dir": "/no/such/folder"}}, auth=auth)
    assert r.status_code == 422 and r.json()["field"] == "data.dataset_dir"
    assert client.get(PREFIX + "/runs/unknown", auth=auth).status_code == 404
    assert client.post(PREFIX + "/runs/unknown/stop", auth=auth).status_code == 404


def test_run_start_watch_files_and_grid(client, demo_dataset):
    auth = ("alice", "secret")
    body = {**RUN, "data": {**RUN["data"], "dataset_dir": demo_dataset}}
    run_id = client.post(PREFIX + "/runs", json=body, auth=auth).json()["id"]
    deadline = time.time() + 240
    while time.time() < deadline:
        status = client.get(f"{PREFIX}/runs/{run_id}", auth=auth).json()
        if status["state"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert status["state"] == "finished", status
    assert status["step"] == 4 and status["files"][0].endswith("api_lora.safetensors")
    assert [r["id"] for r in client.get(PREFIX + "/runs", auth=auth).json()["runs"]] == [run_id]
    assert any(p.endswith("api_lora.safetensors")
               for p in client.get(PREFIX + "/loras", auth=auth).json()["loras"])

    r = client.post(PREFIX + "/test", auth=auth, json={
        "lora": "api_lora", "prompt": "shp style, red circle", "steps": 2, "size": 64,
        "te_strengths": "0, 1", "unet_strengths": "0, 0.5, 1"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["rows"] == [0.0, 1.0] and data["columns"] == [0.0, 0.5, 1.0]
    assert len(data["prompts"]) == 6 and "<lora:api_lora:te=1:unet=0.5>" in data["prompts"][4]
    from PIL import Image

    grid = Image.open(io.BytesIO(base64.b64decode(data["grid_png_base64"])))
    assert grid.size[0] > 3 * 64 and grid.size[1] > 2 * 64
    r = client.post(PREFIX + "/test", auth=auth, json={"lora": "api_lora", "prompt": "x",
                                                       "te_strengths": "a, b"})
    assert r.status_code == 422 and r.json()["field"] == "te_strengths"


def test_stop_a_running_run(client, demo_dataset):
    auth = ("alice", "secret")
    body = {**RUN, "data": {**RUN["data"], "dataset_dir": demo_dataset},
            "train": {**RUN["train"], "max_steps": 5000}}
    run_id = client.post(PREFIX + "/runs", json=body, auth=auth).json()["id"]
    deadline = time.time() + 120
    while client.get(f"{PREFIX}/runs/{run_id}", auth=auth).json()["step"] < 2:
        assert time.time() < deadline
        time.sleep(0.1)
    assert client.post(f"{PREFIX}/runs/{run_id}/stop", auth=auth).status_code == 200
    while client.get(f"{PREFIX}/runs/{run_id}", auth=auth).json()["state"] == "running":
        assert time.time() < deadline
        time.sleep(0.1)
    status = client.get(f"{PREFIX}/runs/{run_id}", auth=auth).json()
    assert status["state"] == "stopped" and status["step"] < 5000 and status["files"]
