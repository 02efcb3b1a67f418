"""The training loop. It knows a ModelBundle, a RunConfig, a TrainControl and the TrainingData it
reads batches from; nothing of any UI.

`Trainer.run()` reads top to bottom: check (settings, saved state, a file to continue, dataset,
output folder: before any model work), set up (seed, network, optimizer, schedule, saved state,
latent cache), loop (noise, predict, loss, step), finish (state, file, history), tear down. The
base model comes back bit-identical, and the process's RNGs as they were, whether the run
finishes, is stopped, or fails.

Beside it: run_state (save / resume the full state, RNGs, data position), run_metadata (the
file's `ss_*` keys), continue_from (continuing a plain LoRA file), run_files (output paths,
snapshots, history), validation (the validation loss on held-out images), ema (the moving
average of the adapter's weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from . import distributed as D
from . import loss as L
from . import optim as O
from . import run_files as F
from . import sched as S
from . import validation as V
from .bundle import ModelBundle, Progress, TrainControl, TrainingData
from .checkpointing import GradientCheckpointing
from .config import RunConfig
from .continue_from import ExistingLora, load_existing, read_existing
from .dtypes import TORCH_DTYPES
from .ema import AdapterEMA, ema_for_run
from .errors import TrainingError, UserError
from .guard import BaseGuard
from .lora_file import save_lora
from .offload import FrozenOffload, offload_plan
from .networks import AdapterNetwork, build_network, part_of
from .networks.targets import block_value, parse_block_values
from .preflight import preflight
from .run_metadata import now_iso, run_info
from .modes import ModeBatch, make_mode_data
from .sampling import prompts_for, sample_due
from .run_state import (process_rng_states, process_rngs_kept, read_state, restore_state,
                        save_state, seed_process_rngs, set_process_rng_states, set_rng_states)

# importable from here as before the split (the command line reads STATE_FILE from here)
from .run_metadata import optimizer_label  # noqa: F401
from .run_state import STATE_FILE  # noqa: F401

COMPUTE_DTYPES = TORCH_DTYPES


@dataclass
class TrainResult:
    path: str
    steps: int
    total_steps: int
    first_loss: float
    final_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    stopped: bool = False
    stop_reason: str = ""
    state_dir: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    modules: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # the guide's warnings, given before the run
    history_path: str = ""  # NAME.history.json: [{step, epoch, loss, lr, seconds, val_loss}]
    lrs: dict[str, float] = field(default_factory=dict)  # effective LR per group at the last step
    samples: list[str] = field(default_factory=list)  # sample images made during the run
    sample_seconds: float = 0.0  # time spent making them (not in `seconds` per step / ETA)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    validation_seconds: float = 0.0  # time spent measuring it (not in the ETA either)
    ema_path: str = ""  # NAME-ema.safetensors with train.ema


class Trainer:
    """One run. `run()` may be called once.

    data: the dataset (default: a TrainData from cfg.data).
    resume_dir: a `NAME-state` folder written by `run_state.save_state()`; the run goes on from
    there to its configured end (`cfg` should be the saved run's config, `NAME-state/config.json`).
    dist: this process's place in a distributed run (`distributed.launched()`; the control a
    `distributed.DistributedControl`, `data` one built with the global batch size), None for
    one process.
    """

    def __init__(self, bundle: ModelBundle, cfg: RunConfig, control: TrainControl | None = None,
                 data: TrainingData | None = None, resume_dir: str = "",
                 dist: D.Dist | None = None):
        self.bundle = bundle
        self.dist = dist
        self.writes = dist is None or dist.writes  # only rank 0 of a distributed run writes
        self.cfg = cfg  # checked by preflight() when the run starts
        self.control = control or (TrainControl() if dist is None else D.DistributedControl())
        if dist is not None and not isinstance(self.control, D.DistributedControl):
            raise TypeError("a distributed run needs a distributed.DistributedControl")
        self.data = data
        self.resume_dir = resume_dir
        self.device = bundle.device
        self.prediction = bundle.prediction if cfg.model.prediction == "auto" else cfg.model.prediction
        alphas = bundle.alphas_cumprod.double().cpu()
        if cfg.model.zero_terminal_snr:
            alphas = L.zero_terminal_snr(alphas)
        self.alphas_cumprod = alphas.to(self.device)
        self.network: AdapterNetwork | None = None
        self.optimizer = None
        self.scheduler = None
        self.checkpointing: GradientCheckpointing | None = None
        self.te_trained = False
        self.step = 0
        self.step_offset = 0  # steps of a plain LoRA file this run continues (network.existing_lora)
        self.epoch = 0
        self.batch_in_epoch = 0
        self.losses: list[float] = []
        self.history: list[dict[str, Any]] = []
        self.snapshots: list[str] = []
        self.warnings: list[str] = []
        self.session_id = uuid.uuid4().hex
        self.started_at = now_iso()
        self._text_cache: dict[tuple, Any] = {}
        self._epoch_iter = None
        self._yielded_in_epoch = 0
        self.guard: BaseGuard | None = None
        self.model_gone = False  # the host switched models during a pause
        self.samples: list[str] = []
        self.sample_seconds = 0.0
        self.cache_seconds = 0.0  # latent caching (and the validation images' latents)
        self.startup: dict[str, float] = {}  # where the time before the first step went
        self._pending_epoch_snapshot: int | None = None
        self.log: F.RunLog | None = None
        self.validation: V.Validation | None = None
        self.ema: AdapterEMA | None = None
        self.offload: FrozenOffload | None = None  # train.offload_frozen

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        t0 = time.time()
        with process_rngs_kept():  # the run seeds them for itself; the host's stay its own
            state, existing = self._check()
            self.guard = guard = BaseGuard(self.bundle.base_modules())
            guarding = time.time()
            guard.freeze()
            guard_seconds = time.time() - guarding  # the base weights' fingerprint
            try:
                with torch.inference_mode(False), torch.enable_grad():
                    total = self._set_up(state, existing)
                    # the checks and the set-up apart from latent caching, reported apart
                    self.startup = {
                        "guard_s": round(guard_seconds, 3),
                        "set_up_s": round(time.time() - t0 - self.cache_seconds - guard_seconds, 3),
                        "cache_s": round(self.cache_seconds, 3)}
                    stopped = self._loop(total, t0)
                    result = self._finish(stopped, total, t0)
            finally:
                self._tear_down(guard)
            if not self.model_gone:
                guard.verify()
        self.control.emit(Progress("end", step=self.step, total=result.total_steps,
                                   loss=result.final_loss, elapsed=result.seconds,
                                   path=result.path,
                                   message="stopped" if result.stopped else "finished"))
        return result

    def _check(self) -> tuple[dict | None, ExistingLora | None]:
        """Settings, saved state, a file to continue, dataset, output folder: before model work."""
        cfg = self.cfg
        as_given = cfg.to_dict()  # NAME.config.toml: the settings before the run fills any in
        # the same check as the tab, the API and the command line: every problem at once
        checked = preflight(cfg, arch=self.bundle.arch, device=self.device,
                            dataset=self.data is None, scan=False,
                            model_loaded=True).raise_if_failed()
        for message in checked.warnings:
            self._warn(message)
        state = read_state(self.resume_dir, cfg, self._warn,
                           world_size=D.world_size(self.dist)) if self.resume_dir else None
        existing = None
        if cfg.network.existing_lora and state is None:
            existing = read_existing(cfg.network.existing_lora, self.bundle.arch, cfg.network)
        if cfg.data.cache_to_disk and not cfg.data.cache_dir:
            cfg.data.cache_dir = F.run_path(cfg.save, "latent_cache")  # never the dataset folder
        if self.data is None:
            self.data = make_mode_data(cfg, self.bundle.arch)  # None: the captioned dataset
        if self.data is None:
            from .data import TrainData

            self.data = TrainData(cfg.data, batch_size=cfg.train.batch_size * D.world_size(
                self.dist), seed=cfg.train.seed, arch=self.bundle.arch)  # the global batch
        if self.dist is not None:
            D.shard(self.data, self.dist)
        if V.wanted(cfg):
            self.validation = V.Validation(cfg, self.bundle.arch)
        if self.writes:
            F.check_writable(cfg.save)
            F.write_config(cfg.save, as_given)
        self.log = F.RunLog(cfg.save, fresh=not self.resume_dir) if self.writes else D.NoLog()
        return state, existing

    def _set_up(self, state: dict | None, existing: ExistingLora | None) -> int:
        """Seed, build and attach the network, optimizer and schedule; take over a saved state
        or a file to continue; cache latents. Returns the step the run ends at."""
        cfg, bundle = self.cfg, self.bundle
        seed = int(cfg.train.seed) % (2**32)
        seed_process_rngs(seed)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.network = build_network(
            bundle.trainable_roots(), bundle.arch, cfg.network,
            seed=cfg.network.init_seed if cfg.network.init_seed is not None else cfg.train.seed,
            dtype=torch.bfloat16 if cfg.train.adapter_dtype == "bf16" else torch.float32,
        ).to(self.device)
        if existing is not None:
            self.step = self.step_offset = load_existing(existing, self.network, bundle.arch,
                                                         cfg.network)
        self.te_trained = any(p != "unet" for p in self.network.parts())
        self.network.train()
        self.network.attach()
        groups = self._param_groups()
        if not groups:
            raise UserError("optim.lr", "every trained part has learning rate 0")
        self.optimizer = O.build_optimizer(cfg.optim.optimizer, groups, cfg.optim.optimizer_args)
        planned = self.total_steps()
        self.scheduler = S.build_scheduler(
            cfg.optim.scheduler, self.optimizer, planned, warmup_steps=cfg.optim.warmup_steps,
            warmup_ratio=cfg.optim.warmup_ratio, cycles=cfg.optim.scheduler_cycles,
            power=cfg.optim.scheduler_power)
        if state is not None:
            restore_state(self, state, self._warn)
        self.ema = ema_for_run(cfg.train, self.network, state, self._warn)
        caching = time.time()
        if cfg.data.cache_latents:
            with torch.no_grad():
                self.data.cache_latents(bundle.encode, bundle.vae_id, progress=self._cache_progress)
        if self.validation is not None:
            self.validation.prepare(bundle.encode, bundle.vae_id)
        self.cache_seconds = time.time() - caching
        self._set_up_offload()
        if cfg.train.gradient_checkpointing:
            self.checkpointing = GradientCheckpointing([bundle.unet, *(
                te for p, te in bundle.text_encoders.items() if self.te_trained)]).enable()
        if state is not None:
            set_rng_states(state["rng"], self.generator)  # last: nothing may draw after
        if self.dist is not None:
            D.set_up(self.dist, self, state)  # rank 0's weights; each process its own RNGs
        return self.step_offset + planned

    def _set_up_offload(self) -> None:
        """train.offload_frozen: the VAE (latents cached) and the text encoders (outputs cached,
        not trained) go to the CPU until the run's end; what cannot go is said in a warning."""
        cfg, bundle = self.cfg, self.bundle
        names, notes = offload_plan(
            enabled=cfg.train.offload_frozen, te_trained=self.te_trained,
            cache_text=cfg.data.cache_text,
            latents_cached=bool(cfg.data.cache_latents and getattr(self.data, "latents_cached",
                                                                    False)),
            te_names=list(bundle.text_encoders))
        for message in notes:
            self._warn(message)
        if not names:
            return
        parts = {"vae": bundle.vae, **bundle.text_encoders}
        self.offload = FrozenOffload({n: parts[n] for n in names}, home=self.device)
        self.offload.send_away()
        self.control.emit(Progress("log", message="offloaded to the CPU: " + ", ".join(names)))

    def _offloaded_tes(self) -> list[str]:
        if self.offload is None:
            return []
        return [n for n in self.bundle.text_encoders if n in self.offload.parts]

    def _all_home(self) -> None:
        """Offloaded parts back on the device (the host's samples, a pause): the guard takes
        their new storage as the baseline."""
        if self.offload is not None and self.offload.bring_home():
            self.guard.accept_moved()

    def _loop(self, total: int, t0: float) -> bool:
        """Train until `total` optimizer steps; True when stopped early by the control."""
        cfg, control = self.cfg, self.control
        params = self.network.trainable_parameters()
        accum = cfg.train.grad_accum
        amp_dtype = COMPUTE_DTYPES[cfg.train.dtype]
        use_amp = amp_dtype != torch.float32
        start_step = self.step
        seconds_before = self.history[-1].get("seconds", 0.0) if self.history else 0.0
        control.emit(Progress("start", step=self.step, total=total))
        loop_started = time.time()
        if self.step == 0:
            self._maybe_sample(total)  # the baseline
        if not self.resume_dir:
            self._validate(total)  # the baseline
        baseline = time.time() - loop_started  # the step-0 sample and validation, if asked for
        while self.step < total:
            self._pause_if_requested(total)
            if control.stop_requested:
                return True
            step_began = time.time()
            step_loss = torch.zeros((), device=self.device)
            epoch_before = self.epoch  # of the step's first batch
            mark = self._step_mark()
            for _ in range(accum):
                batch = self._next_batch()
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
                    loss = self._micro_step(batch)
                (loss / accum).backward()
                step_loss += loss.detach() / accum
                if control.stop_requested:  # asked during this step: it is not taken
                    self._rewind(mark)
                    return True
            if self.dist is not None and D.sync_step(self.dist, params, step_loss, control):
                self._rewind(mark)  # gradients, loss and stop flags summed over the processes
                return True
            if cfg.optim.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            self.optimizer.step()
            lrs = self.current_lrs()  # what this step used: the scheduler moves on next
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.optim.scale_weight_norms > 0:
                self.network.scale_weight_norms_(cfg.optim.scale_weight_norms)
            value = float(step_loss)
            if not math.isfinite(value):
                kept = (f"; the last good snapshot is kept: {os.path.basename(self.snapshots[-1])}"
                        if self.snapshots else "; nothing was saved")
                raise TrainingError(
                    f"loss became {value} at step {self.step + 1}; lower the learning rate "
                    f"(optim.lr), use train.dtype fp32/bf16, or set optim.max_grad_norm{kept}")
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.step)
            self.losses.append(value)
            self.history.append({"step": self.step, "epoch": epoch_before + 1, "loss": value,
                                 "lr": lrs, "seconds": round(seconds_before + time.time() - t0, 3)})
            self.log.step(self.history[-1])
            elapsed = time.time() - t0 - self._aside_seconds()  # training time alone
            done = self.step - start_step
            eta = elapsed / done * (total - self.step) if done else None
            timings = {}
            if done == 1:  # the first step of this session: where the time before it went
                timings = {**self.startup, "baseline_s": round(baseline, 3),
                           "first_step_s": round(time.time() - step_began, 3)}
            control.emit(Progress(
                "step", step=self.step, total=total, loss=value, loss_avg=_tail_mean(self.losses),
                lr=dict(lrs), epoch=self.epoch, elapsed=elapsed, eta=eta, timings=timings))
            if self.validation is not None and self.validation.due(self.step, total):
                self._validate(total)
            self._maybe_snapshot(total)
            self._maybe_sample(total, self.epoch if self.epoch != epoch_before else None)
        return False

    def _step_mark(self) -> tuple:
        """Where the run stands before a step: data position and every RNG it draws from."""
        return (self.epoch, self.batch_in_epoch, self._pending_epoch_snapshot,
                self.generator.get_state(), process_rng_states())

    def _rewind(self, mark: tuple) -> None:
        """Undo a step begun but not taken (a stop asked mid-step), so the saved state is the
        one after the last step taken and a resume goes on exactly as if never stopped."""
        self.optimizer.zero_grad(set_to_none=True)
        self._close_epoch_iter()
        (self.epoch, self.batch_in_epoch, self._pending_epoch_snapshot, generator,
         rngs) = mark
        self.generator.set_state(generator)
        set_process_rng_states(rngs)
        # the dataset's own position too (no fingerprint given: a position, not a new dataset)
        self.data.load_state_dict({"epoch": self.epoch, "batch_index": self.batch_in_epoch})

    def _maybe_sample(self, total: int, epoch_ended: int | None = None) -> None:
        """Ask the host for sample images when they are due, with the adapter as it is now
        (eval mode, no gradients); the process RNGs are given back so the run goes on exactly
        as it would without samples."""
        sampler = self.control.sampler
        if sampler is None or not sample_due(self.cfg, self.step, epoch_ended, total):
            return
        started = time.time()
        O.set_train_mode(self.optimizer, False)
        self.network.eval()
        self._all_home()  # the host samples with the whole model
        try:
            with process_rngs_kept(), torch.no_grad():
                paths = list(sampler(self.step, prompts_for(self.cfg)))
        finally:
            if self.offload is not None:
                self.offload.send_away()
            self.network.train()
            O.set_train_mode(self.optimizer, True)
            self.sample_seconds += time.time() - started
        self.samples += paths
        for path in paths:
            self.control.emit(Progress("sample", step=self.step, total=total, path=path))

    def _validate(self, total: int) -> None:
        """Measure the validation loss now (when the run has validation images); keep it in the
        history (the step's entry, or an entry of its own at the start) and tell the control."""
        if self.validation is None:
            return
        value = self.validation.measure(self)
        if self.history and self.history[-1].get("step") == self.step:
            self.history[-1]["val_loss"] = value
        else:
            self.history.append({"step": self.step, "val_loss": value})
        self.control.emit(Progress("validation", step=self.step, total=total, loss=value,
                                   epoch=self.epoch))

    def _aside_seconds(self) -> float:
        """Time the run spent on samples and validation: not training, kept out of the ETA."""
        return self.sample_seconds + (self.validation.seconds if self.validation else 0.0)

    def _micro_step(self, batch) -> torch.Tensor:
        if isinstance(batch, ModeBatch):  # slider / difference: the mode computes its loss
            return batch.loss(self)
        cfg, bundle = self.cfg, self.bundle
        part = getattr(batch, "part", None)  # a distributed run: this process's share
        if part is not None and not len(batch):  # draws the global batch's noise all the same
            self._draws(D.noise_like(part, self.device))
            return D.empty_loss(self.device)
        if batch.latents is not None:
            latents = batch.latents.to(self.device)
        else:
            with torch.no_grad(), self._using("vae"):
                latents = bundle.encode(batch.images.to(self.device))
        latents = latents.float()
        lc = cfg.loss
        if part is None:
            noise, timesteps, input_noise = self._draws(latents)
        else:  # drawn for the whole global batch, as one process would: this share's rows
            noise, timesteps, input_noise = D.rows(
                part, latents, *self._draws(D.noise_like(part, self.device)))
        noisy = L.noisy_latents(latents, input_noise, timesteps, self.alphas_cumprod)
        target = L.target_for(self.prediction, latents, noise, timesteps, self.alphas_cumprod)
        cond = self._condition(batch.captions, batch.sizes or [])
        pred = bundle.denoise(noisy, timesteps, cond)
        mask, weight = batch.mask, batch.loss_weight
        loss = L.compute_loss(pred.float(), target.float(), timesteps, lc, self.alphas_cumprod,
                              self.prediction, mask=None if mask is None else mask.to(self.device),
                              sample_weight=None if weight is None else weight.to(self.device))
        return loss if part is None else loss * D.weight(part)

    def _draws(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise, timesteps and the input-perturbed noise for `latents`' shape, from the run's
        generator."""
        lc = self.cfg.loss
        noise = L.make_noise(latents, self.generator, lc.noise_offset,
                             lc.noise_offset_random_strength, lc.multires_noise_iterations,
                             lc.multires_noise_discount)
        timesteps = L.timesteps_for(latents.shape[0], self.generator, lc).to(self.device)
        return noise, timesteps, L.input_perturbation(noise, lc.input_perturbation, self.generator)

    def condition(self, captions: list[str]) -> Any:
        """Text conditioning as the run computes it (cached while the TE is not trained; with
        the adapters' current strength when it is)."""
        return self._condition(captions, [])

    def _condition(self, captions: list[str], sizes: list) -> Any:
        """Text conditioning; cached per (caption, size) while no text encoder is trained.
        Cache entries are computed one caption at a time so a value never depends on the
        batch it first came in (a resumed run fills its cache in another order)."""
        if self.te_trained or not self.cfg.data.cache_text:
            return self.bundle.condition(captions, sizes)
        keys = [(c, tuple(sizes[i]) if sizes else ()) for i, c in enumerate(captions)]
        for i, key in enumerate(keys):
            if key not in self._text_cache:
                with torch.no_grad(), self._using(*self._offloaded_tes()):
                    fresh = self.bundle.condition([captions[i]], [sizes[i]] if sizes else [])
                self._text_cache[key] = _index_cond(fresh, 0)
        return _cat_cond([self._text_cache[k] for k in keys])

    def _using(self, *names: str):
        """The offloaded parts named on the device for one use (a caption not yet cached)."""
        if self.offload is None or not names:
            return contextlib.nullcontext()
        return self.offload.using(*names)

    def _next_batch(self):
        """The next batch in (epoch, batch_in_epoch) order. An epoch ends as soon as its last
        batch is handed out, so the saved position is always the next batch to train on."""
        for _ in range(2):
            if self._epoch_iter is None:
                self._epoch_iter = self.data.batches(self.epoch, start=self.batch_in_epoch)
                self._yielded_in_epoch = 0
            batch = next(self._epoch_iter, None)
            if batch is not None:
                self._yielded_in_epoch += 1
                self.batch_in_epoch += 1
                if 0 < self.data.steps_per_epoch <= self.batch_in_epoch:
                    self._end_epoch()
                return batch
            empty = self._yielded_in_epoch == 0 and self.batch_in_epoch == 0
            self._end_epoch()
            if empty:
                break
        raise TrainingError("the dataset produced no batch")

    def _end_epoch(self) -> None:
        self._close_epoch_iter()
        self.epoch += 1
        self.batch_in_epoch = 0
        every = self.cfg.save.save_every_epochs
        if every and self.epoch % every == 0:
            self._pending_epoch_snapshot = self.epoch

    def _close_epoch_iter(self) -> None:
        it, self._epoch_iter = self._epoch_iter, None
        if it is not None:
            it.close()

    def _finish(self, stopped: bool, total: int, t0: float) -> TrainResult:
        """Save the state (when asked or stopped), the file and the history."""
        cfg = self.cfg
        self._close_epoch_iter()
        # the state holds the training point (schedule-free: before switching to eval)
        state_dir = save_state(self) if (cfg.save.save_state or stopped) else ""
        O.set_train_mode(self.optimizer, False)
        self.network.eval()
        path = F.output_path(cfg.save)
        meta = self.save(path)
        history_path = self.log.write(self.history)
        validation_seconds = self.validation.seconds if self.validation else 0.0
        return TrainResult(
            path=path, steps=self.step, total_steps=total,
            first_loss=self.losses[0] if self.losses else float("nan"),
            final_loss=_tail_mean(self.losses), seconds=time.time() - t0,
            losses=list(self.losses), snapshots=list(self.snapshots), stopped=stopped,
            stop_reason=self.control.stop_reason if stopped else "", state_dir=state_dir,
            metadata=meta, modules=self.network.parts(), warnings=list(self.warnings),
            history_path=history_path,
            lrs=next((dict(h["lr"]) for h in reversed(self.history) if "lr" in h),
                     self.current_lrs()),
            samples=list(self.samples), sample_seconds=self.sample_seconds,
            val_losses=[(h["step"], h["val_loss"]) for h in self.history if "val_loss" in h],
            validation_seconds=validation_seconds,
            ema_path=F.ema_path(path) if self.ema is not None else "")

    def _tear_down(self, guard: BaseGuard) -> None:
        """Detach everything and give the base model back, whatever happened."""
        self._close_epoch_iter()
        if self.log is not None:
            self.log.close()
        if self.checkpointing is not None:
            self.checkpointing.disable()
        if self.network is not None:
            self.network.detach()
        if self.offload is not None:
            self.offload.restore()
            guard.accept_moved()
        guard.restore()
        self._text_cache.clear()

    # -- settings ----------------------------------------------------------------------------
    def total_steps(self) -> int:
        """Optimizer steps this run plans (a continued file's steps not counted)."""
        t = self.cfg.train
        if t.epochs > 0:
            return t.epochs * max(1, math.ceil(self.data.steps_per_epoch / t.grad_accum))
        return t.max_steps

    def _param_groups(self) -> list[dict]:
        """UNet and text-encoder groups with their own LR; per-block LR weights split the UNet's
        group; LoRA+ gives up weights ratio x LR."""
        cfg, net = self.cfg, self.network
        weights = parse_block_values(cfg.network.block_lr_weights, "network.block_lr_weights")
        buckets: dict[tuple[str, float, bool], list] = {}
        for a in net:
            part = part_of(a.name)
            lr = (cfg.unet_lr if part == "unet" else cfg.te_lr) * \
                block_value(getattr(a, "block", ""), weights, 1.0)
            for n, p in a.named_parameters():
                if not p.requires_grad:
                    continue
                up = cfg.network.loraplus_ratio != 1.0 and n.startswith("lora_up")
                buckets.setdefault((part, lr, up), []).append(p)
        groups = []
        for (part, lr, up), params in buckets.items():
            name = part + (f"@{lr:g}" if weights and part == "unet" else "") + ("_up" if up else "")
            groups.append({"params": params, "name": name,
                           "lr": lr * cfg.network.loraplus_ratio if up else lr})
        return [g for g in groups if g["params"] and g["lr"] > 0]

    def current_lrs(self) -> dict[str, float]:
        """Effective LR per param group: d * lr for adaptive optimizers, else the group's LR."""
        lrs = O.effective_lrs(self.optimizer)
        return {g.get("name", str(i)): lr for i, (g, lr) in
                enumerate(zip(self.optimizer.param_groups, lrs))}

    def _cache_progress(self, done: int, total: int) -> None:
        self.control.emit(Progress("log", message=f"caching latents {done}/{total}"))

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self.control.emit(Progress("log", message=f"warning: {message}"))

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str) -> dict[str, str]:
        """Write the adapter as it is now (schedule-free optimizers in eval mode), and with EMA
        its average beside it (`run_files.ema_path`); return the adapter file's metadata (a
        distributed run: only rank 0 writes, the others get {})."""
        if not self.writes:
            return {}
        info = run_info(self.cfg, self.bundle, self.data, prediction=self.prediction,
                        steps=self.step, epoch=self.epoch, planned_steps=self.total_steps(),
                        step_offset=self.step_offset, session_id=self.session_id,
                        started_at=self.started_at)
        if self.ema is not None:  # the EMA file gets the same times as the raw one
            info = dataclasses.replace(info, finished_at=now_iso())
        meta = save_lora(self.network.kohya_state_dict(), info, path,
                         save_dtype=self.cfg.save.save_dtype)
        if self.ema is not None:
            with self.ema.applied():
                save_lora(self.network.kohya_state_dict(), self.ema.info(info), F.ema_path(path),
                          save_dtype=self.cfg.save.save_dtype)
        return meta

    def _maybe_snapshot(self, total: int) -> None:
        epoch_due, self._pending_epoch_snapshot = self._pending_epoch_snapshot, None
        name = F.snapshot_name(self.cfg.save, self.step, total, epoch_due)
        if name is not None:
            self._write_snapshot(name, total)

    def _write_snapshot(self, name: str, total: int) -> str:
        O.set_train_mode(self.optimizer, False)
        self.network.eval()
        path = F.output_path(self.cfg.save, name)
        self.save(path)
        self.network.train()
        O.set_train_mode(self.optimizer, True)
        self.snapshots = [p for p in self.snapshots if p != path] + [path]
        self.log.write(self.history)
        self.control.emit(Progress("snapshot", step=self.step, total=total, path=path))
        if self.writes:
            self.snapshots = F.prune_snapshots(self.snapshots, self.cfg.save.keep_last)
        return path

    # -- pause and test ----------------------------------------------------------------------
    def _pause_if_requested(self, total: int) -> None:
        """At a step boundary: write NAME-stepN, take the adapter out of the model and hand the
        model to the host (`control.on_pause(path)`: release the lock, hot-load the file) until
        resumed; then take it back (`control.on_resume()`, which may refuse: the model was
        switched) and go on exactly where the run was (process RNGs kept, the base weights
        checked to hold the same values)."""
        control = self.control
        if not control.pause_requested or control.stop_requested:
            return
        path = self._write_snapshot(F.step_snapshot_name(self.cfg.save, self.step), total)
        if self.checkpointing is not None:
            self.checkpointing.disable()
        self.network.detach()
        self._all_home()  # the host generates with the whole model while paused
        with process_rngs_kept():
            control.emit(Progress("paused", step=self.step, total=total, path=path,
                                  message=f"paused at step {self.step}: test "
                                          f"{os.path.splitext(os.path.basename(path))[0]}"))
            try:
                if control.on_pause is not None:
                    control.on_pause(path)
                control.wait_while_paused()
            finally:
                try:
                    if control.on_resume is not None:
                        control.on_resume()
                except Exception as e:  # the model was switched or unloaded while paused
                    self.model_gone = True
                    control.request_stop(f"the run ended while paused: {e}")
        if self.model_gone:
            return
        try:
            self.guard.accept_same_values()  # the host's generations wrote and restored them
        except TrainingError:
            self.model_gone = True
            control.request_stop("the base weights hold other values after the pause "
                                 "(another model, or a network left baked in)")
            raise
        self.network.attach()
        if self.checkpointing is not None:
            self.checkpointing.enable()
        if self.offload is not None:
            self.offload.send_away()
        control.emit(Progress("resumed", step=self.step, total=total,
                              message=f"resumed at step {self.step}"))


def train(bundle: ModelBundle, cfg: RunConfig, control: TrainControl | None = None,
          data: TrainingData | None = None, resume_dir: str = "",
          dist: D.Dist | None = None) -> TrainResult:
    return Trainer(bundle, cfg, control, data, resume_dir, dist).run()


def _tail_mean(values: list[float], n: int = 10) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail) if tail else float("nan")


def _index_cond(cond: Any, i: int) -> Any:
    if isinstance(cond, dict):
        return {k: v[i:i + 1] for k, v in cond.items()}
    return cond[i:i + 1]


def _cat_cond(parts: list) -> Any:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)
