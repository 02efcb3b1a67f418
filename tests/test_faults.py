"""Faults while files are written or read back: permissions under the user's umask, a writer
killed with SIGKILL at random points, a full disk in the middle of a save, and a damaged training
state offered to resume. The figures in docs/RELIABILITY.md come from these tests
(`pytest -s tests/test_faults.py` prints them)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save as st_save

from lora_train_ext.core import fsio, lora_file
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.fsio import (STALE_DEAD_PID_SECONDS, DiskFullError, atomic_write,
                                     atomic_write_bytes, clean_stale_temps, temp_path_for)
from lora_train_ext.core.lora_file import LoraInfo, save_lora

ROOT = Path(__file__).resolve().parents[1]


def _tensors(size: int = 64 * 1024) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"lora_unet_x.lora_down.weight": torch.randn(size // 4, generator=g),
            "lora_unet_x.lora_up.weight": torch.randn(size // 4, generator=g),
            "lora_unet_x.alpha": torch.tensor(4.0)}


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _listing(folder) -> dict[str, str]:
    """Every file in the folder (hidden ones too) with its sha256."""
    return {name: _sha(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def _temps(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if fsio.TEMP_NAME.match(n))


# -- 1. permissions ------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_lora_and_sidecar_get_the_umask_permissions(umask, mode, tmp_path):
    """A rewritten file gets the new file's mode too (an old 0600 file does not keep 0600)."""
    path = tmp_path / "perm.safetensors"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    old = os.umask(umask)
    try:
        save_lora(_tensors(1024), LoraInfo(arch="sd1"), str(path), save_dtype="fp32")
        atomic_write_bytes(str(tmp_path / "plain.bin"), b"x")
    finally:
        os.umask(old)
    assert oct(os.stat(path).st_mode & 0o777) == oct(mode)
    assert oct(os.stat(tmp_path / "perm.json").st_mode & 0o777) == oct(mode)
    assert oct(os.stat(tmp_path / "plain.bin").st_mode & 0o777) == oct(mode)
    assert lora_file.read_metadata(str(path))["ss_network_dim"] == "8"


# -- 2a. kill -9 during saves --------------------------------------------------------------------
CHILD = r"""
import sys
from lora_train_ext.core.fsio import atomic_write

target, first = sys.argv[1], int(sys.argv[4])
blobs = [open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()]

def writer(data):
    def write(tmp):
        with open(tmp, "wb") as f:
            for i in range(0, len(data), 1 << 16):
                f.write(data[i:i + (1 << 16)])
    return write

sys.stdout.write("ready\n")
sys.stdout.flush()
n = 0
while True:
    atomic_write(target, writer(blobs[(first + n) % 2]))
    n += 1
    sys.stdout.write(f"{n}\n")
    sys.stdout.flush()
"""

KILL_ROUNDS = 30
KILL_BUDGET_S = 40.0
BLOB_BYTES = 4 << 20


def test_sigkill_at_random_points_never_leaves_a_partial_file(tmp_path):
    """A child overwrites one 4 MiB file with A, B, A, ... through atomic_write (fsync and all);
    it is killed with SIGKILL after a random delay. After every kill the file holds A or B whole,
    and exactly the last content the child finished, or the one it was renaming into place.
    The temp files of killed writers are then removed by clean_stale_temps, and nothing else."""
    rng = random.Random(20240601)
    work = tmp_path / "out"
    work.mkdir()
    blobs = [rng.randbytes(BLOB_BYTES), rng.randbytes(BLOB_BYTES)]
    digests = [hashlib.sha256(b).hexdigest() for b in blobs]
    for name, blob in zip(("a.bin", "b.bin"), blobs):
        (tmp_path / name).write_bytes(blob)
    target = work / "target.bin"
    atomic_write_bytes(str(target), blobs[0])
    current = 0  # which blob the target holds
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    stats = {"rounds": 0, "kills": 0, "completed_writes": 0, "held_A": 0, "held_B": 0,
             "killed_before_first_rename": 0, "killed_mid_write": 0}
    killed_pids = set()
    t0 = time.monotonic()
    for _ in range(KILL_ROUNDS):
        if time.monotonic() - t0 > KILL_BUDGET_S:
            break
        first = 1 - current
        with open(tmp_path / "child.err", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-c", CHILD, str(target),
                                     str(tmp_path / "a.bin"), str(tmp_path / "b.bin"),
                                     str(first)], stdout=subprocess.PIPE, stderr=err,
                                    cwd=str(tmp_path), env=env)
        try:
            assert proc.stdout.readline() == b"ready\n", (tmp_path / "child.err").read_text()
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        out = proc.stdout.read().split()
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, (tmp_path / "child.err").read_text()
        killed_pids.add(proc.pid)
        completed = len(out)
        stats["rounds"] += 1
        stats["kills"] += 1
        stats["completed_writes"] += completed
        stats["killed_before_first_rename"] += completed == 0
        digest = _sha(target)
        assert digest in digests, "the file under the final name is neither A nor B"
        held = digests.index(digest)
        # the last write the child reported, or the next one (killed after its rename)
        after_reported = (first + completed - 1) % 2 if completed else current
        after_next = (first + completed) % 2
        assert held in (after_reported, after_next), (completed, held)
        stats["held_A" if held == 0 else "held_B"] += 1
        current = held
        leftovers = [n for n in _temps(work) if int(n.split(".")[-2]) == proc.pid]
        assert len(leftovers) <= 1
        stats["killed_mid_write"] += len(leftovers)
    elapsed = time.monotonic() - t0
    assert stats["rounds"] >= 10, stats
    assert stats["completed_writes"] > 0

    # leftovers are the killed writers' temp files, nothing else; they go once they are stale
    temps = _temps(work)
    assert len(temps) == stats["killed_mid_write"]
    assert all(int(n.split(".")[-2]) in killed_pids for n in temps)
    assert clean_stale_temps(str(work)) == []  # too fresh to be sure: kept
    removed = clean_stale_temps(str(work), now=time.time() + STALE_DEAD_PID_SECONDS + 1)
    assert sorted(os.path.basename(p) for p in removed) == temps
    assert sorted(os.listdir(work)) == ["target.bin"]
    assert _sha(target) == digests[current]
    stats["temps_removed"] = len(removed)
    stats["seconds"] = round(elapsed, 1)
    print("\nkill -9 figures:", stats)


def test_clean_stale_temps_keeps_live_and_foreign_files(tmp_path):
    now = time.time()
    old = now - STALE_DEAD_PID_SECONDS - 5
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    files = {
        "live": temp_path_for(str(tmp_path / "live.safetensors")),  # this process: alive
        "dead_fresh": str(tmp_path / f".d.safetensors.tmp.{fsio.HOST_TAG}.{dead}.1"),
        "dead_old": str(tmp_path / f".e.safetensors.tmp.{fsio.HOST_TAG}.{dead}.1"),
        "other_host": str(tmp_path / f".f.safetensors.tmp.0badc0de.{dead}.1"),
        "other_host_day_old": str(tmp_path / f".g.safetensors.tmp.0badc0de.{dead}.1"),
        "user_file": str(tmp_path / ".notes.tmp.1"),
        "lora": str(tmp_path / "x.safetensors"),
    }
    if fsio.HOST_TAG == "0badc0de":
        pytest.skip("this host's tag is the test's foreign one")
    for key, path in files.items():
        Path(path).write_bytes(b"x")
        age = {"live": old, "dead_old": old, "other_host": old,
               "other_host_day_old": now - 2 * 86400, "user_file": now - 2 * 86400}.get(key)
        if age is not None:
            os.utime(path, (age, age))
    removed = set(clean_stale_temps(str(tmp_path), now=now))
    assert removed == {files["dead_old"], files["other_host_day_old"]}
    assert all(os.path.exists(files[k]) for k in ("live", "dead_fresh", "other_host", "user_file",
                                                  "lora"))


# -- 2b. disk full in the middle of a save ------------------------------------------------------
def _half_then(error: BaseException):
    """A stand-in for safetensors' save_file: writes half the file, then fails with `error`."""
    def save_file(tensors, path, metadata=None):
        blob = st_save(tensors, metadata)
        with open(path, "wb") as f:
            f.write(blob[:len(blob) // 2])
        raise error
    return save_file


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
], ids=["ENOSPC", "EDQUOT", "safetensors"])
def test_disk_full_mid_save_keeps_the_old_file_and_says_so(error, tmp_path, monkeypatch):
    folder = tmp_path / "Lora"
    path = folder / "mine.safetensors"
    save_lora(_tensors(), LoraInfo(arch="sd1", steps=100), str(path), save_dtype="fp32")
    before = _listing(folder)
    assert sorted(before) == ["mine.json", "mine.safetensors"]

    monkeypatch.setattr(lora_file, "save_file", _half_then(error))
    with pytest.raises(DiskFullError) as info:
        save_lora(_tensors(), LoraInfo(arch="sd1", steps=200), str(path), save_dtype="fp32")
    e = info.value
    assert isinstance(e, UserError) and e.field == "save.output_dir"
    assert e.message.startswith(f"no space left on device writing mine.safetensors in {folder} (")
    assert "choose another folder (save.output_dir)" in e.message
    assert isinstance(e.__cause__, type(error))
    assert _listing(folder) == before  # same bytes, no temp file, sidecar not rewritten
    assert lora_file.read_metadata(str(path))["ss_steps"] == "100"


def test_a_short_write_on_a_full_disk_is_a_disk_full_error(tmp_path, monkeypatch):
    """torch.save reports a short write as 'unexpected pos': with the disk full, it is one."""
    target = tmp_path / "training_state.pth"
    target.write_bytes(b"old state")

    def torch_like(tmp):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(fsio.shutil, "disk_usage",
                        lambda p: usage._replace(free=4096))
    with pytest.raises(DiskFullError) as info:
        atomic_write(str(target), torch_like)
    assert info.value.field == "disk"  # no one setting chooses every folder atomic_write writes
    assert info.value.message == (f"no space left on device writing training_state.pth in "
                                  f"{tmp_path} (4.0 KiB free); free some space there")
    assert target.read_bytes() == b"old state" and os.listdir(tmp_path) == [target.name]


def test_other_write_errors_pass_through_unchanged(tmp_path):
    """With space left, a writer's own error is not called a full disk; the temp file goes."""
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def failing(tmp):
        Path(tmp).write_bytes(b"part")
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        atomic_write(str(target), failing)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]
    if shutil.disk_usage(tmp_path).free < fsio.NEARLY_FULL_BYTES:
        pytest.skip("this disk is nearly full itself")


def test_latent_cache_disk_full_names_the_cache_setting(tmp_path, monkeypatch):
    from lora_train_ext.core.data import cache as cache_mod

    cache = cache_mod.LatentCache(str(tmp_path / "cache"))
    monkeypatch.setattr("safetensors.torch.save_file",
                        _half_then(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(DiskFullError) as info:
        cache.put("ab" * 32, torch.zeros(4, 8, 8))
    assert info.value.field == "data.cache_dir"
    assert [n for _, _, names in os.walk(tmp_path / "cache") for n in names] == []


def test_a_run_that_hits_a_full_disk_fails_with_a_clear_message(tmp_path, monkeypatch,
                                                                 demo_dataset):
    """What a user sees in the tab / API: the run failed, the disk is full, which folder."""
    from lora_train_ext.demo import demo_config
    from lora_train_ext.host.standalone import StandaloneHost
    from lora_train_ext.runs import RunManager

    host = StandaloneHost(str(tmp_path))
    manager = RunManager(host)
    cfg = demo_config("", steps=2, seed=0, rank=2, alpha=None, lr=1e-3, batch_size=2,
                      grad_accum=1, dataset=demo_dataset)
    cfg.save.output_name = "full_disk"
    record = manager.create(cfg)
    folder = record.config.save.output_dir
    monkeypatch.setattr(lora_file, "save_file",
                        _half_then(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with host.exclusive("test"):
        manager.execute(record)
    assert record.state == "failed"
    assert record.error.startswith("save.output_dir: no space left on device writing "
                                   f"full_disk.safetensors in {folder} ("), record.error
    assert record.to_json()["error"] == record.error
    assert not [n for n in os.listdir(folder) if n.startswith(".")]  # no temp file left
    assert not os.path.exists(os.path.join(folder, "full_disk.safetensors"))


# -- 2c. a damaged training state is refused -----------------------------------------------------
@pytest.fixture(scope="module")
def saved_state(tmp_path_factory):
    """A real NAME-state folder from a 2-step run with save.save_state."""
    from conftest import small_run_config
    from lora_train_ext.core.models.tiny import build_bundle
    from lora_train_ext.core.trainer import train
    from lora_train_ext.demo import demo_dataset_dir

    out = tmp_path_factory.mktemp("state_run")
    bundle = build_bundle("sd1", "tiny", seed=0)
    cfg = small_run_config(out, demo_dataset_dir(), 2, lr=1e-3, batch_size=2,
                           save__save_state=True)
    result = train(bundle, cfg)
    assert os.path.isfile(os.path.join(result.state_dir, "training_state.pth"))
    return bundle, cfg, result.state_dir


def _damaged(state_dir: str, dest: Path, kind: str) -> str:
    shutil.copytree(state_dir, dest)
    path = dest / "training_state.pth"
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "truncated_to_header":
        path.write_bytes(data[:64])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind.startswith("random"):
        path.write_bytes(random.Random(kind).randbytes(len(data)))
    elif kind == "not_a_state":
        torch.save([1, 2, 3], path)  # a torch file, but not a state
    return str(dest)


@pytest.mark.parametrize("kind", ["truncated", "truncated_to_header", "empty", "random1",
                                  "random2", "random3", "not_a_state"])
def test_resume_from_a_damaged_state_is_refused_naming_resume(kind, saved_state, tmp_path):
    from lora_train_ext.core.trainer import train

    bundle, cfg, state_dir = saved_state
    bad = _damaged(state_dir, tmp_path / "bad-state", kind)
    with pytest.raises(UserError) as info:
        train(bundle, cfg, resume_dir=bad)
    assert info.value.field == "resume"
    assert os.path.join(bad, "training_state.pth") in info.value.message
    expected = "is not a state this version can resume" if kind == "not_a_state" else "cannot read"
    assert expected in info.value.message


def test_cli_resume_from_a_truncated_state_names_the_flag(saved_state, tmp_path, capsys):
    from lora_train_ext import cli

    bad = _damaged(saved_state[2], tmp_path / "demo_lora-state", "truncated")
    assert cli.main(["demo", "--resume", bad]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "cannot read" in err, err


# -- 2d. a state file that would run code is refused, and the code never runs ------------------
def _write_marker(path: str) -> str:
    """What the pickle below asks the unpickler to call: proof that code from the file ran."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("code from the state file ran")
    return path


class _RunsCode:
    """Unpickles by calling `_write_marker(path)`, as a malicious state file would call anything."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (_write_marker, (self.path,))


def _state_with(state_dir: str, dest: Path, change) -> str:
    """A copy of the state folder whose training_state.pth is the saved state after `change`."""
    shutil.copytree(state_dir, dest)
    path = dest / "training_state.pth"
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    return str(dest)


def _plain_types(value, where="state"):
    """Every place in `value` that holds something other than tensors, dicts, lists, tuples,
    numbers, strings and None."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return []
    if type(value) in (dict, list, tuple):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return [p for k, v in items for p in _plain_types(v, f"{where}.{k}")]
    return [f"{where}: {type(value).__name__}"]


def test_a_saved_state_holds_only_plain_data(saved_state):
    from lora_train_ext.core.run_state import STATE_FORMAT

    state = torch.load(os.path.join(saved_state[2], "training_state.pth"), weights_only=True)
    assert state["format"] == STATE_FORMAT == 3
    assert _plain_types(state) == []
    name, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    assert name == "MT19937" and isinstance(keys, list) and len(keys) == 624
    assert all(isinstance(k, int) for k in keys) and isinstance(pos, int)


@pytest.mark.parametrize("where", ["top", "rng", "optimizer"])
def test_a_state_that_would_run_code_is_refused_and_the_code_never_runs(where, saved_state, tmp_path):
    from lora_train_ext.core.distributed import saved_world_size
    from lora_train_ext.core.trainer import train

    bundle, cfg, state_dir = saved_state
    marker = tmp_path / "code-ran.txt"

    def plant(state):
        target = {"top": state, "rng": state["rng"], "optimizer": state["optimizer"]["state"]}[where]
        target["payload"] = _RunsCode(str(marker))
    bad = _state_with(state_dir, tmp_path / "evil-state", plant)
    with pytest.raises(UserError) as info:
        train(bundle, cfg, resume_dir=bad)
    assert info.value.field == "resume"
    message = info.value.message
    assert os.path.join(bad, "training_state.pth") in message and "could run code" in message
    assert "_write_marker" in message, message  # what it asked for
    assert saved_world_size(bad) is None  # the distributed check reads it the same way
    assert not marker.exists()
    # the file is live: the unpickler of torch.load(weights_only=False) does run it
    torch.load(os.path.join(bad, "training_state.pth"), weights_only=False)
    assert marker.read_text(encoding="utf-8") == "code from the state file ran"


def test_cli_resume_of_a_state_that_would_run_code_names_the_flag(saved_state, tmp_path, capsys):
    from lora_train_ext import cli

    marker = tmp_path / "code-ran.txt"
    bad = _state_with(saved_state[2], tmp_path / "demo_lora-state",
                      lambda s: s.update(payload=_RunsCode(str(marker))))
    assert cli.main(["demo", "--resume", bad]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "could run code" in err, err
    assert not marker.exists()


def test_a_format_2_state_with_numpy_objects_is_refused_naming_the_format(saved_state, tmp_path):
    import numpy as np

    from lora_train_ext.core.trainer import train

    bundle, cfg, state_dir = saved_state

    def old(state):
        state["format"] = 2
        state["rng"]["numpy"] = np.random.get_state()  # an ndarray, as format 2 saved it
    bad = _state_with(state_dir, tmp_path / "old-state", old)
    with pytest.raises(UserError) as info:
        train(bundle, cfg, resume_dir=bad)
    assert info.value.field == "resume" and "state format 2" in info.value.message
    assert os.path.join(bad, "training_state.pth") in info.value.message


def test_plain_converts_numpy_and_names_what_it_cannot_save():
    import numpy as np

    from lora_train_ext.core.run_state import plain

    t = torch.nn.Parameter(torch.ones(2))
    out = plain({"a": np.arange(3, dtype=np.uint32), "b": (np.float32(0.5), [np.int64(7)]),
                 "c": t, 1: None}, "state")
    assert out["a"] == [0, 1, 2] and out["b"] == (0.5, [7]) and out[1] is None
    assert type(out["c"]) is torch.Tensor and torch.equal(out["c"], t.detach())
    assert _plain_types(out) == []
    with pytest.raises(TypeError, match=r"state\.x\[1\]: a builtins\.set"):
        plain({"x": [1, {2}]}, "state")


# -- 2e. a loss that turns NaN / Inf mid-run ------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_snapshot(bad, tmp_path, monkeypatch):
    from conftest import small_run_config, state_sha256
    from lora_train_ext.core.bundle import TrainControl
    from lora_train_ext.core.errors import TrainingError
    from lora_train_ext.core.models.tiny import build_bundle
    from lora_train_ext.core.trainer import Trainer, train
    from lora_train_ext.demo import demo_dataset_dir

    bundle = build_bundle("sd1", "tiny", seed=0)
    before = state_sha256(*bundle.base_modules())
    out = tmp_path / "out"
    cfg = small_run_config(out, demo_dataset_dir(), 8, lr=1e-3, batch_size=1,
                           save__save_every_steps=2)
    calls = {"n": 0}
    original = Trainer._micro_step

    def turns_bad(self, batch):  # the 5th step's loss is `bad`
        calls["n"] += 1
        loss = original(self, batch)
        return loss * bad if calls["n"] == 5 else loss
    monkeypatch.setattr(Trainer, "_micro_step", turns_bad)
    written = {}
    control = TrainControl()
    control.add_listener(lambda e: written.__setitem__(e.path, _sha(e.path))
                         if e.kind == "snapshot" else None)
    with pytest.raises(TrainingError) as info:
        train(bundle, cfg, control)
    message = str(info.value)
    assert f"loss became {bad} at step 5" in message
    assert "the last good snapshot is kept: demo_lora-step00000004.safetensors" in message, message
    # the snapshots of steps 2 and 4 are there as written; no final file, no temp file
    assert sorted(os.path.basename(p) for p in written) == [
        "demo_lora-step00000002.safetensors", "demo_lora-step00000004.safetensors"]
    for path, digest in written.items():
        assert _sha(path) == digest
        tensors, meta = lora_file.load_lora(path)
        assert meta["ss_steps"] in ("2", "4") and all(torch.isfinite(t).all() for t in tensors.values())
    names = os.listdir(out)
    assert "demo_lora.safetensors" not in names and not any(".tmp." in n for n in names), names
    assert state_sha256(*bundle.base_modules()) == before
