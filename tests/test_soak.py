"""The soak's tiny mode: runs with a stop, a resume from the state folder, a queue with a move and
a cancel, test grids and a batch of bad requests, on the standalone host through the API's
handlers. Afterwards the base weights are as they were, every reported file loads with what its
run reported, the open file count is back to its start and nothing is left in the queue. The
50-run figures are in docs/RELIABILITY.md (`python -m lora_train_ext.bench.soak`)."""

from __future__ import annotations

import hashlib
import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from lora_train_ext.bench.soak import soak  # noqa: E402
from lora_train_ext.core.lora_file import load_lora  # noqa: E402


def test_tiny_soak_leaves_nothing_behind(tmp_path):
    figures = soak(runs=4, steps=3, out_dir=str(tmp_path), kinds=("queue", "stop_resume"),
                   wait_s=900)
    assert figures["problems"] == []
    c = figures["counts"]
    assert figures["runs"] == 4
    # queue: a long run stopped, one moved up and finished, one cancelled while queued;
    # stop_resume: a long run stopped, then resumed from its state folder to its end
    assert (c["finished"], c["stopped"], c["cancelled"], c["resumed_from_state"]) == (1, 2, 1, 1)
    assert (c["moved"], c["queued_behind"], c["grids"]) == (1, 2, 1)
    assert c["bad_requests"] == c["bad_requests_refused"] == 37
    assert figures["base_sha256_end"] == figures["base_sha256_start"]
    assert figures["queue_left"] == [] and figures["active_left"] == []
    if figures["open_files"]["start"] is not None:
        assert figures["open_files"]["end"] == figures["open_files"]["start"]

    # every file the runs reported, read again here: it loads and says the reported steps
    files = figures["files"]
    assert figures["files_checked"] == len(files) == 4
    for entry in files:
        assert os.path.isfile(entry["path"]) and entry["path"].startswith(str(tmp_path))
        with open(entry["path"], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"]
        tensors, meta = load_lora(entry["path"])
        assert tensors and meta["ss_steps"] == str(entry["steps"])
    resumed = [e for e in files if e["run"].endswith("resumed")]
    stopped = [e for e in files if e["path"].endswith("_stop.safetensors")]
    assert len(resumed) == len(stopped) == 1
    assert resumed[0]["steps"] == stopped[0]["steps"] + 3  # went on from where it stopped
    # the Lora folder holds the runs' files and their sidecars, nothing of the bad requests
    names = sorted(os.listdir(tmp_path / "Lora"))
    assert not any("bad_request" in n or "escape" in n for n in names), names
    assert sorted(n for n in names if n.endswith(".safetensors")) == sorted(
        os.path.basename(e["path"]) for e in files)
