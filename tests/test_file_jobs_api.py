"""The file tools as API routes (POST /merge-file, /merge-loras, /extract, /resize): queued as
runs, watched through GET /runs/{id} with their progress; the same files as the command line;
bodies checked whole (422 naming every bad field, nothing queued, nothing written); files named
inside the host's folders only; a stop or a failure leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from lora_train_ext import cli
from lora_train_ext.core.config import NetworkConfig
from lora_train_ext.core.extract import extract_lora
from lora_train_ext.core.lora_file import LoraInfo, save_lora
from lora_train_ext.core.merge import LoraSpec, merge_checkpoint, merge_loras
from lora_train_ext.core.models.tiny import build_bundle, write_checkpoint
from lora_train_ext.core.networks import build_network
from lora_train_ext.core.resize import parse_dynamic, resize_lora
from lora_train_ext.host.standalone import StandaloneHost
from lora_train_ext.runs import ENDED_STATES, RunManager, RunRecord

fastapi = pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lora_train_ext.api import PREFIX, add_routes  # noqa: E402
from lora_train_ext.file_jobs import build_job  # noqa: E402


def _lora(roots, arch, path, cfg, seed):
    net = build_network(roots, arch, cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_lora(net.kohya_state_dict(), LoraInfo(arch=arch, algo=cfg.algo, rank=cfg.rank,
                                               alpha=cfg.alpha, conv_rank=cfg.conv_rank,
                                               conv_alpha=cfg.conv_alpha),
              path, save_dtype="fp32", sidecar=False)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A host folder with a tiny SD1 checkpoint, a tuned one (the base with a LoRA merged) and
    LoRA files in its Lora folder; the files' own copies elsewhere for the core / CLI."""
    root = tmp_path_factory.mktemp("jobs")
    host = StandaloneHost(str(root / "host"))
    ckpt_dir, lora_dir = host.checkpoint_dir(), host.output_dir()
    bundle = build_bundle("sd1", "tiny", seed=0)
    roots = bundle.trainable_roots()
    base = write_checkpoint(bundle, os.path.join(ckpt_dir, "base.safetensors"))
    a = _lora(roots, "sd1", os.path.join(lora_dir, "a.safetensors"),
              NetworkConfig(rank=4, alpha=2.0), 1)
    b = _lora(roots, "sd1", os.path.join(lora_dir, "b.safetensors"),
              NetworkConfig(algo="locon", rank=3, alpha=3.0, conv_rank=2, conv_alpha=1.0), 2)
    sd2 = build_bundle("sd2", "tiny", seed=0)
    other = _lora(sd2.trainable_roots(), "sd2", os.path.join(lora_dir, "sd2.safetensors"),
                  NetworkConfig(rank=2, alpha=2.0), 3)
    tuned = os.path.join(ckpt_dir, "tuned.safetensors")
    merge_checkpoint(base, [LoraSpec(a, 0.9)], tuned)
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(base, outside / "base.safetensors")
    with open(os.path.join(ckpt_dir, "old.ckpt"), "wb") as f:
        f.write(b"not read")
    return {"root": root, "host_dir": str(root / "host"), "base": base, "tuned": tuned,
            "a": a, "b": b, "sd2": other, "outside": str(outside / "base.safetensors")}


@pytest.fixture()
def api(made):
    host = StandaloneHost(made["host_dir"])
    manager = RunManager(host)
    app = FastAPI()
    add_routes(app, host, manager)
    return host, manager, TestClient(app)


def _wait(client, run_id: str, limit: float = 300.0) -> dict:
    """The run's JSON once it has ended (generous bound: a slow machine, never a timing test)."""
    end = time.monotonic() + limit
    while True:
        data = client.get(f"{PREFIX}/runs/{run_id}").json()
        if data["state"] in ENDED_STATES:
            return data
        assert time.monotonic() < end, f"run still {data['state']} after {limit}s"
        time.sleep(0.05)


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tree(folder: str) -> dict[str, tuple[int, int]]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def _ended_ok(data: dict, unit: str) -> None:
    assert data["state"] == "finished", data
    progress = data["progress"]
    assert progress["fraction"] == 1.0 and progress["unit"] == unit
    assert progress["count"] and progress["index"] == progress["count"], progress
    assert data["step"] == data["total"] == progress["count"]


def test_merge_file_run_gives_the_cli_file(api, made, tmp_path):
    host, manager, client = api
    cli_out = str(tmp_path / "api_merged.safetensors")
    assert cli.main(["merge", "--base", made["base"], "--lora", f"{made['a']}:0.7",
                     "--lora", f"{made['b']}:-0.4:1:0.5", "--out", cli_out]) == 0
    r = client.post(PREFIX + "/merge-file", json={"base": "base", "loras": ["a:0.7", "b:-0.4:1:0.5"],
                                                  "name": "api_merged"})
    assert r.status_code == 200, r.json()
    started = r.json()
    assert started["kind"] == "merge-file" and started["state"] in ("queued", "running")
    out = os.path.join(host.checkpoint_dir(), "api_merged.safetensors")
    assert started["out"] == out
    data = _wait(client, started["id"])
    _ended_ok(data, "tensors")
    assert data["kind"] == "merge-file" and data["files"] == [out]
    assert _sha(out) == _sha(cli_out)  # bit for bit the command line's file
    assert data["progress"]["count"] == len(load_file(out))  # tensor i of n, every one
    assert data["result"]["changed_tensors"] > 0 and data["result"]["out"] == out
    assert data["output_name"] == "api_merged"
    assert started["id"] in [r["id"] for r in client.get(PREFIX + "/runs").json()["runs"]]
    # a second job with the same name is refused before it is queued, naming `name`
    again = client.post(PREFIX + "/merge-file", json={"base": "base", "loras": "a", "name": "api_merged"})
    assert again.status_code == 422 and [p["field"] for p in again.json()["problems"]] == ["name"]
    os.remove(out)


def test_merge_loras_extract_resize_runs_equal_the_core(api, made, tmp_path):
    host, manager, client = api
    lora_dir = host.output_dir()
    cases = [
        ("merge-loras", {"loras": "a:0.5\nb:-1.2", "name": "j_ab"}, "modules",
         lambda out: merge_loras([LoraSpec(made["a"], 0.5), LoraSpec(made["b"], -1.2)], out)),
        ("merge-loras", {"loras": ["a:0.8", "b:1.5"], "name": "j_svd", "rank": 3,
                         "precision": "fp32"}, "modules",
         lambda out: merge_loras([LoraSpec(made["a"], 0.8), LoraSpec(made["b"], 1.5)], out,
                                 rank=3, save_dtype="fp32")),
        ("extract", {"base": "base", "tuned": "tuned.safetensors", "rank": 4, "name": "j_ex",
                     "precision": "fp32"}, "tensors",
         lambda out: extract_lora(made["base"], made["tuned"], out, 4, save_dtype="fp32")),
        ("resize", {"lora": "a", "rank": 2, "name": "j_rs"}, "modules",
         lambda out: resize_lora(made["a"], out, rank=2)),
        ("resize", {"lora": "b", "dynamic": "sv_fro:0.9", "name": "j_dyn"}, "modules",
         lambda out: resize_lora(made["b"], out, dynamic=parse_dynamic("sv_fro:0.9"))),
    ]
    for kind, body, unit, core in cases:
        r = client.post(f"{PREFIX}/{kind}", json=body)
        assert r.status_code == 200, (kind, r.json())
        data = _wait(client, r.json()["id"])
        _ended_ok(data, unit)
        out = os.path.join(lora_dir, body["name"] + ".safetensors")
        assert data["files"] == [out] and data["kind"] == kind
        want = str(tmp_path / (body["name"] + ".safetensors"))
        report = core(want)
        got, ref = load_file(out), load_file(want)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), kind
        if hasattr(report, "kept_energy") and report.kept_energy is not None:
            assert data["result"]["kept_energy"] == pytest.approx(report.kept_energy, abs=1e-9)
        os.remove(out)


def _bad_bodies(made):
    return [
        ("merge-file", {}, {"base", "loras", "name"}),
        ("merge-file", {"base": "../outside/base", "loras": "a", "name": "x"}, {"base"}),
        ("merge-file", {"base": made["outside"], "loras": "a", "name": "x"}, {"base"}),
        ("merge-file", {"base": "sub/../../x", "loras": "a", "name": "x"}, {"base"}),
        ("merge-file", {"base": "missing", "loras": "a", "name": "x"}, {"base"}),
        ("merge-file", {"base": "old", "loras": "a", "name": "x"}, {"base"}),  # .ckpt, no opt-in
        ("merge-file", {"base": "base", "loras": "nope:1", "name": "x"}, {"loras"}),
        ("merge-file", {"base": "base", "loras": "a:x", "name": "x"}, {"loras"}),
        ("merge-file", {"base": "base", "loras": 5, "name": "x"}, {"loras"}),
        ("merge-file", {"base": "base", "loras": "a", "name": "../x"}, {"name"}),
        ("merge-file", {"base": "base", "loras": "a", "name": "base"}, {"name"}),  # exists
        ("merge-file", {"base": "base", "loras": "a", "name": "x", "precision": "fp8"},
         {"precision"}),
        ("merge-file", {"base": "base", "loras": "a", "name": "x", "vae": "none"}, {"vae"}),
        ("merge-file", {"base": "base", "loras": "a", "name": "x", "strength": 1}, {"strength"}),
        ("merge-file", {"base": "base", "loras": "a", "name": "x", "allow_ckpt": "yes"},
         {"allow_ckpt"}),
        ("merge-loras", {"loras": "a\nb", "name": "x", "rank": 0}, {"rank"}),
        ("merge-loras", {"loras": "a\nb", "name": "x", "rank": "8"}, {"rank"}),
        ("merge-loras", {"loras": "a blocks=IN:0,OUT:1", "name": "x"}, {"loras"}),
        ("merge-loras", {"loras": "a", "name": "a"}, {"name"}),  # the input's own name
        ("extract", {"base": "base", "tuned": "base", "rank": 4, "name": "x"}, {"tuned"}),
        ("extract", {"base": "base", "tuned": "tuned", "name": "x"}, {"rank"}),
        ("extract", {"base": "base", "tuned": "tuned", "rank": 4, "name": "x",
                     "clamp_quantile": 0}, {"clamp_quantile"}),
        ("extract", {"base": "base", "tuned": "tuned", "rank": 4, "name": "x",
                     "min_diff": -1}, {"min_diff"}),
        ("resize", {"lora": "a", "name": "x"}, {"rank"}),
        ("resize", {"lora": "a", "name": "x", "dynamic": "sv_fro:2"}, {"dynamic"}),
        ("resize", {"lora": "../Lora/a", "name": "x", "rank": 2}, {"lora"}),
        ("resize", {"lora": "missing", "name": "x", "rank": 2, "conv_rank": -1},
         {"lora", "conv_rank"}),
    ]


def test_bad_bodies_are_refused_naming_each_field_and_nothing_is_written(api, made):
    host, manager, client = api
    before = _tree(made["root"])
    for kind, body, fields in _bad_bodies(made):
        r = client.post(f"{PREFIX}/{kind}", json=body)
        assert r.status_code == 422, (kind, body, r.json())
        data = r.json()
        assert {p["field"] for p in data["problems"]} == fields, (kind, body, data)
        assert data["field"] == data["problems"][0]["field"] and data["error"]
        assert all(p["message"] for p in data["problems"])
    assert manager.list() == []  # nothing was queued
    assert _tree(made["root"]) == before  # nothing was written


def test_a_ckpt_is_read_only_with_the_opt_in(api, made):
    host, _, _ = api
    job = build_job("merge-file", host, {"base": "old", "loras": "a", "name": "from_ckpt",
                                         "allow_ckpt": True})
    assert job.inputs["base"].endswith("old.ckpt")  # accepted with the opt-in (not run here)


def test_a_lora_that_does_not_fit_fails_the_run_with_the_modules_and_writes_nothing(api, made):
    host, manager, client = api
    before = _tree(made["root"])
    r = client.post(PREFIX + "/merge-file", json={"base": "base", "loras": "a\nsd2", "name": "bad"})
    assert r.status_code == 200, r.json()
    data = _wait(client, r.json()["id"])
    assert data["state"] == "failed" and data["error"].startswith("loras: ")
    assert data["result"]["field"] == "loras" and "nothing was written" in data["message"]
    assert data["result"]["unmatched"] and all(m.startswith("lora_")
                                               for m in data["result"]["unmatched"])
    assert _tree(made["root"]) == before


def test_a_stopped_job_writes_nothing_and_a_job_does_not_pause(api, made):
    """Stopped after its third tensor (the stop asked from inside the job, so no race)."""
    host, manager, _ = api
    job = build_job("merge-file", host, {"base": "base", "loras": "a", "name": "stopped"})
    record = manager.enqueue_job(job)  # ...runs in the worker; this test drives a twin by hand
    _wait(TestClient(_app(host, manager)), record.id)
    os.remove(job.out)
    twin = build_job("merge-file", host, {"base": "base", "loras": "a", "name": "stopped"})
    inner = twin.work
    rec = RunRecord(id="twin", config=record.config, kind=twin.kind, job=twin)

    def work(progress, on_start):
        def counting(done, total, item):
            progress(done, total, item)
            if rec.progress["index"] == 3:
                rec.control.request_stop("stopped by user")
        return inner(counting, on_start)

    twin.work = work
    before = _tree(made["root"])
    manager.execute_job(rec)
    assert rec.state == "stopped" and rec.progress["index"] == 3, (rec.state, rec.error)
    assert "nothing was written" in rec.message
    assert _tree(made["root"]) == before and not os.path.exists(twin.out)
    with pytest.raises(Exception) as e:
        manager.pause(record.id)
    assert "does not pause" in str(e.value)


def _app(host, manager):
    app = FastAPI()
    add_routes(app, host, manager)
    return app
