"""Headless training on a checkpoint file: what `python -m lora_train_ext train` and the demo run.

`train_on_checkpoint(cfg)` checks the run (the one preflight, with the checkpoint's header), loads
`cfg.model.checkpoint` (streamed into models built in place, `core/models/checkpoint_file.py`),
writes the run's whole config into the run folder (`NAME.config.toml`, beside the output unless
save.run_dir says otherwise: `--config` with it runs the same training again) and trains with the same trainer as the tab, writing the same files.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .core import distributed as D
from .core.bundle import ModelBundle, TrainControl
from .core.config import RunConfig
from .core.errors import UserError
from .core.models.checkpoint_file import LoadInfo, load_checkpoint, resolve_base_dtype
from .core.preflight import preflight
from .core.trainer import TrainResult, train

@dataclass
class HeadlessRun:
    bundle: ModelBundle
    result: TrainResult
    load: LoadInfo
    config_path: str
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT)


def pick_device(name: str = "auto") -> torch.device:
    """'auto': the first CUDA GPU when there is one, else the CPU."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError("--device", f"{name!r} is not a device; give auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device", "no CUDA GPU is available here; use cpu")
    return device


def config_path(cfg: RunConfig) -> str:
    """NAME.config.toml in the run folder (save.run_dir; default the output folder), which the
    trainer writes: every setting of the run, paths made absolute."""
    from .core.run_files import run_file

    return run_file(cfg.save, ".config.toml")


def train_on_checkpoint(cfg: RunConfig, *, progress: Callable | None = None,
                        control: TrainControl | None = None, stop_after: int = 0,
                        resume_dir: str = "", allow_ckpt: bool = False,
                        device: torch.device | str = "cpu", log: Callable[[str], None] | None = None,
                        checked: bool = False, tokenizer: str = "auto",
                        interruptible: bool = False, dist: D.Dist | None = None) -> HeadlessRun:
    """Load cfg.model.checkpoint and train on it.

    checked: the caller ran the preflight already (with this checkpoint). stop_after: request a
    stop once this step is done, as an interrupt would (the state is saved). resume_dir: a
    NAME-state folder to continue (cfg should be its config.json). interruptible: Ctrl-C
    (SIGINT) during training stops the run as the tab's Interrupt does, saving the state; a
    second Ctrl-C aborts at once. Before training starts, Ctrl-C aborts as usual.
    dist: this process's place in a distributed run (`distributed.launched()`, on its device):
    the control is a DistributedControl, only rank 0 makes sample images (and should get
    `progress` and `log`); a Ctrl-C on any process stops them all at the same step.
    """
    device = torch.device(device)
    if not checked:
        preflight(cfg, device=device, dataset=not resume_dir,
                  allow_pickle=allow_ckpt).raise_if_failed()
    out_dir = cfg.save.output_dir or "."
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError("save.output_dir", f"cannot create {out_dir}: {e.strerror or e}") from None
    base_dtype = resolve_base_dtype(cfg.model.base_dtype, cfg.train.dtype, device)
    bundle, info = load_checkpoint(cfg.model.checkpoint, vae_path=cfg.model.vae, device=device,
                                   base_dtype=base_dtype, prediction=cfg.model.prediction,
                                   allow_pickle=allow_ckpt, tokenizer=tokenizer)
    if log is not None:
        log(info.line())
    written = config_path(cfg)
    if dist is not None:
        control = control or D.DistributedControl(progress)
        if not isinstance(control, D.DistributedControl):
            raise TypeError("a distributed run needs a distributed.DistributedControl")
    control = control or TrainControl(progress)
    if cfg.sample.prompts.strip() and dist is not None and not dist.writes:
        # rank 0 makes the images; the others switch to eval and back as it does (a
        # schedule-free optimizer's weights move with the switch)
        control.sampler = lambda step, prompts: []
    if cfg.sample.prompts.strip() and getattr(control, "sampler", None) is None:
        # sample images with the adapter as it trains, from the loaded model
        from .core.sampling import sampler_for
        from .host.standalone import sample_image

        control.sampler = sampler_for(
            lambda p: sample_image(bundle, p.prompt, p.negative, p.seed, p.steps, p.width,
                                   p.height, p.cfg_scale), cfg.save)
    if stop_after:
        def stop_when_due(event) -> None:
            if event.kind == "step" and event.step >= stop_after and not control.stop_requested:
                control.request_stop(f"stopped after step {event.step} (--stop-after)")
        control.add_listener(stop_when_due)
    interrupted = []
    with _sigint_stops(control, interrupted, log) if interruptible else _nothing():
        result = train(bundle, cfg, control, resume_dir=resume_dir, dist=dist)
    interrupted = bool(interrupted) or bool(getattr(control, "interrupted", False))
    return HeadlessRun(bundle, result, info, written, interrupted=interrupted)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _sigint_stops(control: TrainControl, interrupted: list, log) -> Iterator[None]:
    """SIGINT -> control.request_stop() (the run saves its state and ends after this step);
    a second SIGINT -> KeyboardInterrupt. Main thread only (signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame) -> None:
        if control.stop_requested:
            raise KeyboardInterrupt
        interrupted.append(True)
        control.request_stop("interrupted (Ctrl-C)")
        if log is not None:
            log("interrupted: stopping after this step and saving the state "
                "(Ctrl-C again to quit at once)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
