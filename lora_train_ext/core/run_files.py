"""Where a run writes and what. The output folder (the Lora folder in the WebUI) gets what the
Lora cards show: NAME.safetensors (+ NAME.json, NAME.preview.png) and the snapshots NAME-000002
(every N epochs) and NAME-step00000300 (every N steps, or a pause), only the last `keep_last`
kept; with train.ema each has its EMA twin beside it (NAME-ema, NAME-step00000300-ema). The run
folder (`save.run_dir`, default the output folder) gets the run's own files: NAME.config.toml
(every setting of the run), NAME.history.json and NAME.history.csv, NAME.tensorboard/ (when the
`tensorboard` package is installed), NAME-state/, samples/, the latent cache. The adapter files
themselves are written by lora_file.save_lora."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from typing import Any

from .config import SaveConfig, to_toml
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


def run_file(s: SaveConfig, suffix: str) -> str:
    """NAME<suffix> in the run folder: `.history.json`, `.config.toml`, `.tensorboard`."""
    return run_path(s, f"{s.output_name}{suffix}")


# settings holding paths: written absolute into NAME.config.toml, so it works from any folder
PATH_SETTINGS = ("model.checkpoint", "model.vae", "data.dataset_dir", "data.reg_dir",
                 "data.mask_dir", "data.cache_dir", "network.existing_lora", "save.output_dir",
                 "save.run_dir")


def write_config(s: SaveConfig, config: dict[str, Any]) -> str:
    """NAME.config.toml: every setting of the run (`RunConfig.to_dict()`, as given: before the
    run fills in a cache folder) with the config version and its paths made absolute;
    `train --config` / `demo --config` and `RunConfig.read` take it back as it is."""
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for setting in PATH_SETTINGS:
        section, key = setting.split(".")
        value = config.get(section, {}).get(key)
        if value:
            config[section][key] = os.path.abspath(value)
    path = run_file(s, ".config.toml")
    atomic_write_text(path, to_toml(config))
    return path


def write_history(s: SaveConfig, history: list[dict[str, Any]]) -> str:
    """NAME.history.json: [{"step", "epoch", "loss", "lr": {group: effective LR}, "seconds"}]
    and the same as NAME.history.csv, both written atomically; returns the JSON's path.

    epoch: the epoch the step's first batch came from, counting from 1; seconds: since the run
    started (a resumed run goes on from the saved run's time)."""
    path = run_file(s, ".history.json")
    atomic_write_text(path, json.dumps(history) + "\n")
    atomic_write_text(run_file(s, ".history.csv"), history_csv(history))
    return path


def history_csv(history: list[dict[str, Any]]) -> str:
    """One line per optimizer step: step, epoch, loss, lr_<group> (effective LR) for each param
    group, seconds, and val_loss when the run measured one (a line of its own at step 0). Numbers are written as Python writes them, so they read back exactly; a
    value an entry lacks (a run saved by an older version) is left empty."""
    groups: list[str] = []
    for entry in history:
        for name in entry.get("lr") or {}:
            if name not in groups:
                groups.append(name)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    val = any("val_loss" in entry for entry in history)
    writer.writerow(["step", "epoch", "loss", *(f"lr_{g}" for g in groups), "seconds",
                     *(["val_loss"] if val else [])])
    for entry in history:
        lrs = entry.get("lr") or {}
        writer.writerow([_cell(entry.get("step")), _cell(entry.get("epoch")),
                         _cell(entry.get("loss")), *(_cell(lrs.get(g)) for g in groups),
                         _cell(entry.get("seconds")),
                         *([_cell(entry.get("val_loss"))] if val else [])])
    return out.getvalue()


def _cell(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


class RunLog:
    """The history files of one run: `write()` (NAME.history.json and .csv, at snapshots and at
    the end) and `step()` (one TensorBoard point per step while the run goes).

    TensorBoard is optional: without the `tensorboard` package (or when it fails to load) no
    event file is written and nothing is said. A fresh run clears the event files an earlier run
    of the same name left; a resumed one adds to them."""

    def __init__(self, s: SaveConfig, fresh: bool = True):
        self.save = s
        self.fresh = fresh
        self._writer = None
        self._tried = False

    @property
    def tensorboard_dir(self) -> str:
        return run_file(self.save, ".tensorboard")

    def write(self, history: list[dict[str, Any]]) -> str:
        path = write_history(self.save, history)
        if self._writer is not None:
            self._writer.flush()
        return path

    def step(self, entry: dict[str, Any]) -> None:
        writer = self._tensorboard()
        if writer is None:
            return
        step = int(entry["step"])
        writer.add_scalar("loss", entry["loss"], step)
        for group, lr in (entry.get("lr") or {}).items():
            writer.add_scalar(f"lr/{group}", lr, step)
        if entry.get("epoch") is not None:
            writer.add_scalar("epoch", entry["epoch"], step)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - logging never fails a run
                pass

    def _tensorboard(self):
        if self._tried:
            return self._writer
        self._tried = True
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 - not installed, or a broken install: no event files
            return None
        folder = self.tensorboard_dir
        try:
            if self.fresh:
                for old in glob.glob(os.path.join(glob.escape(folder), "events.out.tfevents.*")):
                    os.remove(old)
            self._writer = SummaryWriter(log_dir=folder)
        except Exception:  # noqa: BLE001
            self._writer = None
        return self._writer
