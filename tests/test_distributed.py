"""Distributed training on the CPU (gloo), two processes on 127.0.0.1.

`torchrun --nproc_per_node 2 -m lora_train_ext train` with batch B ends with the weights of one
process with batch 2B, to fp32 rounding (the sums of the all-reduce and of the per-process means
are rounded in another order): seen 1.6e-7 after 12 AdamW steps of two micro-batches (4.5e-7
after 40).
The dataset (5 images, global batch 4) ends each epoch with a batch of one, so the second
process's share is empty there. Ctrl-C on torchrun stops both processes at the same step, rank 0
saves the state and a resume with 2 processes ends on the same weights; a resume with another
number of processes is refused before the model is loaded; a process that fails ends the other
with an error, within a bounded time.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_train_ext import cli
from lora_train_ext.core.models.tiny import build_bundle, write_checkpoint
from lora_train_ext.core.run_state import STATE_FILE
from lora_train_ext.demo import demo_dataset_dir

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
WAIT = 240  # seconds any one command may take (a busy 2-core machine is many times slower)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return dict(clean, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def torchrun_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "lora_train_ext", "train", *args]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_args(*args), capture_output=True, text=True, cwd=ROOT,
                          env=env(), timeout=WAIT)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def max_diff(path_a: str, path_b: str) -> float:
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny SD1 checkpoint and 5 demo images, 1 repeat."""
    root = tmp_path_factory.mktemp("ddp")
    checkpoint = write_checkpoint(build_bundle("sd1", "tiny", seed=0),
                                  str(root / "sd1.safetensors"))
    folder = root / "data" / "1_shapes"
    folder.mkdir(parents=True)
    source = Path(demo_dataset_dir()) / "4_shapes"
    for image in sorted(source.glob("*.png"))[:5]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / (image.stem + ".txt"))
    return root, checkpoint, str(root / "data")


def common(checkpoint: str, dataset: str) -> list[str]:
    return ["--checkpoint", checkpoint, "--dataset", dataset, "--resolution", "64",
            "--no-enable-buckets", "--steps", str(STEPS), "--grad-accum", "2", "--rank", "2",
            "--dtype", "fp32", "--save-dtype", "fp32", "--threads", "1", "--output-name", "r"]


def test_the_shares_of_two_processes_are_the_global_batch(inputs):
    from lora_train_ext.core.config import DataConfig
    from lora_train_ext.core.data import TrainData, share_of

    assert [share_of(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [share_of(1, r, 3) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
    cfg = DataConfig(dataset_dir=inputs[2], resolution="64", enable_buckets=False, flip=True,
                     crop="random", shuffle_tags=True)
    whole = TrainData(cfg, batch_size=4, seed=3, workers=1)
    shares = [TrainData(cfg, batch_size=4, seed=3, workers=1) for _ in range(2)]
    for rank, data in enumerate(shares):
        data.shard(rank, 2)
    for epoch in (0, 1):
        sizes = []
        for full, *parts in zip(whole.batches(epoch), *(d.batches(epoch) for d in shares)):
            assert [p.part.size for p in parts] == [len(full)] * 2
            assert sum((list(p.part.slots) for p in parts), []) == list(range(len(full)))
            assert sum((p.captions for p in parts), []) == full.captions
            assert torch.equal(torch.cat([p.images for p in parts if len(p)]), full.images)
            assert all(p.part.bucket == (64, 64) for p in parts)
            sizes.append(tuple(len(p) for p in parts))
        assert sorted(sizes) == [(1, 0), (2, 2)]  # 5 samples: a global batch of 4, one of 1


@pytest.fixture(scope="module")
def runs(inputs):
    """One process with batch 4 (its state saved), and two with batch 2: stopped by Ctrl-C on
    torchrun after the first step, then resumed with two processes."""
    root, checkpoint, dataset = inputs
    args = common(checkpoint, dataset)
    threads = torch.get_num_threads()
    try:
        assert cli.main(["train", *args, "--batch-size", "4", "--save-state",
                         "--out", str(root / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    proc = subprocess.Popen(torchrun_args(*args, "--batch-size", "2", "--out", str(root / "two")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env())
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if f"] 1/{STEPS}" in line:  # rank 0 has taken a step
            proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends torchrun
            break
    out, err = proc.communicate(timeout=WAIT)
    stopped = subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(seen) + err)
    resumed = torchrun("--resume", str(root / "two" / "r-state"), "--threads", "1")
    return {"root": root, "stopped": stopped, "resumed": resumed}


def test_two_processes_with_batch_b_train_the_weights_of_one_with_batch_2b(runs):
    root, resumed = runs["root"], runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr
    lines = json_lines(resumed.stdout)
    assert len(lines) == 1, resumed.stdout  # rank 0 alone prints
    assert (lines[0]["steps"], lines[0]["stopped"]) == (STEPS, False)
    worst = max_diff(str(root / "one" / "r.safetensors"), str(root / "two" / "r.safetensors"))
    assert worst < 2e-6, worst
    one = json.loads((root / "one" / "r.history.json").read_text())
    two = json.loads((root / "two" / "r.history.json").read_text())
    assert [h["step"] for h in two] == list(range(1, STEPS + 1))  # rank 0's, whole
    assert [round(h["loss"], 5) for h in two] == [round(h["loss"], 5) for h in one]
    assert sorted(os.listdir(root / "two")) == sorted(os.listdir(root / "one"))


def test_ctrl_c_stops_both_processes_at_one_step_and_rank_0_saves_the_state(runs):
    stopped, root = runs["stopped"], runs["root"]
    assert stopped.returncode != 0  # torchrun ends on the signal, after its processes
    lines = json_lines(stopped.stdout)
    assert len(lines) == 1, stopped.stdout + stopped.stderr
    assert lines[0]["stopped"] and 1 <= lines[0]["steps"] < STEPS, lines
    assert "torchrun --nproc_per_node 2 -m lora_train_ext train --resume" in stopped.stderr
    state = torch.load(str(root / "two" / "r-state" / STATE_FILE), weights_only=True)
    assert state["world_size"] == 2 and len(state["process_rngs"]) == 2
    assert state["step"] == lines[0]["steps"]


def test_a_resume_with_another_number_of_processes_is_refused(runs, capsys):
    root = runs["root"]
    assert cli.main(["train", "--resume", str(root / "two" / "r-state")]) == 2
    err = capsys.readouterr().err
    assert "saved by a run of 2 processes" in err and "this run has one process" in err
    assert "checkpoint:" not in err  # refused before the model is loaded
    refused = torchrun("--resume", str(root / "one" / "r-state"))
    assert refused.returncode != 0
    assert refused.stderr.count("saved by a run of one process") == 1, refused.stderr  # rank 0
    assert "this run has 2 processes" in refused.stderr


# -- a failing process ----------------------------------------------------------------------------
def _worker(rank: int, port: int, root: str, dataset: str, fail_rank: int) -> None:
    """One process of a 2-process run through the library (the trainer under
    distributed.launched); process `fail_rank` raises after its second step."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from conftest import small_run_config

    from lora_train_ext.core import distributed as D
    from lora_train_ext.core.errors import TrainingError
    from lora_train_ext.core.trainer import train

    cfg = small_run_config(root, dataset, steps=STEPS, lr=1e-3, batch_size=2)
    control = D.DistributedControl()
    if rank == fail_rank:
        def fail(event) -> None:
            if event.kind == "step" and event.step == 2:
                raise RuntimeError("injected failure")
        control.add_listener(fail)
    with D.launched("cpu") as dist:
        try:
            train(build_bundle("sd1", "tiny", seed=0), cfg, control, dist=dist)
        except TrainingError as e:
            Path(root, f"error{rank}.txt").write_text(str(e))
            os._exit(3)


def test_a_failing_process_ends_the_other_with_an_error(inputs, tmp_path):
    _, _, dataset = inputs
    spawn = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [spawn.Process(target=_worker, args=(rank, port, str(tmp_path), dataset, 1))
             for rank in range(2)]
    for p in procs:
        p.start()
    deadline = time.time() + WAIT
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    assert not alive, "a process was still running"
    assert procs[1].exitcode not in (0, None)  # the injected failure
    assert procs[0].exitcode == 3
    message = (tmp_path / "error0.txt").read_text()
    assert message.startswith("process 0 of 2: another process of the run stopped"), message
    assert not (tmp_path / "demo_lora.safetensors").exists()  # rank 0 wrote no final file
