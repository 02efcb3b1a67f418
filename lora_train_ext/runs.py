"""Runs: start, watch, stop and list training runs on a host; the test grid.

A run executes either in the caller's thread (the tab's Train button, which the WebUI already
runs under its queue lock) or in a background thread that takes the host's lock itself (the API).
Either way the same `execute()` does the work, so the tab and the API behave alike.

Records of ended runs (finished, stopped, failed, cancelled) are kept up to `keep_finished`
(100): past that the oldest ended ones are dropped; queued, running and paused runs never are.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from .core.bundle import Progress, TrainControl
from .core.config import RunConfig
from .core.presets import PRESETS
from .core.errors import TrainingError, UserError, UserErrors
from .core.preflight import preflight
from .core.run_files import ema_path
from .core.trainer import train

log = logging.getLogger(__name__)

STATES = ("queued", "running", "finished", "stopped", "failed", "cancelled")
ENDED_STATES = ("finished", "stopped", "failed", "cancelled")
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
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    lr_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # effective LR
    speed_history: list[tuple[int, float]] = field(default_factory=list)  # (step, images/s)
    memory_history: list[tuple[int, float]] = field(default_factory=list)  # (step, MiB)
    images_per_s: float | None = None
    samples: list[tuple[int, str]] = field(default_factory=list)  # (step, image path)
    val_history: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    paused_snapshot: str = ""  # the file written when the run last paused
    kind: str = "train"  # or a file job's: merge-file, merge-loras, extract, resize
    progress: dict[str, Any] = field(default_factory=dict)  # a file job's (see job_progress)
    result: dict[str, Any] = field(default_factory=dict)  # a file job's report, or its error
    job: Any = field(default=None, repr=False)  # a file job's FileJob
    memory_estimate: dict[str, Any] | None = None  # core.memory.MemoryEstimate.to_dict()
    # where the time from Train to the first optimizer step went, in seconds: queued_s (waiting
    # for the model), model_s (the host readies its model), guard_s (the base weights'
    # fingerprint, checked after the run), set_up_s, cache_s (latent caching),
    # baseline_s (step-0 sample / validation), first_step_s; to_first_step_s (Train -> first
    # step taken) and click_to_first_step_s (the same without caching and baseline)
    startup: dict[str, float] = field(default_factory=dict)
    last_elapsed: float = field(default=0.0, repr=False)  # seconds into the run at the last step
    control: TrainControl = field(default_factory=TrainControl, repr=False)

    def to_json(self) -> dict[str, Any]:
        if self.kind == "train":
            progress = {"fraction": self.step / self.total if self.total else 0.0,
                        "index": self.step, "count": self.total or None, "unit": "steps"}
        else:
            progress = dict(self.progress)
        return {
            "id": self.id, "kind": self.kind, "progress": progress, "result": dict(self.result),
            "state": self.state, "step": self.step, "total": self.total,
            "loss": self.loss, "loss_avg": self.loss_avg, "lr": self.lr, "eta": self.eta,
            "created": self.created, "started": self.started, "finished": self.finished,
            "error": self.error, "message": self.message, "files": list(self.files),
            "output_name": self.config.save.output_name, "images_per_s": self.images_per_s,
            "memory_mib": self.memory_history[-1][1] if self.memory_history else None,
            "samples": [{"step": s, "path": p} for s, p in self.samples],
            "val_loss": self.val_history[-1][1] if self.val_history else None,
            "val_history": [{"step": s, "val_loss": v} for s, v in self.val_history],
            "memory_estimate": self.memory_estimate,
            "startup": dict(self.startup),
        }


class RunManager:
    def __init__(self, host, keep_finished: int = KEEP_FINISHED_RUNS):
        self.host = host
        self.runs: dict[str, RunRecord] = {}
        self.keep_finished = keep_finished
        self._lock = threading.Lock()
        self.last_warnings: list[str] = []
        self.last_estimate = None  # core.memory.MemoryEstimate of the last run checked
        self._queue: list[str] = []  # ids of queued runs, in the order they will run
        self._queue_changed = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        from .merging import ModelMerger

        self.merger = ModelMerger(host)  # LoRAs merged into the loaded model (tab and API)

    # -- settings (what the tab and the API offer) --------------------------------------------
    def presets(self) -> list[str]:
        """The built-in presets, then the user's saved ones."""
        from .core.presets import list_presets

        try:
            return list_presets()
        except OSError:
            return list(PRESETS)

    def preset_config(self, name: str) -> RunConfig:
        """A preset's settings (or the defaults for any other name) with what suits the loaded
        model: its resolution (unless the preset sets one) and a precision its device runs."""
        from .core.presets import load_preset, user_presets

        known = name in PRESETS or name in user_presets()
        cfg = load_preset(name) if known else RunConfig()
        default, info = RunConfig(), self.host.model_info()
        # what the preset leaves at the defaults follows the model and its device
        if cfg.data.resolution == default.data.resolution:
            cfg.data.resolution = str(info.default_resolution)
        if cfg.train.dtype == default.train.dtype:
            cfg.train.dtype = info.default_dtype
        return cfg

    def save_preset(self, name: str, cfg: RunConfig) -> str:
        from .core.presets import save_preset

        return save_preset(name, cfg)

    def delete_preset(self, name: str) -> str:
        from .core.presets import delete_preset

        return delete_preset(name)

    def load_config_file(self, path: str):
        """(RunConfig, notes) from our config file (JSON/TOML) or a kohya_ss / sd-scripts one."""
        from .core.config import read_config_file

        if not path or not os.path.isfile(path):
            raise UserError("config file", f"file not found: {path}")
        try:
            raw = read_config_file(path)
            if set(raw) - {"version"} <= set(RunConfig().to_dict()):
                return RunConfig.from_dict(raw, validate=True), []
        except UserError:
            pass  # not ours: try kohya's formats
        from .core.kohya_import import import_kohya

        imported = import_kohya(path)
        notes = [f"{len(imported.mapped)} kohya settings taken"]
        if imported.unsupported:
            notes.append("not supported (left out): " + ", ".join(sorted(imported.unsupported)))
        return imported.config, notes + list(imported.notes)

    def optimizer_choices(self) -> list[str]:
        from .core.optim import available_optimizers

        return list(available_optimizers())

    def check_dataset(self, cfg: RunConfig, samples: int = 4):
        """(report text, [(image, caption)]) as the model will see the dataset."""
        from .core.data import TrainData

        if cfg.mode.kind == "difference":
            return self._check_pairs(cfg, samples)
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

    def _check_pairs(self, cfg: RunConfig, samples: int):
        """Difference training: the pairs found, the images without their other half (each
        line naming its folder's setting), and the first pairs side by side as trained."""
        from PIL import Image

        from .core.config import parse_resolution
        from .core.modes import pair_pixels, scan_pairs

        problems = [p for p in cfg.problems()
                    if p.field.startswith("data.") or p.field.startswith("mode.")]
        if problems:
            raise UserErrors(problems)
        found = scan_pairs(cfg)
        size = parse_resolution(cfg.data.resolution)
        shown = []
        for pair in found.pairs[:max(0, samples // 2)]:
            for path, which in ((pair.first, "first"), (pair.second, "second")):
                arr = ((pair_pixels(path, size).permute(1, 2, 0).numpy() + 1) * 127.5)
                shown.append((Image.fromarray(arr.round().clip(0, 255).astype("uint8")),
                              f"{pair.name} ({which}): {pair.caption}"))
        return found.summary(), shown

    # -- creating ---------------------------------------------------------------------------
    def prepare_config(self, cfg: RunConfig, confine: bool = False) -> RunConfig:
        """Fill host defaults (output folder, arch) and run the one preflight check: every
        problem at once (UserErrors), before the run is queued. confine: the folders the run
        writes to (WRITE_PATHS) must be inside the host's own (`Host.write_roots()`), as for a
        run asked for over HTTP."""
        info = self.host.model_info()
        if info.problem:
            raise UserError("model", info.problem)
        if not cfg.save.output_dir:
            cfg.save.output_dir = self.host.output_dir()
        if not cfg.save.run_dir:
            cfg.save.run_dir = self.host.run_dir()
        cfg.model.arch = info.arch
        result = preflight(cfg, arch=info.arch, device=self.host.device(),
                           host_check=self.host.check_config)
        if confine:
            outside = outside_problems(cfg, self.host.write_roots())
            named = {p.field for p in outside}
            result.problems = outside + [p for p in result.problems if p.field not in named]
        result.raise_if_failed()
        self.last_warnings = list(result.warnings)
        self.last_estimate = self.memory_estimate(cfg)
        if self.last_estimate is not None and self.last_estimate.fits is False:
            self.last_warnings.append(self.last_estimate.text())
        return cfg

    def memory_estimate(self, cfg: RunConfig):
        """The run's peak memory on the host's device (core.memory.MemoryEstimate), with the
        options that make it fit the free memory when it does not; None when the host cannot
        show its model's parts or the estimate fails (it never stops a run)."""
        from .core.memory import device_free_bytes, estimate

        try:
            parts = self.host.model_parts()
            if parts is None:
                return None
            arch, unet, tes, vae = parts
            device = self.host.device() or torch.device("cpu")
            return estimate(cfg, arch=arch, unet=unet, text_encoders=tes, vae=vae,
                            device=device, free_bytes=device_free_bytes(device))
        except Exception as e:  # an estimate is advice: a model it cannot trace is no error
            log.warning("memory estimate failed: %s", e)
            return None

    def create(self, cfg: RunConfig, confine: bool = False) -> RunRecord:
        cfg = self.prepare_config(cfg, confine)
        record = RunRecord(id=uuid.uuid4().hex[:12], config=cfg)
        if self.last_estimate is not None:
            record.memory_estimate = self.last_estimate.to_dict()
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
        s = record.config.save
        if record.config.sample.prompts.strip():
            control.sampler = self.host.sampler(s)
        lent: dict = {}

        def on_pause(path: str) -> None:
            lent.update(self.host.lend_model(path))
            record.state, record.paused_snapshot = "paused", path

        def on_resume() -> None:
            try:
                self.host.take_model_back(lent)
            finally:
                record.state = "running"

        control.on_pause, control.on_resume = on_pause, on_resume
        control.poll_stop = self.host.interrupt_requested
        try:
            with self.host.prepared_model() as bundle:
                record.startup = {"queued_s": round(record.started - record.created, 3),
                                  "model_s": round(time.time() - record.started, 3)}
                result = train(bundle, record.config, control)
            record.files = [result.path, *([result.ema_path] if result.ema_path else []),
                            *result.snapshots]
            record.loss_avg = result.final_loss
            self.host.hot_load(record.files)
            # the final state only once the files are usable in prompts
            record.message = (f"stopped at step {result.steps}"
                              + (f" ({result.stop_reason})" if result.stop_reason else "")
                              if result.stopped else f"finished {result.steps} steps")
            record.finished = time.time()
            record.state = "stopped" if result.stopped else "finished"
        except UserError as e:
            record.state, record.error = "failed", str(e)
        except TrainingError as e:
            record.state, record.error = "failed", f"training failed: {e}"
        except Exception as e:  # out of memory and the unexpected: say what to change
            record.state, record.error = "failed", describe_failure(e, record.config)
            traceback.print_exc()
        finally:
            record.finished = record.finished or time.time()
            self.host.clear_conditioning_cache()  # failed runs too: samples cached their prompts
            self._ended()
        return record

    # -- the queue: runs one after another in a worker thread that takes the host's lock ------
    def enqueue(self, cfg: RunConfig, confine: bool = False) -> RunRecord:
        """Check `cfg` (the preflight; `confine`: see prepare_config) and put the run at the end
        of the queue."""
        record = self.create(cfg, confine)
        self._append(record)
        return record

    def enqueue_job(self, job) -> RunRecord:
        """Put a file job (file_jobs.FileJob, its body already checked) at the end of the
        queue; it shows as a run of its `kind`, with `progress` as it goes."""
        cfg = RunConfig()
        cfg.save.output_name = job.name
        record = RunRecord(id=uuid.uuid4().hex[:12], config=cfg, kind=job.kind, job=job,
                           progress={"fraction": 0.0, "index": 0, "count": None,
                                     "unit": job.unit, "item": ""},
                           message=f"{job.kind} queued")
        with self._lock:
            self.runs[record.id] = record
            self._prune_locked()
        self._append(record)
        return record

    def _append(self, record: RunRecord) -> None:
        with self._queue_changed:
            self._queue.append(record.id)
            self._queue_changed.notify_all()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="lora-train-queue",
                                                daemon=True)
                self._worker.start()

    start_background = enqueue  # the API's name for it

    def queued(self) -> list[RunRecord]:
        with self._lock:
            return [self.runs[i] for i in self._queue]

    def position(self, run_id: str) -> int | None:
        """1 = next to run; None when not queued."""
        with self._lock:
            return self._queue.index(run_id) + 1 if run_id in self._queue else None

    def move(self, run_id: str, by: int) -> list[RunRecord]:
        """Move a queued run `by` places (negative: earlier); returns the queue."""
        with self._lock:
            if run_id not in self._queue:
                raise KeyError(run_id)
            i = self._queue.index(run_id)
            j = max(0, min(len(self._queue) - 1, i + by))
            self._queue.insert(j, self._queue.pop(i))
        return self.queued()

    def cancel(self, run_id: str) -> RunRecord:
        """Take a queued run out of the queue, or stop a running one."""
        record = self.get(run_id)
        with self._lock:
            if run_id in self._queue:
                self._queue.remove(run_id)
                record.state, record.finished = "cancelled", time.time()
                record.message = "cancelled before it started"
                return record
        return self.stop(run_id)

    def _work(self) -> None:
        """Run queued runs in order; a failed run does not stop the ones after it. Each run
        gives the model back and frees memory before the next one starts."""
        while True:
            with self._queue_changed:
                if not self._queue:
                    self._worker = None
                    return
                run_id = self._queue.pop(0)
            record = self.runs[run_id]
            if record.kind != "train":  # a file job reads and writes files, not the model
                if record.control.stop_requested:
                    record.state, record.finished = "stopped", time.time()
                else:
                    self.execute_job(record)
                self._ended()
                continue
            with self.host.exclusive(f"lora-train {record.id}"):
                if record.control.stop_requested:
                    record.state, record.finished = "stopped", time.time()
                else:
                    self.execute(record)
            self._ended()
            self.host.free_memory()

    def execute_job(self, record: RunRecord) -> RunRecord:
        """Run a file job now, in this thread: progress into `record.progress` (fraction
        done; index of count tensors or modules, the one done last as `item`); the report into
        `record.result`. A stop ends it at the next tensor or module with nothing written."""
        from .file_jobs import JobStopped

        job = record.job
        record.state, record.started = "running", time.time()
        record.message = f"{job.kind} running"
        count: list[int | None] = [None]
        calls = [0]

        def on_start(n: int) -> None:
            count[0] = n

        def progress(done: int, total: int, item: str) -> None:
            if record.control.stop_requested:
                raise JobStopped()
            calls[0] += 1
            # merge-file reports bytes: its count is of tensors (on_start), one call each
            index, n = (calls[0], count[0]) if count[0] is not None else (done, total)
            record.progress = {"fraction": done / total if total else 1.0, "index": index,
                               "count": n, "unit": job.unit, "item": item}
            record.step, record.total = index, n or 0
            record.message = f"{job.kind}: {job.unit} {index} of {n}"

        try:
            if os.path.exists(job.out):
                raise UserError("name", f"{os.path.basename(job.out)} was written meanwhile; "
                                        "nothing is overwritten: queue it with another name")
            record.result = job.work(progress, on_start)
            record.files = [job.out]
            try:
                job.after(job.out)
            except Exception as e:  # the file is written; only the listing failed
                record.message = f"written; listing it failed: {describe_failure(e)}"
            else:
                record.message = f"{job.kind} wrote {os.path.basename(job.out)}"
            record.state = "finished"
        except JobStopped:
            record.state = "stopped"
            record.message = f"stopped at {job.unit} {record.progress.get('index', 0)}; nothing " \
                             "was written"
        except UserError as e:
            from .core.merge import MergeMismatch

            field_name = job.field_of(e)
            record.state, record.error = "failed", f"{field_name}: {e.message}"
            record.message = f"{job.kind} failed; nothing was written"
            record.result = {"field": field_name, "error": e.message}
            if isinstance(e, MergeMismatch):
                record.result["unmatched"] = list(e.modules)
        except Exception as e:
            record.state, record.error = "failed", describe_failure(e)
            record.message = f"{job.kind} failed; nothing was written"
            traceback.print_exc()
        finally:
            record.finished = time.time()
            self._ended()
        return record

    def _on_event(self, record: RunRecord, event: Progress) -> None:
        if event.kind == "step":
            last_step, last_elapsed = record.step, record.last_elapsed
            record.step, record.total = event.step, event.total
            record.loss, record.loss_avg, record.eta = event.loss, event.loss_avg, event.eta
            record.lr = dict(event.lr)
            record.history.append((event.step, float(event.loss)))
            record.lr_history.append((event.step, dict(event.lr)))
            t = record.config.train
            if event.elapsed > last_elapsed and event.step > last_step:
                record.images_per_s = (t.batch_size * t.grad_accum * (event.step - last_step)
                                       / (event.elapsed - last_elapsed))
                record.speed_history.append((event.step, record.images_per_s))
            record.last_elapsed = event.elapsed
            record.memory_history.append((event.step, memory_mib()))
            if event.timings and "to_first_step_s" not in record.startup:
                record.startup.update(event.timings)
                total = round(time.time() - record.created, 3)
                record.startup["to_first_step_s"] = total
                record.startup["click_to_first_step_s"] = round(
                    total - event.timings.get("cache_s", 0.0)
                    - event.timings.get("baseline_s", 0.0), 3)
            if not event.message:
                record.message = "training"  # not the caching message of before the loop
        elif event.kind == "start":
            record.step, record.total = event.step, event.total
        elif event.kind == "sample" and event.path:
            record.samples.append((event.step, event.path))
        elif event.kind == "validation" and event.loss is not None:
            record.val_history.append((event.step, float(event.loss)))
        elif event.kind == "snapshot" and event.path:
            record.files.append(event.path)
            twin = ema_path(event.path)
            self.host.hot_load([event.path, *([twin] if record.config.train.ema else [])])
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

    def current(self) -> RunRecord | None:
        """The run to show: the one training, else the next queued, else the newest."""
        runs = self.list()
        for state in ("paused", "running", "queued"):
            active = [r for r in runs if r.state == state]
            if active:
                return active[-1]  # the oldest of them: the first to start
        return runs[0] if runs else None

    def stop(self, run_id: str) -> RunRecord:
        record = self.get(run_id)
        record.control.request_stop("stopped by user")
        return record

    def pause(self, run_id: str) -> RunRecord:
        """Pause at the next step boundary: NAME-stepN is written and hot-loaded, the lock let
        go, so txt2img and the test grid can use it; `resume` goes on with the same run."""
        record = self.get(run_id)
        if record.kind != "train":
            raise UserError("run", f"run {run_id} is a {record.kind} job; it does not pause "
                                   "(stop it: nothing is written then)")
        if record.state not in ("running", "queued"):
            raise UserError("run", f"run {run_id} is {record.state}; only a running run pauses")
        record.control.request_pause()
        if record.state == "running":
            record.message = "pausing at the next step"
        return record

    def resume(self, run_id: str) -> RunRecord:
        record = self.get(run_id)
        record.control.request_resume()
        return record


# the settings that choose where a run writes (a folder of the server when asked over HTTP)
WRITE_PATHS = ("save.output_dir", "save.run_dir", "data.cache_dir")


def inside(path: str, roots: list[str]) -> bool:
    """`path` (symlinks and `..` resolved, as far as it exists) is one of `roots` or below one."""
    real = os.path.realpath(os.path.abspath(path))
    for root in roots:
        base = os.path.realpath(os.path.abspath(root))
        try:
            if os.path.commonpath([real, base]) == base:
                return True
        except ValueError:  # another drive (Windows)
            continue
    return False


def outside_problems(cfg: RunConfig, roots: list[str]) -> list[UserError]:
    """A UserError for each folder the run would write to (WRITE_PATHS) that is outside `roots`
    (empty settings take their defaults, which are inside)."""
    shown = ", ".join(roots)
    return [UserError(path, f"{cfg.get(path)} is outside the folders runs may write to over "
                            f"the API ({shown}); give a folder inside one of them, or leave it "
                            "empty for the default")
            for path in WRITE_PATHS if cfg.get(path) and not inside(str(cfg.get(path)), roots)]


def memory_mib() -> float:
    """Memory in use now: the GPU's peak allocated where training runs on CUDA, else the
    process's resident set."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def describe_failure(error: BaseException, cfg: RunConfig | None = None) -> str:
    """One line a user can act on, for errors that are not UserErrors; out of memory names the
    settings to lower, with values from the run's own (`cfg`) where it is known."""
    text = str(error)
    if "out of memory" in text.lower() or type(error).__name__ == "OutOfMemoryError":
        if cfg is None:
            return ("out of memory: lower train.batch_size or data.resolution, turn on "
                    "train.gradient_checkpointing, or use network.rank lower / an 8-bit optimizer")
        return "out of memory: " + "; ".join(smaller_settings(cfg)) + \
            " (the model is as it was before the run)"
    return f"{type(error).__name__}: {text}"


def smaller_settings(cfg: RunConfig) -> list[str]:
    """`setting now -> lower` for each setting that uses less memory at a lower value, the
    cheapest in quality first; without a concrete value where none is lower."""
    from .core.config import parse_resolution

    out = []
    t, n = cfg.train, cfg.network
    if not t.gradient_checkpointing:
        out.append("train.gradient_checkpointing off -> on")
    if t.batch_size > 1:
        half = max(1, t.batch_size // 2)
        out.append(f"train.batch_size {t.batch_size} -> {half} (train.grad_accum "
                   f"{t.grad_accum} -> {t.grad_accum * t.batch_size // half} keeps the batch)")
    try:
        width, height = parse_resolution(cfg.data.resolution)
    except Exception:  # noqa: BLE001 - a resolution preflight let through: say it plainly
        width = height = 0
    if max(width, height) > 256:
        lower = [max(256, (side * 3 // 4) // 64 * 64) for side in (width, height)]
        text = str(lower[0]) if lower[0] == lower[1] else f"{lower[0]}x{lower[1]}"
        out.append(f"data.resolution {cfg.data.resolution} -> {text}")
    if "8bit" not in cfg.optim.optimizer.lower():
        out.append(f"optim.optimizer {cfg.optim.optimizer} -> an 8-bit one (AdamW8bit)")
    if n.rank > 4:
        out.append(f"network.rank {n.rank} -> {n.rank // 2}")
    return out or ["lower data.resolution or free memory taken by other programs"]


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
    te, unet = te + 0.0, unet + 0.0  # -0.0 (a negative strength x a 0 split) reads as 0
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


def lora_tag(name: str, strength: float, te: float | None = None, unet: float | None = None) -> str:
    """`<lora:NAME:s>`, or the named TE / UNet form when a split is asked for."""
    if te is None and unet is None:
        return f"<lora:{name}:{strength:g}>"
    return lora_prompt(name, strength * (1.0 if te is None else te),
                       strength * (1.0 if unet is None else unet))


def snapshots_of(host, name: str) -> list[str]:
    """The run's files: its snapshots (`NAME-stepN`, `NAME-N` per epoch) oldest first, then
    the final `NAME`."""
    import re

    names = [os.path.splitext(os.path.basename(p))[0] for p in host.list_loras()]
    own = [n for n in names if re.fullmatch(re.escape(name) + r"-(step)?\d+", n)]
    own.sort(key=lambda n: int(re.search(r"(\d+)$", n).group(1)))
    return own + ([name] if name in names else [])


def snapshot_grid(host, snapshots: list[str], strengths: list[float], prompt: str, negative: str,
                  seed: int, steps: int = 20, width: int = 512, height: int = 512,
                  cfg_scale: float = 7.0, split: tuple[float, float] | None = None):
    """Rows: snapshots; columns: strengths (x the TE/UNet split when given). Returns (grid,
    tags in row-major order)."""
    from .grid import labelled_grid

    if not snapshots:
        raise UserError("snapshots", "choose at least one snapshot of the run")
    if len(snapshots) > 16:
        raise UserError("snapshots", "at most 16 snapshots in one grid")
    if not prompt.strip():
        raise UserError("prompt", "write a prompt to compare the snapshots with")
    te, unet = split if split else (None, None)
    tags = [lora_tag(n, s, te, unet) for n in snapshots for s in strengths]
    images = host.generate([f"{prompt}, {t}" for t in tags], negative, seed, steps, width,
                           height, cfg_scale)
    grid = labelled_grid(images, rows=list(snapshots), cols=[f"strength {s:g}" for s in strengths])
    return grid, tags
