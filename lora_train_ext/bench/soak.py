"""Soak: many short runs on the standalone host, with stops, resumes, bad requests and test grids
in between; then the process is checked for what it kept.

    python -m lora_train_ext.bench.soak [--runs 50] [--steps 4] [--time-limit 1800] [--json]
                                        [--kinds plain,queue,...] [--keep DIR]

Everything goes through the HTTP API's handlers (FastAPI's in-process test client, no socket) on
a `StandaloneHost` (the tiny in-code SD1 model the demo uses) with one `RunManager`, as a script
would drive the extension. The runs come in a fixed cycle, each kind with its own output name:

- plain: a run to its end, then a TE x UNet test grid of its file (POST /test);
- stop + resume: a long run stopped with POST /stop once it trains, then resumed from its state
  folder (the trainer on the host's model, under the host's lock, as `train --resume` does) for
  `--steps` more steps;
- pause: a long run paused (POST /pause), a test grid of the paused snapshot while it waits,
  POST /resume, then POST /stop;
- interrupt: a long run stopped by the host's Interrupt (the WebUI's button);
- queue: a long run, two more queued behind it (their positions checked), the last moved up
  (POST /move), the other cancelled while queued, the long one stopped; the moved one runs.

After each cycle, with no run active, a batch of 37 bad requests (settings out of range, unknown
optimizer, bad output names, missing or wrong paths, folders to write outside the host's, bodies
that are not JSON objects or are too big, huge grid steps and sizes, unknown runs, grids of
missing files) must each be refused with a 4xx in the error shape, naming the expected field,
and must leave the output folder's file tree as it was (and write nothing outside it).

Bounded: at most `--runs` training runs, no new cycle after `--time-limit` seconds, and every wait
for a state ends after `--wait` seconds with an error. At the end, with the queue empty:

- the base model's weights hash the same as at the start;
- every file a run reported (final file, snapshots, resumed runs' files) loads, is finite, has the
  bytes it had when the run ended (sha256) and says the steps the run reported (`ss_steps`);
- RSS (start: the host built; after the first cycle; peak sampled after every action; end) and the
  number of open file descriptors and threads at start and end.

Prints the figures (one JSON object with --json) on stdout, a line per cycle on stderr; exit
status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import torch

KINDS = ("plain", "stop_resume", "pause", "interrupt", "queue")
LONG_STEPS = 100_000  # a run that only ends when stopped


class SoakError(RuntimeError):
    """A check of the soak failed, or a state was not reached in time."""


# -- measurements ----------------------------------------------------------------------------------
def rss_mib() -> float | None:
    """Resident set size now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def open_files() -> int | None:
    """Open file descriptors of this process (Linux /proc; None elsewhere)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1  # the listing's own descriptor
        except OSError:
            continue
    return None


def weights_sha256(modules) -> str:
    """sha256 over every parameter and buffer of the base model (names, dtypes, bytes)."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in sorted(module.state_dict(keep_vars=False).items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree(folder: str) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file under `folder`."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return out


# -- the soak ------------------------------------------------------------------------------
class Soak:
    def __init__(self, out_dir: str, steps: int = 4, wait_s: float = 600.0,
                 log: Callable[[str], None] | None = None):
        from fastapi import FastAPI
        from fastapi.testclient import TestClient

        from ..api import PREFIX, add_routes
        from ..demo import demo_dataset_dir
        from ..host.standalone import StandaloneHost
        from ..runs import RunManager

        self.out_dir = out_dir
        self.steps = steps
        self.wait_s = wait_s
        self.log = log or (lambda text: None)
        self.dataset = demo_dataset_dir()
        self.elsewhere = out_dir.rstrip(os.sep) + "_elsewhere"  # outside the host's folders
        self.host = StandaloneHost(out_dir)
        self.manager = RunManager(self.host)
        app = FastAPI()
        add_routes(app, self.host, self.manager)
        self.client = TestClient(app)
        self.prefix = PREFIX
        self.expected: list[dict[str, Any]] = []  # files to check at the end
        self.counts = {k: 0 for k in ("runs", "finished", "stopped", "resumed_from_state",
                                      "paused_and_resumed", "interrupted", "queued_behind",
                                      "moved", "cancelled", "grids", "bad_requests",
                                      "bad_requests_refused", "cycles")}
        self.problems: list[str] = []
        self.rss_samples: list[float] = []
        self._names = 0

    # -- helpers ------------------------------------------------------------------------------
    def sample(self) -> None:
        value = rss_mib()
        if value is not None:
            self.rss_samples.append(value)

    def body(self, steps: int, name: str) -> dict[str, Any]:
        return {"data": {"dataset_dir": self.dataset, "resolution": "64", "enable_buckets": False},
                "train": {"max_steps": steps, "dtype": "fp32", "batch_size": 2, "seed": self._names},
                "optim": {"lr": 0.01}, "network": {"rank": 4}, "save": {"output_name": name}}

    def name(self, kind: str) -> str:
        self._names += 1
        return f"soak_{self._names:03d}_{kind}"

    def post(self, path: str, json_body: Any = None, status: int = 200) -> dict[str, Any]:
        r = self.client.post(self.prefix + path, json=json_body)
        if r.status_code != status:
            raise SoakError(f"POST {path}: {r.status_code} {r.text[:300]} (expected {status})")
        self.sample()
        return r.json()

    def status(self, run_id: str) -> dict[str, Any]:
        r = self.client.get(f"{self.prefix}/runs/{run_id}")
        if r.status_code != 200:
            raise SoakError(f"GET /runs/{run_id}: {r.status_code} {r.text[:300]}")
        return r.json()

    def wait(self, run_id: str, done: Callable[[dict], bool], what: str) -> dict[str, Any]:
        """Poll the run's status until `done(status)`; SoakError after `wait_s` seconds."""
        deadline = time.monotonic() + self.wait_s
        while True:
            status = self.status(run_id)
            if done(status):
                self.sample()
                return status
            if status["state"] in ("failed", "cancelled") and what not in status["state"]:
                raise SoakError(f"run {run_id} ({status['output_name']}) is {status['state']} "
                                f"while waiting for {what}: {status['error']}")
            if time.monotonic() > deadline:
                raise SoakError(f"run {run_id} not {what} after {self.wait_s:.0f} s: {status}")
            time.sleep(0.02)

    def start(self, steps: int, kind: str) -> dict[str, Any]:
        name = self.name(kind)
        reply = self.post("/runs", self.body(steps, name))
        self.counts["runs"] += 1
        return {**reply, "name": name}

    def ended(self, status: dict[str, Any], state: str) -> None:
        """A run ended in `state`: remember its files' bytes to check them at the end."""
        if status["state"] != state:
            raise SoakError(f"run {status['id']} ended {status['state']}, expected {state}: "
                            f"{status['error'] or status['message']}")
        self.counts[state] += 1
        if not status["files"]:
            raise SoakError(f"run {status['id']} ({state}) reported no file")
        final = status["files"][0]
        self.expected.append({"path": final, "steps": status["step"], "sha256": file_sha256(final),
                              "run": status["id"]})
        for snapshot in status["files"][1:]:
            self.expected.append({"path": snapshot, "steps": None,
                                  "sha256": file_sha256(snapshot), "run": status["id"]})

    def trains(self, run_id: str) -> dict[str, Any]:
        return self.wait(run_id, lambda s: s["state"] == "running" and s["step"] >= 1, "running")

    def grid(self, lora: str) -> None:
        reply = self.post("/test", {"lora": lora, "prompt": "shp style, red circle", "steps": 2,
                                    "size": 64, "te_strengths": "0, 1", "unet_strengths": "0, 1"})
        if len(reply["prompts"]) != 4 or not reply["grid_png_base64"]:
            raise SoakError(f"grid of {lora}: {len(reply['prompts'])} cells")
        os.remove(reply["path"])  # the host keeps grids; the soak checks their count, not the PNGs
        self.counts["grids"] += 1

    # -- the kinds of run ------------------------------------------------------------------------
    def plain(self) -> None:
        run = self.start(self.steps, "plain")
        status = self.wait(run["id"], lambda s: s["state"] not in ("queued", "running"), "finished")
        self.ended(status, "finished")
        self.grid(run["name"])

    def stop_resume(self) -> None:
        from ..core.config import RunConfig
        from ..core.errors import UserError
        from ..core.trainer import train

        run = self.start(LONG_STEPS, "stop")
        self.trains(run["id"])
        self.post(f"/runs/{run['id']}/stop")
        status = self.wait(run["id"], lambda s: s["state"] not in ("queued", "running"), "stopped")
        self.ended(status, "stopped")
        record = self.manager.get(run["id"])
        from ..core.run_state import state_dir

        folder = state_dir(record.config)
        cfg = RunConfig.read(os.path.join(folder, "config.json"))
        cfg.train.max_steps = status["step"] + self.steps  # a few more steps, not 100 000
        cfg.save.output_name = f"{run['name']}_resumed"  # the stopped run's file stays as it was
        with self.host.exclusive("lora-train soak resume"), self.host.prepared_model() as bundle:
            try:
                result = train(bundle, cfg, resume_dir=folder)
            except UserError as e:
                raise SoakError(f"resume from {folder}: {e}") from None
        self.counts["runs"] += 1
        self.counts["resumed_from_state"] += 1
        if result.stopped or result.steps != cfg.train.max_steps:
            raise SoakError(f"resumed run ended at {result.steps} of {cfg.train.max_steps}")
        self.expected.append({"path": result.path, "steps": result.steps,
                              "sha256": file_sha256(result.path), "run": f"{run['id']} resumed"})
        self.sample()

    def pause(self) -> None:
        run = self.start(LONG_STEPS, "pause")
        self.trains(run["id"])
        self.post(f"/runs/{run['id']}/pause")
        status = self.wait(run["id"], lambda s: s["state"] == "paused", "paused")
        snapshot = self.manager.get(run["id"]).paused_snapshot
        self.grid(os.path.splitext(os.path.basename(snapshot))[0])
        step = status["step"]
        self.post(f"/runs/{run['id']}/resume")
        self.wait(run["id"], lambda s: s["state"] == "running" and s["step"] > step, "running")
        self.post(f"/runs/{run['id']}/stop")
        status = self.wait(run["id"], lambda s: s["state"] not in ("queued", "running", "paused"),
                           "stopped")
        self.ended(status, "stopped")
        self.counts["paused_and_resumed"] += 1

    def interrupt(self) -> None:
        run = self.start(LONG_STEPS, "interrupt")
        self.trains(run["id"])
        self.host.interrupt.set()  # the WebUI's Interrupt button
        status = self.wait(run["id"], lambda s: s["state"] not in ("queued", "running"), "stopped")
        self.ended(status, "stopped")
        if "interrupted" not in status["message"]:
            raise SoakError(f"an interrupted run says {status['message']!r}")
        self.counts["interrupted"] += 1

    def queue(self) -> None:
        long = self.start(LONG_STEPS, "queue_long")
        self.trains(long["id"])
        behind = self.start(self.steps, "queue_cancelled")
        moved = self.start(self.steps, "queue_moved")
        self.counts["runs"] -= 1  # the cancelled one never trains
        if (behind["position"], moved["position"]) != (1, 2):
            raise SoakError(f"queue positions {behind['position']}, {moved['position']}, not 1, 2")
        self.counts["queued_behind"] += 2
        order = self.post(f"/runs/{moved['id']}/move", {"by": -1})["queue"]
        if order != [moved["id"], behind["id"]]:
            raise SoakError(f"after the move the queue is {order}")
        self.counts["moved"] += 1
        cancelled = self.post(f"/runs/{behind['id']}/cancel")
        if cancelled["state"] != "cancelled":
            raise SoakError(f"a queued run cancelled is {cancelled['state']}")
        self.counts["cancelled"] += 1
        self.post(f"/runs/{long['id']}/stop")
        status = self.wait(long["id"], lambda s: s["state"] not in ("queued", "running"), "stopped")
        self.ended(status, "stopped")
        status = self.wait(moved["id"], lambda s: s["state"] not in ("queued", "running"), "finished")
        self.ended(status, "finished")
        self.grid(moved["name"])

    # -- bad requests ------------------------------------------------------------------------------
    def bad_requests(self) -> list[tuple[str, str, Any, int, str]]:
        """(path, kind, body, expected status, expected field): each must be refused."""
        missing = os.path.join(self.out_dir, "no_such_folder")
        empty = os.path.join(self.out_dir, "empty_dataset")
        os.makedirs(empty, exist_ok=True)
        a_file = self.expected[0]["path"] if self.expected else __file__
        finished = next((r.id for r in self.manager.list() if r.state == "finished"), "none")
        some_lora = next((os.path.splitext(os.path.basename(e["path"]))[0]
                          for e in self.expected), "none")

        def run(**sections):
            body = self.body(self.steps, "bad_request")
            for key, value in sections.items():
                section, _, name = key.partition("__")
                body[section] = {**body.get(section, {}), name: value}
            return body
        return [
            ("/runs", "json", run(network__rank=0), 422, "network.rank"),
            ("/runs", "json", run(network__rank=-3), 422, "network.rank"),
            ("/runs", "json", run(optim__optimizer="NoSuchOptimizer"), 422, "optim.optimizer"),
            ("/runs", "json", run(optim__lr=-1), 422, "optim.lr"),
            ("/runs", "raw", json.dumps(run(optim__lr=math.nan)).encode(), 422, "optim.lr"),
            ("/runs", "json", run(train__max_steps="abc"), 422, "train.max_steps"),
            ("/runs", "json", run(train__max_steps=10**30), 422, "train.max_steps"),
            ("/runs", "json", run(train__nonsense=1), 422, "train.nonsense"),
            ("/runs", "json", run(save__output_name="n" * 300), 422, "save.output_name"),
            ("/runs", "json", run(save__output_name="CON"), 422, "save.output_name"),
            ("/runs", "json", run(save__output_name="../escape"), 422, "save.output_name"),
            ("/runs", "json", run(save__output_name="a\u0000b"), 422, "save.output_name"),
            ("/runs", "json", run(save__output_name="  "), 422, "save.output_name"),
            ("/runs", "json", run(data__dataset_dir=missing), 422, "data.dataset_dir"),
            ("/runs", "json", run(data__dataset_dir=a_file), 422, "data.dataset_dir"),
            ("/runs", "json", run(data__dataset_dir=empty), 422, "data.dataset_dir"),
            ("/runs", "json", run(data__resolution="-64"), 422, "data.resolution"),
            ("/runs", "json", run(save__output_dir=self.elsewhere), 422, "save.output_dir"),
            ("/runs", "json", run(save__run_dir=os.path.join(self.host.lora_dir(), "..", "..",
                                                              "runs_elsewhere")),
             422, "save.run_dir"),
            ("/runs", "json", run(data__cache_to_disk=True, data__cache_dir=self.elsewhere), 422,
             "data.cache_dir"),
            ("/runs", "raw", b"{not json", 422, "body"),
            ("/runs", "raw", b"[1, 2, 3]", 422, "body"),
            ("/runs", "raw", b"", 422, "body"),
            ("/runs", "raw", b"\xff\xfe\x00garbage", 422, "body"),
            ("/runs", "raw", b"null", 422, "body"),
            ("/runs", "raw", b"{" + b" " * (1 << 20) + b"}", 413, "body"),
            ("/test", "json", {"lora": "no_such_lora", "prompt": "x", "steps": 2, "size": 64},
             404, "lora"),
            ("/test", "json", {"lora": some_lora, "prompt": "x", "steps": 2, "size": 60}, 422, "size"),
            ("/test", "json", {"lora": some_lora, "prompt": "x", "size": 10**6}, 422, "size"),
            ("/test", "json", {"lora": some_lora, "prompt": "x", "steps": 10**9}, 422, "steps"),
            ("/test", "json", {"lora": some_lora, "prompt": "", "steps": 2, "size": 64}, 422,
             "test.prompt"),
            ("/test", "json", {"lora": some_lora, "prompt": "x", "te_strengths": "a, b"}, 422,
             "te_strengths"),
            ("/runs/no_such_run/stop", "none", None, 404, "run_id"),
            ("/snapshot-grid", "json", {"run": "no_such_run", "prompt": "x"}, 404, "run_id"),
            (f"/runs/{finished}/pause", "none", None, 409, "run_id"),
            (f"/runs/{finished}/move", "json", {"by": "x"}, 422, "by"),
            ("/snapshot-grid", "json", {"snapshots": [], "prompt": "x"}, 422, "snapshots"),
        ]

    def refuse_all(self) -> None:
        """Every bad request refused in the error shape, naming the field, writing nothing."""
        cases = self.bad_requests()
        before = tree(self.out_dir)
        runs_before = len(self.manager.runs)
        for path, kind, body, expected, field in cases:
            self.counts["bad_requests"] += 1
            url = self.prefix + path
            if kind == "json":
                r = self.client.post(url, json=body)
            elif kind == "raw":
                r = self.client.post(url, content=body, headers={"content-type": "application/json"})
            else:
                r = self.client.post(url)
            try:
                answer = r.json()
            except ValueError:
                answer = {}
            said = answer.get("field", "") if isinstance(answer, dict) else ""
            shaped = isinstance(answer, dict) and isinstance(answer.get("error"), str)
            if r.status_code == expected and shaped and said == field:
                self.counts["bad_requests_refused"] += 1
            else:
                self.problems.append(f"bad request POST {path} ({field or kind}): {r.status_code} "
                                     f"{r.text[:200]} (expected {expected} naming {field!r})")
        self.sample()
        after = tree(self.out_dir)
        if after != before:
            changed = sorted(set(after) ^ set(before)
                             | {k for k in after if after[k] != before.get(k)})
            self.problems.append(f"bad requests changed files: {changed[:5]}")
        if os.path.exists(self.elsewhere):
            self.problems.append(f"a bad request wrote outside the host's folders: {self.elsewhere}")
        if len(self.manager.runs) != runs_before:
            self.problems.append("a bad request created a run record")

    # -- the whole soak ----------------------------------------------------------------------------
    def run(self, runs: int, time_limit: float, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
        gc.collect()
        base = weights_sha256(self.host.bundle.base_modules())
        start = {"rss_mib": rss_mib(), "open_files": open_files(),
                 "threads": threading.active_count()}
        t0 = time.monotonic()
        after_first: float | None = None
        work = {"plain": self.plain, "stop_resume": self.stop_resume, "pause": self.pause,
                "interrupt": self.interrupt, "queue": self.queue}
        unknown = [k for k in kinds if k not in work]
        if unknown or not kinds:
            raise SoakError(f"kinds: {unknown or 'none'}; choose from {', '.join(KINDS)}")
        i = 0
        while self.counts["runs"] < runs and time.monotonic() - t0 < time_limit:
            kind = kinds[i % len(kinds)]
            work[kind]()
            i += 1
            self.log(f"{kind}: {self.counts['runs']} runs, {time.monotonic() - t0:.0f} s, "
                     f"RSS {rss_mib() or 0:.0f} MiB, {open_files()} open files")
            if i == len(kinds) or (i < len(kinds) and self.counts["runs"] >= runs):
                after_first = rss_mib()
            if i % len(kinds) == 0 or self.counts["runs"] >= runs:
                self.refuse_all()
                self.counts["cycles"] += 1
        if self.counts["cycles"] == 0:
            self.refuse_all()
        elapsed = time.monotonic() - t0
        self.check_end(base)
        gc.collect()
        end = {"rss_mib": rss_mib(), "open_files": open_files(),
               "threads": threading.active_count()}
        loaded = self.check_files()
        if start["open_files"] is not None and end["open_files"] != start["open_files"]:
            self.problems.append(f"open files {start['open_files']} at the start, "
                                 f"{end['open_files']} at the end")
        peak = max(self.rss_samples) if self.rss_samples else None
        return {
            "runs": self.counts["runs"], "seconds": round(elapsed, 1),
            "counts": dict(self.counts), "files_checked": loaded,
            "base_sha256_start": base,
            "base_sha256_end": weights_sha256(self.host.bundle.base_modules()),
            "rss_mib": {"start": _r(start["rss_mib"]), "after_first_cycle": _r(after_first),
                        "peak_sampled": _r(peak), "end": _r(end["rss_mib"])},
            "open_files": {"start": start["open_files"], "end": end["open_files"]},
            "threads": {"start": start["threads"], "end": end["threads"]},
            "files": [dict(e) for e in self.expected],
            "queue_left": [r.id for r in self.manager.queued()],
            "active_left": [r.id for r in self.manager.list()
                            if r.state in ("queued", "running", "paused")],
            "problems": list(self.problems),
        }

    def check_end(self, base: str) -> None:
        """The queue's worker has ended, nothing is active, the base weights are as they were."""
        deadline = time.monotonic() + self.wait_s
        while self.manager._worker is not None and self.manager._worker.is_alive():
            if time.monotonic() > deadline:
                self.problems.append("the queue's worker thread did not end")
                break
            time.sleep(0.05)
        if self.manager.queued():
            self.problems.append(f"{len(self.manager.queued())} runs left in the queue")
        if weights_sha256(self.host.bundle.base_modules()) != base:
            self.problems.append("the base model's weights changed")

    def check_files(self) -> int:
        """Every reported file loads, is finite, has the bytes it had when its run ended and
        the steps its run reported; returns how many were checked."""
        from ..core.lora_file import load_lora

        for entry in self.expected:
            path = entry["path"]
            try:
                tensors, meta = load_lora(path)
            except Exception as e:  # noqa: BLE001 - reported as a problem
                self.problems.append(f"{path} does not load: {type(e).__name__}: {e}")
                continue
            if not tensors or not all(torch.isfinite(t).all() for t in tensors.values()):
                self.problems.append(f"{path}: empty or not finite")
            if file_sha256(path) != entry["sha256"]:
                self.problems.append(f"{path} changed after its run ended")
            if entry["steps"] is not None and meta.get("ss_steps") != str(entry["steps"]):
                self.problems.append(f"{path}: ss_steps {meta.get('ss_steps')}, the run reported "
                                     f"{entry['steps']}")
        return len(self.expected)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def soak(runs: int = 50, steps: int = 4, out_dir: str = "", time_limit: float = 1800.0,
         wait_s: float = 600.0, log: Callable[[str], None] | None = None,
         kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """Run the soak in `out_dir` (a temporary folder, removed after, when empty); the kinds of
    run in the order they cycle."""
    folder = out_dir or tempfile.mkdtemp(prefix="lora-train-soak-")
    try:
        return Soak(folder, steps=steps, wait_s=wait_s, log=log).run(runs, time_limit, kinds)
    finally:
        if not out_dir:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_train_ext.bench.soak",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="training runs in all (default 50)")
    parser.add_argument("--steps", type=int, default=4, help="steps of a short run (default 4)")
    parser.add_argument("--time-limit", type=float, default=1800.0,
                        help="no new cycle after this many seconds (default 1800)")
    parser.add_argument("--wait", type=float, default=600.0,
                        help="longest wait for a run's state, seconds (default 600)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"kinds of run, in the order they cycle (default {','.join(KINDS)})")
    parser.add_argument("--keep", default="", help="work in this folder and keep it")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    def log(text: str) -> None:  # progress on stderr, the figures on stdout
        print(text, file=sys.stderr, flush=True)
    try:
        figures = soak(args.runs, args.steps, args.keep, args.time_limit, args.wait, log,
                       tuple(k.strip() for k in args.kinds.split(",") if k.strip()))
    except SoakError as e:
        print(f"soak failed: {e}", file=sys.stderr)
        return 1
    except ImportError as e:  # fastapi / httpx: the WebUI has them, a bare install may not
        print(f"the soak drives the HTTP API and needs fastapi and httpx: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(figures, indent=1))
    else:
        rss, files, c = figures["rss_mib"], figures["open_files"], figures["counts"]
        print(f"runs {figures['runs']} in {figures['seconds']} s: {c['finished']} finished, "
              f"{c['stopped']} stopped, {c['resumed_from_state']} resumed from state, "
              f"{c['paused_and_resumed']} paused and resumed, {c['interrupted']} interrupted, "
              f"{c['cancelled']} cancelled in the queue, {c['grids']} test grids")
        print(f"bad requests refused: {c['bad_requests_refused']} of {c['bad_requests']}")
        print(f"RSS MiB: start {rss['start']}, after the first cycle {rss['after_first_cycle']}, "
              f"peak {rss['peak_sampled']}, end {rss['end']}")
        print(f"open files: start {files['start']}, end {files['end']}; threads "
              f"{figures['threads']['start']} -> {figures['threads']['end']}")
        print(f"base weights unchanged: {figures['base_sha256_start'] == figures['base_sha256_end']}; "
              f"files checked: {figures['files_checked']}")
        for problem in figures["problems"]:
            print(f"PROBLEM: {problem}")
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
