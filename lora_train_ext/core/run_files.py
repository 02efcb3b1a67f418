"""Where a run writes and what. The output folder (the Lora folder in the WebUI) gets what the
Lora cards show: NAME.safetensors (+ NAME.json, NAME.preview.png) and the snapshots NAME-000002
(every N epochs) and NAME-step00000300 (every N steps, or a pause), only the last `keep_last`
kept; with train.ema each has its EMA twin beside it (NAME-ema, NAME-step00000300-ema). The run
folder (`save.run_dir`, default the output folder) gets the run's own files: NAME.history.json,
NAME-state/, samples/, the latent cache. The adapter files themselves are written by
lora_file.save_lora."""

from __future__ import annotations

import json
import os
from typing import Any

from .config import SaveConfig
from .errors import UserError
from .fsio import atomic_write_text


def output_path(s: SaveConfig, name: str = "") -> str:
    """The file NAME (default: the run's output name) in the output folder."""
    return os.path.join(s.output_dir or ".", f"{name or s.output_name}.safetensors")


def ema_path(path: str) -> str:
    """The EMA twin of an adapter file: NAME.safetensors -> NAME-ema.safetensors."""
    stem, ext = os.path.splitext(path)
    return f"{stem}-ema{ext}"


def run_folder(s: SaveConfig) -> str:
    return s.run_dir or s.output_dir or "."


def run_path(s: SaveConfig, name: str) -> str:
    """A file or folder of the run's own (state, history, samples, cache)."""
    return os.path.join(run_folder(s), name)


def check_writable(s: SaveConfig) -> None:
    """Make the output folder; raise UserError when a file cannot be written there."""
    folder = s.output_dir or "."
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError("save.output_dir", f"cannot write to {folder}: {e.strerror or e}") from None


def snapshot_name(s: SaveConfig, step: int, total: int, epoch_due: int | None) -> str | None:
    """The snapshot due after `step` (None when none is, or when it is the last step: the final
    file follows). An epoch's snapshot wins over a step's at the same step."""
    if step >= total:
        return None
    if epoch_due is not None:
        return f"{s.output_name}-{epoch_due:06d}"
    if s.save_every_steps and step % s.save_every_steps == 0:
        return step_snapshot_name(s, step)
    return None


def step_snapshot_name(s: SaveConfig, step: int) -> str:
    """NAME-step00000300: the snapshot of a step (every N steps, or a pause)."""
    return f"{s.output_name}-step{step:08d}"


def prune_snapshots(snapshots: list[str], keep_last: int) -> list[str]:
    """Delete all but the last `keep_last` snapshots (0: keep all) and their sidecars; return
    the kept ones."""
    if not keep_last or len(snapshots) <= keep_last:
        return snapshots
    for old in snapshots[:-keep_last]:
        twin = ema_path(old)
        for p in (old, os.path.splitext(old)[0] + ".json", twin,
                  os.path.splitext(twin)[0] + ".json"):
            if os.path.exists(p):
                os.remove(p)
    return snapshots[-keep_last:]


def write_history(s: SaveConfig, history: list[dict[str, Any]]) -> str:
    """NAME.history.json, written atomically: one entry per step, {"step", "loss", "lr": {group:
    effective LR}}, plus "val_loss" at the steps the validation loss was measured; the
    measurement before the first step is an entry of its own, {"step": 0, "val_loss"}."""
    path = run_path(s, f"{s.output_name}.history.json")
    atomic_write_text(path, json.dumps(history) + "\n")
    return path
