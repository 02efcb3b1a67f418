"""The HTTP API on the standalone host: auth, field errors, a run from start to files, stop, grid."""

from __future__ import annotations

import base64
import io
import os
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


# -- request bodies: size limit and shape ---------------------------------------------------------
JSON_POST_ROUTES = ["/runs", "/runs/someid/move", "/test", "/snapshot-grid", "/merge",
                    "/merge/compare", "/merge/save", "/merge-file", "/merge-loras", "/extract",
                    "/resize", "/estimate"]


def test_every_post_route_with_a_body_is_limited(client):
    """No POST route lets FastAPI read a body itself (no limit, its own error shape): the ones
    that take a body read it through the limit, and they are JSON_POST_ROUTES."""
    import inspect

    limited = []
    for r in client.app.routes:
        if "POST" not in getattr(r, "methods", ()):
            continue
        params = list(inspect.signature(r.endpoint).parameters)
        assert "body" not in params, f"{r.path} reads its body without the limit"
        if params == ["request"]:
            limited.append(r.path.replace(PREFIX, "").replace("{run_id}", "someid"))
    assert sorted(limited) == sorted(JSON_POST_ROUTES)


@pytest.mark.parametrize("route", JSON_POST_ROUTES)
def test_post_bodies_over_the_limit_get_413_in_the_error_shape(client, route):
    from lora_train_ext.api import MAX_BODY_BYTES

    auth = ("alice", "secret")
    big = b'{"save": {"comment": "' + b"x" * MAX_BODY_BYTES + b'"}}'
    r = client.post(PREFIX + route, content=big, auth=auth,
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json() == {"error": f"the body is larger than {MAX_BODY_BYTES} bytes", "field": "body"}

    def chunks():  # no Content-Length: the limit holds while reading
        for i in range(0, len(big), 64 * 1024):
            yield big[i:i + 64 * 1024]

    r = client.post(PREFIX + route, content=chunks(), auth=auth)
    assert r.status_code == 413 and r.json()["field"] == "body"
    assert client.post(PREFIX + route, content=big, headers={
        "Content-Type": "application/json"}).status_code == 401  # auth comes first


@pytest.mark.parametrize("body, says", [
    (b"[1, 2]", "not an array"), (b'"text"', "not a string"), (b"3", "not a number"),
    (b"null", "not null"), (b"true", "not true/false"), (b"{", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"), (b"", "empty")])
def test_bodies_that_are_not_json_objects_get_422_in_the_error_shape(client, body, says):
    auth = ("alice", "secret")
    for route in JSON_POST_ROUTES:
        r = client.post(PREFIX + route, content=body, auth=auth,
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        data = r.json()
        assert set(data) == {"error", "field"} and data["field"] == "body"
        assert says in data["error"].replace("must be a JSON object, ", ""), data


def test_a_body_just_under_the_limit_is_read(client):
    from lora_train_ext.api import MAX_BODY_BYTES

    head, tail = b'{"network": {"rank": 0}, "pad": "', b'"}'
    body = head + b"x" * (MAX_BODY_BYTES - len(head) - len(tail)) + tail
    assert len(body) == MAX_BODY_BYTES
    r = client.post(PREFIX + "/runs", content=body, auth=("alice", "secret"),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] in ("network.rank", "pad")  # read, judged


# -- the WebUI entry point adds the routes only when asked ---------------------------------------
def _load_script(monkeypatch):
    import importlib.util
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repo on sys.path
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        "lora_train.py")
    spec = importlib.util.spec_from_file_location("lora_train_script_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _routes(app) -> list[str]:
    return sorted(r.path for r in app.routes if getattr(r, "path", "").startswith(PREFIX))


@pytest.mark.parametrize("api, nowebui, setting, offered", [
    (False, False, None, False),   # plain WebUI, setting never registered (no settings page)
    (False, False, False, False),  # plain WebUI, setting off
    (True, False, None, True),     # --api
    (False, True, None, True),     # --nowebui (the API is all it serves)
    (False, False, True, True),    # the extension's setting on
])
def test_routes_only_with_api_flag_or_setting(api, nowebui, setting, offered, monkeypatch,
                                              sd1_bundle):
    import fake_webui
    from lora_train_ext.host.webui import API_OPTION, SETTINGS_SECTION

    fake = fake_webui.install(sd1_bundle, monkeypatch)
    fake.shared.cmd_opts.api, fake.shared.cmd_opts.nowebui = api, nowebui
    script = _load_script(monkeypatch)
    registered = fake.script_callbacks.registered
    assert registered["app_started"] == [script.on_app_started]
    if setting is not None:
        for fn in registered["ui_settings"]:
            fn()
        info = fake.shared.opts.data_labels[API_OPTION]
        assert (info.default, info.section, info.restart) == (False, SETTINGS_SECTION, True)
        setattr(fake.shared.opts, API_OPTION, setting)
    app = FastAPI()
    fake.script_callbacks.app_started_callback(None, app)
    routes = _routes(app)
    if not offered:
        assert routes == []
        assert TestClient(app).get(PREFIX + "/settings").status_code == 404
        return
    from lora_train_ext.api import add_routes as add_all

    every = FastAPI()
    add_all(every, script.host, script.manager)
    assert routes == _routes(every) and PREFIX + "/runs" in routes and len(routes) >= 8
    assert TestClient(app).get(PREFIX + "/settings").status_code == 200


def test_routes_from_the_script_honour_api_auth(monkeypatch, sd1_bundle):
    import fake_webui

    fake = fake_webui.install(sd1_bundle, monkeypatch)
    fake.shared.cmd_opts.api, fake.shared.cmd_opts.api_auth = True, "carol:pw"
    _load_script(monkeypatch)
    app = FastAPI()
    fake.script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    assert client.get(PREFIX + "/runs").status_code == 401
    assert client.get(PREFIX + "/runs", auth=("carol", "pw")).json() == {"runs": []}


# -- the folders a run asked for over HTTP writes to ----------------------------------------------
def _tree(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), folder)
                  for r, _, files in os.walk(folder) for f in files)


def test_write_folders_outside_the_hosts_are_refused_naming_the_setting(tmp_path, demo_dataset):
    host_dir, elsewhere = tmp_path / "host", tmp_path / "elsewhere"
    elsewhere.mkdir()
    host = StandaloneHost(str(host_dir))
    app = FastAPI()
    add_routes(app, host, RunManager(host))
    client = TestClient(app)
    lora = host_dir / "Lora"
    os.symlink(elsewhere, lora / "link_out")  # inside by name, outside in fact
    base = {**RUN, "data": {**RUN["data"], "dataset_dir": demo_dataset}}
    cases = [("save.output_dir", str(elsewhere)),
             ("save.output_dir", str(lora / ".." / ".." / "elsewhere")),
             ("save.output_dir", str(lora / "link_out" / "sub")),
             ("save.run_dir", str(elsewhere / "runs")),
             ("data.cache_dir", str(elsewhere / "cache")),
             ("save.output_dir", "relative_folder")]
    before = _tree(tmp_path)
    for path, value in cases:
        section, key = path.split(".")
        body = {**base, section: {**base.get(section, {}), key: value}}
        if path == "data.cache_dir":
            body["data"]["cache_to_disk"] = True
        r = client.post(PREFIX + "/runs", json=body)
        assert r.status_code == 422, (path, value, r.text)
        answer = r.json()
        assert answer["field"] == path and "outside the folders" in answer["error"], answer
        assert str(lora) in answer["error"] and str(host_dir / "runs") in answer["error"]
        assert [p["field"] for p in answer["problems"]] == [path]
    # a bad setting beside it is reported too, all at once
    body = {**base, "network": {"rank": 0}, "save": {"output_dir": str(elsewhere)}}
    fields = {p["field"] for p in client.post(PREFIX + "/runs", json=body).json()["problems"]}
    assert fields == {"network.rank", "save.output_dir"}
    assert _tree(tmp_path) == before and client.get(PREFIX + "/runs").json()["runs"] == []

    # a folder below the host's is fine: the run trains and writes there
    body = {**base, "save": {"output_name": "inside", "output_dir": str(lora / "sub")},
            "data": {**base["data"], "cache_to_disk": True,
                     "cache_dir": str(host_dir / "runs" / "cache")}}
    r = client.post(PREFIX + "/runs", json=body)
    assert r.status_code == 200, r.text
    run_id, deadline = r.json()["id"], time.time() + 600
    while (status := client.get(f"{PREFIX}/runs/{run_id}").json())["state"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.1)
    assert status["state"] == "finished", status
    assert status["files"] == [str(lora / "sub" / "inside.safetensors")]
    assert os.listdir(elsewhere) == []


def test_inside_resolves_links_and_dots(tmp_path):
    from lora_train_ext.runs import inside

    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    os.symlink(tmp_path, root / "up")
    assert inside(str(root), [str(root)]) and inside(str(root / "a" / "new" / "x"), [str(root)])
    assert not inside(str(root / "a" / ".." / ".."), [str(root)])
    assert not inside(str(root / "up" / "root2"), [str(root)])
    assert not inside(str(tmp_path / "root2"), [str(root)])  # a prefix of the name is not inside
    assert inside(str(tmp_path / "root2"), [str(root), str(tmp_path)])


def test_unknown_runs_and_bad_credentials_get_the_error_shape_other_routes_keep_theirs(tmp_path):
    from fastapi import HTTPException

    host = StandaloneHost(str(tmp_path))
    app = FastAPI()

    @app.get("/other")  # a route of the WebUI or another extension
    def other():
        raise HTTPException(status_code=404, detail="theirs")
    add_routes(app, host, RunManager(host), credentials={"alice": "secret"})
    client = TestClient(app)
    r = client.get(PREFIX + "/runs", auth=("alice", "wrong"))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
    assert r.json()["field"] == "auth" and "incorrect username or password" in r.json()["error"]
    auth = ("alice", "secret")
    for method, path in [("get", "/runs/nope"), ("post", "/runs/nope/stop"),
                         ("post", "/runs/nope/pause"), ("post", "/runs/nope/resume"),
                         ("post", "/runs/nope/cancel"), ("get", "/runs/nope/snapshots")]:
        r = getattr(client, method)(PREFIX + path, auth=auth)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["field"] == "run_id" and r.json()["error"].startswith("no run nope"), r.text
    r = client.post(PREFIX + "/runs/nope/move", json={"by": 1}, auth=auth)
    assert r.status_code == 404 and r.json()["field"] == "run_id"
    r = client.post(PREFIX + "/snapshot-grid", json={"run": "nope", "prompt": "x"}, auth=auth)
    assert r.status_code == 404 and r.json()["field"] == "run_id"
    assert client.get("/other").json() == {"detail": "theirs"}


GENERATION_ROUTES = ["/test", "/snapshot-grid", "/merge/compare"]
BAD_GENERATION = [("steps", 10**9), ("steps", 0), ("steps", "abc"), ("steps", None), ("steps", 2.5),
                  ("steps", True), ("size", 10**9), ("size", 60), ("size", 100), ("size", -64),
                  ("seed", -5), ("seed", 2**70), ("seed", [1]), ("cfg_scale", 1e9),
                  ("cfg_scale", "nan"), ("cfg_scale", "x")]


@pytest.mark.parametrize("route", GENERATION_ROUTES)
def test_generation_numbers_are_bounded_and_checked_before_the_lock(route, tmp_path):
    """Huge steps or sizes would hold the GPU (or exhaust its memory) for everyone; each bad one
    is refused naming its field at once, even while a run holds the host's lock."""
    host = StandaloneHost(str(tmp_path))
    app = FastAPI()
    add_routes(app, host, RunManager(host))
    client = TestClient(app)
    with host.exclusive("a run"):  # a waiting request would hang here, not fail
        for field, value in BAD_GENERATION:
            if field == "cfg_scale" and route != "/test":
                continue
            r = client.post(PREFIX + route, json={"lora": "x", "snapshots": ["x"], "prompt": "p",
                                                  field: value})
            assert r.status_code == 422, (route, field, value, r.text)
            assert r.json()["field"] == field and "give" in r.json()["error"], r.text
        r = client.post(PREFIX + "/snapshot-grid", json={"snapshots": "abc", "prompt": "p"})
        assert r.status_code == 422 and r.json()["field"] == "snapshots"
    assert not os.path.exists(tmp_path / "grids")


def test_number_helpers_take_what_json_and_forms_send():
    from lora_train_ext.api import real_number, whole_number

    assert whole_number({"s": "12"}, "s", 1, 1, 150) == 12
    assert whole_number({"s": 12.0}, "s", 1, 1, 150) == 12
    assert whole_number({}, "s", 20, 1, 150) == 20
    assert real_number({"c": "7.5"}, "c", 7.0, 0, 30) == 7.5
    assert real_number({"c": 0}, "c", 7.0, 0, 30) == 0.0


def test_memory_estimate_route_and_run_reply(client, demo_dataset, monkeypatch):
    """POST /estimate gives the estimate without queueing; a bigger batch needs more; when it
    does not fit the free memory, the reply names options that would make it fit."""
    auth = ("alice", "secret")
    body = {**RUN, "data": {**RUN["data"], "dataset_dir": demo_dataset}}
    r = client.post(PREFIX + "/estimate", json=body, auth=auth)
    assert r.status_code == 200, r.text
    mem = r.json()["memory"]
    assert mem["kind"] == "RSS" and mem["device"] == "cpu"
    assert mem["model_bytes"] > 0 and mem["run_bytes"] > mem["parts"]["activations"] > 0
    assert mem["peak_bytes"] == mem["model_bytes"] + mem["run_bytes"]
    assert client.get(PREFIX + "/queue", auth=auth).json()["queue"] == []
    bigger = {**body, "train": {**body["train"], "batch_size": 8}}
    mem8 = client.post(PREFIX + "/estimate", json=bigger, auth=auth).json()["memory"]
    assert mem8["parts"]["activations"] > 3 * mem["parts"]["activations"]
    # a device with little free memory: the estimate says so and names what fits
    from lora_train_ext.core import memory

    monkeypatch.setattr(memory, "device_free_bytes",
                        lambda device: int(mem8["run_bytes"] * 0.6))
    tight = client.post(PREFIX + "/estimate", json=bigger, auth=auth).json()
    assert tight["memory"]["fits"] is False
    suggestions = tight["memory"]["suggestions"]
    assert any("gradient_checkpointing" in s or "batch_size = 1" in s for s in suggestions), \
        suggestions
    assert any("does not fit" in w for w in tight["warnings"])
    r = client.post(PREFIX + "/estimate", json={"network": {"rank": 0}}, auth=auth)
    assert r.status_code == 422 and r.json()["field"] == "network.rank"
