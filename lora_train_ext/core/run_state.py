"""A run's full state, for exact resume: `NAME-state/training_state.pth` + `NAME-state/config.json`.

The state holds everything the rest of a run depends on: adapter weights, optimizer and scheduler
state, the EMA of the weights (train.ema; `ema.ema_for_run` takes it over), the python / numpy /
torch / CUDA RNGs and the noise generator, the data position (epoch, batch in epoch), losses,
history (validation losses included) and the snapshot list. A run resumed from it takes the same steps
as one that was never stopped. Everything else is recomputed deterministically: the data order
follows from (seed, epoch), cached latents from the frozen VAE, cached text conditioning from the
frozen text encoder. A distributed run (core/distributed.py) saves from rank 0, with the number
of processes and each process's own process RNGs; it resumes only with that number.

The process's RNGs are the host's too (the WebUI's next generation draws from them): a run seeds
them for itself, so `process_rngs_kept()` gives them back as they were when it ends.

The file holds only what `torch.load(..., weights_only=True)` reads (tensors, dicts, lists,
tuples, numbers, strings, None): numpy's RNG state is stored as a list, and `plain()` checks the
whole state before it is written. It is read with `weights_only=True`, so a state file from
elsewhere that asks the unpickler for anything more (a class, a function: code) is refused, naming
the file, and nothing in it runs.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from . import optim as O
from .config import RunConfig
from .errors import UserError
from .fsio import atomic_write

if TYPE_CHECKING:
    from .trainer import Trainer

# not .pt / .ckpt / .safetensors: the WebUI lists those in the Lora folder as networks
STATE_FILE = "training_state.pth"
STATE_FORMAT = 3  # 3: only plain data (numpy's RNG as a list), read with weights_only=True
# Settings a resumed run may change without changing its result (where files go and in what
# precision, how many snapshots are kept, whether the end state is saved).
_RESUME_FREE = ("save.output_dir", "save.run_dir", "save.output_name", "save.save_dtype", "save.keep_last",
                "save.save_state", "save.comment", "network.existing_lora", "data.cache_dir",
                "data.cache_to_disk", "data.validation_dir", "train.validate_every_steps",
                "train.validation_timesteps", "train.ema_on_cpu", "version")


def state_dir(cfg: RunConfig) -> str:
    from .run_files import run_path

    return run_path(cfg.save, f"{cfg.save.output_name}-state")


def save_state(run: Trainer) -> str:
    """Write NAME-state/training_state.pth (atomically) and NAME-state/config.json; return the
    folder. A distributed run: every process calls it (their RNGs are gathered), rank 0 writes
    and the others get ''."""
    dist = getattr(run, "dist", None)
    per_process = None
    if dist is not None:
        from .distributed import gather_objects

        per_process = gather_objects(dist, process_rng_states())
        if not dist.writes:
            return ""
    folder = state_dir(run.cfg)
    os.makedirs(folder, exist_ok=True)
    epoch, batch_in_epoch = run.epoch, run.batch_in_epoch
    data = run.data.state_dict()  # counts batches that came back empty, too
    if int(data.get("epoch", -1)) == epoch:
        batch_in_epoch = max(batch_in_epoch, int(data.get("batch_index", 0)))
    state = {
        "format": STATE_FORMAT,
        "step": run.step,
        "step_offset": run.step_offset,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "losses": list(run.losses),
        "history": list(run.history),
        "snapshots": list(run.snapshots),
        "network": {k: v.detach().cpu().clone() for k, v in run.network.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "ema": run.ema.state_dict() if getattr(run, "ema", None) is not None else None,
        "rng": plain_rng_states(rng_states(run.generator)),
        "data": data,
        "config": run.cfg.to_dict(),
        "session_id": run.session_id,
        "started_at": run.started_at,
        "world_size": 1 if dist is None else dist.world,  # a resume needs as many processes
        "process_rngs": (None if per_process is None else  # a distributed run: each
                         [plain_rng_states(r) for r in per_process]),  # process's, rank order
    }
    state = plain(state, "state")
    atomic_write(os.path.join(folder, STATE_FILE), lambda tmp: torch.save(state, tmp))
    run.cfg.write(os.path.join(folder, "config.json"))
    return folder


def read_state(folder: str, cfg: RunConfig, warn: Callable[[str], None],
               world_size: int = 1) -> dict:
    """The saved state, before any model work; `warn` hears of settings that changed since.
    world_size: this run's number of processes; a state saved by another number is refused."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise UserError("resume", f"no saved state in {folder} (expected {STATE_FILE}, "
                                  "written with save.save_state or when a run is stopped)")
    state = load_state_file(path)
    if not isinstance(state, dict) or state.get("format") not in (1, 2, STATE_FORMAT):
        raise UserError("resume", f"{path} is not a state this version can resume")
    from .distributed import check_resume

    check_resume(int(state.get("world_size", 1)), int(world_size), folder)
    changed = _config_changes(state.get("config") or {}, cfg.to_dict())
    if changed:
        warn("resuming with settings that differ from the saved run ("
             + ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
             + "); the result will not match an uninterrupted run")
    return state


_NEEDS_CODE = re.compile(r"unsupported (global|class)|allowed global|unrecognized function|"
                         r"is blocked|safe_globals", re.IGNORECASE)
_ASKED = re.compile(r"(?:GLOBAL|class|function)\s+([A-Za-z_][\w.]*)")


def load_state_file(path: str, mmap: bool = False) -> Any:
    """The content of a state file, read with the weights-only unpickler: tensors, dicts, lists,
    tuples, numbers, strings. A file that asks for anything more (a class or function to call,
    which could run code) is refused naming the file; so is a damaged one. UserError (resume)."""
    kwargs = {"mmap": True} if mmap else {}
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as e:  # a truncated, foreign or unsafe file
        text = str(e)
        # torch's own advice (load with weights_only=False) is not for a file of unknown origin
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = detail[0].strip() if detail else ""
        if isinstance(e, pickle.UnpicklingError) and _NEEDS_CODE.search(text):
            asked = _ASKED.search(text)
            what = f"it asks for {asked.group(1)}" if asked else detail[:200]
            raise UserError("resume", (
                f"refused {path}: it holds more than tensors, numbers, strings, lists and dicts "
                f"({what}); loading it could run code, so it was not loaded. States saved by "
                "lora-train-ext hold only those (state format 2, of earlier versions, held "
                "numpy's RNG as an object: train again from the start, or resume it with the "
                "version that saved it)")) from None
        raise UserError("resume", f"cannot read {path}: {type(e).__name__}: {detail[:200]}") from None


def plain(value: Any, where: str) -> Any:
    """`value` with numpy arrays and scalars as lists and numbers, checked to hold only what the
    weights-only unpickler accepts (tensors, dicts, lists, tuples, str, int, float, bool, None);
    TypeError naming the place of anything else (a bug: the state would not load)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach() if type(value) is not torch.Tensor else value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} ({type(k).__name__}) cannot be saved in a state")
            out[k] = plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where}: a {type(value).__module__}.{type(value).__name__} cannot be saved "
                    "in a state (tensors, dicts, lists, tuples, numbers and strings only)")


def restore_state(run: Trainer, state: dict, warn: Callable[[str], None]) -> None:
    """Weights, optimizer, scheduler, counters and data position into a run that is set up.
    The RNGs are not: `set_rng_states(state["rng"], ...)` comes last, nothing may draw after."""
    try:
        run.network.load_state_dict(state["network"])
    except (RuntimeError, KeyError) as e:
        raise UserError("resume", f"the saved adapter does not fit this network: {e}") from None
    fused_here = O.uses_fused(run.optimizer)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError("resume", f"the saved optimizer state does not fit: {e}") from None
    # a state saved with a fused kernel, resumed where this torch or device has none: the
    # per-tensor step (a state saved without one keeps its own step, as saved)
    for group, fused in zip(run.optimizer.param_groups, fused_here):
        if group.get("fused") and not fused:
            group["fused"] = False
    O.set_train_mode(run.optimizer, True)
    sched = dict(state["scheduler"])
    # the schedule's shape comes from this run's config; only its position is restored
    sched["lr_lambdas"] = [None] * len(run.optimizer.param_groups)
    run.scheduler.load_state_dict(sched)
    run.step, run.step_offset = int(state["step"]), int(state.get("step_offset", 0))
    run.epoch, run.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
    run.losses = list(state["losses"])
    run.history = list(state.get("history", []))
    run.snapshots = list(state.get("snapshots", []))
    run.session_id, run.started_at = state["session_id"], state["started_at"]
    saved = state.get("data") or {}
    if saved:
        fingerprint = run.data.state_dict().get("fingerprint")
        run.data.load_state_dict(saved)
        if saved.get("fingerprint") not in (None, fingerprint):
            warn("the dataset changed since the state was saved: the resumed data order is "
                 "not the one the run started with")


# -- RNGs ----------------------------------------------------------------------------------------
def seed_process_rngs(seed: int) -> None:
    """Seed python `random`, numpy's global generator and torch's (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def process_rng_states() -> dict[str, Any]:
    """The process-wide generators: python `random`, numpy's global, torch's CPU and CUDA."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def plain_rng_states(rng: dict[str, Any]) -> dict[str, Any]:
    """RNG states as the state file keeps them: numpy's `(name, keys, pos, has_gauss, cached)`
    with its keys as a list of ints (numpy takes them back as they are)."""
    out = dict(rng)
    name, keys, pos, has_gauss, cached = rng["numpy"]
    out["numpy"] = (str(name), np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached))
    return out


def set_process_rng_states(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


@contextmanager
def process_rngs_kept() -> Iterator[None]:
    """Give the process's RNGs back as they were on the way out (return, stop or exception)."""
    saved = process_rng_states()
    try:
        yield
    finally:
        set_process_rng_states(saved)


def rng_states(generator: torch.Generator) -> dict[str, Any]:
    """A run's RNGs for its saved state: the process's (seeded by the run) and its noise
    generator."""
    return {**process_rng_states(), "generator": generator.get_state()}


def set_rng_states(rng: dict[str, Any], generator: torch.Generator) -> None:
    set_process_rng_states(rng)
    generator.set_state(rng["generator"])


def _config_changes(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """`section.key old -> new` for every setting that changes a run's result (a key only one
    side has is a setting added or removed between versions: its default applies)."""
    out = []
    for key in sorted(set(saved) & set(now)):
        name = f"{prefix}{key}"
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, name + ".")
        elif a != b and name not in _RESUME_FREE:
            out.append(f"{name} {a!r} -> {b!r}")
    return out
