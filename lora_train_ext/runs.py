"""Runs: start, watch, stop and list training runs on a host; the test grid.

A run executes either in the caller's thread (the tab's Train button, which the WebUI already
runs under its queue lock) or in a background thread that takes the host's lock itself (the API).
Either way the same `execute()` does the work, so the tab and the API behave alike.

Records of ended runs (finished, stopped, failed) are kept up to `keep_finished` (100): past that
the oldest ended ones are dropped; queued and running runs are never dropped.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

from .core.bundle import Progress, TrainControl
from .core.config import PRESETS, RunConfig, preset as config_preset
from .core.errors import TrainingError, UserError, UserErrors
from .core.preflight import preflight
from .core.trainer import train

STATES = ("queued", "running", "finished", "stopped", "failed")
ENDED_STATES = ("finished", "stopped", "failed")
KEEP_FINISHED_RUNS = 100


@dataclass
class RunRecord:
    id: str
    config: RunConfig
    state: str = "queued"
    step: int = 0
    total: int = 0
    loss: float | None = None
    loss_avg: float | None = None
    lr: dict[str, float] = field(default_factory=dict)
    eta: float | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str = ""
    message: str = ""
    files: list[str] = field(default_factory=list)
    history: list[tuple[int, float]] = field(default_factory=list)
    control: TrainControl = field(default_factory=TrainControl, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state, "step": self.step, "total": self.total,
            "loss": self.loss, "loss_avg": self.loss_avg, "lr": self.lr, "eta": self.eta,
            "created": self.created, "started": self.started, "finished": self.finished,
            "error": self.error, "message": self.message, "files": list(self.files),
            "output_name": self.config.save.output_name,
        }


class RunManager:
    def __init__(self, host, keep_finished: int = KEEP_FINISHED_RUNS):
        self.host = host
        self.runs: dict[str, RunRecord] = {}
        self.keep_finished = keep_finished
        self._lock = threading.Lock()
        self.last_warnings: list[str] = []

    # -- settings (what the tab and the API offer) --------------------------------------------
    def presets(self) -> list[str]:
        return list(PRESETS)

    def preset_config(self, name: str) -> RunConfig:
        """A preset's settings (or the defaults for any other name) with what suits the loaded
        model: its resolution (unless the preset sets one) and a precision its device runs."""
        cfg = config_preset(name) if name in PRESETS else RunConfig()
        info = self.host.model_info()
        if name not in PRESETS or "resolution" not in PRESETS[name].get("data", {}):
            cfg.data.resolution = str(info.default_resolution)
        cfg.train.dtype = info.default_dtype
        return cfg

    def optimizer_choices(self) -> list[str]:
        from .core.optim import available_optimizers

        return list(available_optimizers())

    def check_dataset(self, cfg: RunConfig, samples: int = 4):
        """(report text, [(image, caption)]) as the model will see the dataset."""
        from .core.data import TrainData

        problems = [p for p in cfg.problems() if p.field.startswith("data.")]
        if not cfg.data.dataset_dir:
            problems.insert(0, UserError("data.dataset_dir",
                                         "give the folder with your training images"))
        if problems:
            raise UserErrors(problems)
        data = TrainData(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                         arch=self.host.model_info().arch or "sd1", require_images=False)
        shown = data.preview(count=samples) if data.report.ok else []
        return data.report.summary_text(), list(shown)

    # -- creating ---------------------------------------------------------------------------
    def prepare_config(self, cfg: RunConfig) -> RunConfig:
        """Fill host defaults (output folder, arch) and run the one preflight check: every
        problem at once (UserErrors), before the run is queued."""
        info = self.host.model_info()
        if info.problem:
            raise UserError("model", info.problem)
        if not cfg.save.output_dir:
            cfg.save.output_dir = self.host.output_dir()
        cfg.model.arch = info.arch
        result = preflight(cfg, arch=info.arch, device=self.host.device(),
                           host_check=self.host.check_config).raise_if_failed()
        self.last_warnings = list(result.warnings)
        return cfg

    def create(self, cfg: RunConfig) -> RunRecord:
        cfg = self.prepare_config(cfg)
        record = RunRecord(id=uuid.uuid4().hex[:12], config=cfg)
        with self._lock:
            self.runs[record.id] = record
            self._prune_locked()
        return record

    def _prune_locked(self) -> None:
        """Drop the oldest ended runs (by end time) beyond `keep_finished`; the lock is held."""
        ended = [r for r in self.runs.values() if r.state in ENDED_STATES]
        excess = len(ended) - self.keep_finished
        if excess <= 0:
            return
        ended.sort(key=lambda r: (r.finished if r.finished is not None else r.created, r.created))
        for record in ended[:excess]:
            del self.runs[record.id]

    def _ended(self) -> None:
        with self._lock:
            self._prune_locked()

    # -- executing --------------------------------------------------------------------------
    def execute(self, record: RunRecord) -> RunRecord:
        """Train now, in this thread; the caller holds the host's lock."""
        record.state = "running"
        record.started = time.time()
        control = record.control
        control.add_listener(lambda e: self._on_event(record, e))
        try:
            with self.host.prepared_model() as bundle:
                result = train(bundle, record.config, control)
            record.files = [result.path, *result.snapshots]
            record.loss_avg = result.final_loss
            self.host.hot_load(record.files)
            # the final state only once the files are usable in prompts
            record.message = (f"stopped at step {result.steps}" if result.stopped
                              else f"finished {result.steps} steps")
            record.finished = time.time()
            record.state = "stopped" if result.stopped else "finished"
        except UserError as e:
            record.state, record.error = "failed", str(e)
        except TrainingError as e:
            record.state, record.error = "failed", f"training failed: {e}"
        except Exception as e:  # out of memory and the unexpected: say what to change
            record.state, record.error = "failed", describe_failure(e)
            traceback.print_exc()
        finally:
            record.finished = record.finished or time.time()
            self._ended()
        return record

    def start_background(self, cfg: RunConfig) -> RunRecord:
        """Create a run and train it in a thread that takes the host's lock (the API)."""
        record = self.create(cfg)

        def worker():
            with self.host.exclusive(f"lora-train {record.id}"):
                if record.control.stop_requested:
                    record.state, record.finished = "stopped", time.time()
                    self._ended()
                    return
                self.execute(record)

        threading.Thread(target=worker, name=f"lora-train-{record.id}", daemon=True).start()
        return record

    def _on_event(self, record: RunRecord, event: Progress) -> None:
        if event.kind == "step":
            record.step, record.total = event.step, event.total
            record.loss, record.loss_avg, record.eta = event.loss, event.loss_avg, event.eta
            record.lr = dict(event.lr)
            record.history.append((event.step, float(event.loss)))
        elif event.kind == "start":
            record.step, record.total = event.step, event.total
        elif event.kind == "snapshot" and event.path:
            record.files.append(event.path)
            self.host.hot_load([event.path])
        if event.message:
            record.message = event.message
        self.host.on_progress(event)
        if self.host.interrupt_requested() and not record.control.stop_requested:
            record.control.request_stop("interrupted")

    # -- watching / steering ----------------------------------------------------------------
    def get(self, run_id: str) -> RunRecord:
        record = self.runs.get(run_id)
        if record is None:
            raise KeyError(run_id)
        return record

    def list(self) -> list[RunRecord]:
        with self._lock:  # a run ending in another thread may drop records meanwhile
            records = list(self.runs.values())
        return sorted(records, key=lambda r: r.created, reverse=True)

    def latest(self) -> RunRecord | None:
        runs = self.list()
        return runs[0] if runs else None

    def stop(self, run_id: str) -> RunRecord:
        record = self.get(run_id)
        record.control.request_stop("stopped by user")
        return record


def describe_failure(error: BaseException) -> str:
    """One line a user can act on, for errors that are not UserErrors."""
    text = str(error)
    if "out of memory" in text.lower() or type(error).__name__ == "OutOfMemoryError":
        return ("out of memory: lower train.batch_size or data.resolution, turn on "
                "train.gradient_checkpointing, or use network.rank lower / an 8-bit optimizer")
    return f"{type(error).__name__}: {text}"


def parse_strengths(text: str, field: str) -> list[float]:
    """'0, 0.5, 1' -> [0.0, 0.5, 1.0]; a clear error naming the field otherwise."""
    values = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise UserError(field, f"{part!r} is not a number; give a list like 0, 0.5, 1") from None
    if not values:
        raise UserError(field, "give at least one strength, e.g. 0, 0.5, 1")
    if len(values) > 8:
        raise UserError(field, "at most 8 strengths")
    return values


def lora_prompt(name: str, te: float, unet: float) -> str:
    """The Lora extension's named form; the positional form puts TE first, which misleads."""
    return f"<lora:{name}:te={te:g}:unet={unet:g}>"


def strength_grid(host, lora_name: str, prompt: str, negative: str, seed: int, te_strengths: list[float],
              unet_strengths: list[float], steps: int = 20, width: int = 512, height: int = 512,
              cfg_scale: float = 7.0):
    """Rows: TE strengths; columns: UNet strengths. Returns (grid image, cell images, prompts)."""
    from .grid import labelled_grid

    if not lora_name:
        raise UserError("test.lora", "choose a LoRA to test")
    if not prompt.strip():
        raise UserError("test.prompt", "write a prompt to test the LoRA with")
    prompts = [f"{prompt}, {lora_prompt(lora_name, te, unet)}"
               for te, unet in itertools.product(te_strengths, unet_strengths)]
    images = host.generate(prompts, negative, seed, steps, width, height, cfg_scale)
    grid = labelled_grid(images, rows=[f"TE {t:g}" for t in te_strengths],
                         cols=[f"UNet {u:g}" for u in unet_strengths])
    return grid, images, prompts
