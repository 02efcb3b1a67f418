"""The training loop. It knows a ModelBundle, a RunConfig and a TrainControl; nothing of any UI.

Read top to bottom: check the settings (before any model work), prepare (data, freeze, network,
optimizer, saved state), loop (noise, predict, loss, step), finish (state, save, detach, restore,
verify). The base model is given back bit-identical whether the run finishes, is stopped, or fails.

Exact resume: `save_state()` writes everything the rest of a run depends on (adapter weights,
optimizer and scheduler state, the python / numpy / torch / CUDA RNGs, the noise generator, the
data position (epoch, batch in epoch), losses, history, snapshot list); a run resumed from it
takes the same steps as one that was never stopped. Everything else is recomputed
deterministically: the data order follows from (seed, epoch), cached latents from the frozen VAE,
cached text conditioning from the frozen text encoder (one caption at a time, so its values do
not depend on which captions shared a batch).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import loss as L
from . import optim as O
from . import sched as S
from .bundle import ModelBundle, Progress, TrainControl
from .checkpointing import GradientCheckpointing
from .config import RunConfig, parse_resolution
from .errors import TrainingError, UserError
from .fsio import atomic_write
from .guard import BaseGuard
from .preflight import check_settings
from .inspect import arch_from_version
from .lora_file import BASE_MODEL_VERSION, LoraInfo, atomic_write_text, load_lora, now_iso, save_lora
from .networks import AdapterNetwork, build_network, part_of
from .networks.targets import block_value, parse_block_values

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# not .pt / .ckpt / .safetensors: the WebUI lists those in the Lora folder as networks
STATE_FILE = "training_state.pth"
STATE_FORMAT = 2
# Settings a resumed run may change without changing its result (where files go and in what
# precision, how many snapshots are kept, whether the end state is saved).
_RESUME_FREE = ("save.output_dir", "save.output_name", "save.save_dtype", "save.keep_last",
                "save.save_state", "save.comment", "network.existing_lora", "data.cache_dir",
                "data.cache_to_disk", "version")


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
    history_path: str = ""  # NAME.history.json: [{step, loss, lr: {group: effective LR}}]
    lrs: dict[str, float] = field(default_factory=dict)  # effective LR per group at the last step


class Trainer:
    """One run. `run()` may be called once.

    resume_dir: a `NAME-state` folder written by `save_state()`; the run goes on from there to
    its configured end (`cfg` should be the saved run's config, `NAME-state/config.json`).
    """

    def __init__(self, bundle: ModelBundle, cfg: RunConfig, control: TrainControl | None = None,
                 data: Any = None, resume_dir: str = ""):
        self.bundle = bundle
        self.cfg = cfg.validate()
        self.control = control or TrainControl()
        self.data = data
        self.resume_dir = resume_dir
        self.device = bundle.device
        if cfg.train.dtype == "fp16" and self.device.type != "cuda":
            raise UserError("train.dtype", "fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        self.prediction = bundle.prediction if cfg.model.prediction == "auto" else cfg.model.prediction
        alphas = bundle.alphas_cumprod.double().cpu()
        if cfg.model.zero_terminal_snr:
            alphas = L.zero_terminal_snr(alphas)
        self.alphas_cumprod = alphas.to(self.device)
        self.network: AdapterNetwork | None = None
        self.optimizer = None
        self.scheduler = None
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
        self._pending_epoch_snapshot: int | None = None

    # -- set-up ------------------------------------------------------------------------------
    def _make_data(self):
        if self.data is None:
            from .data import TrainData

            self.data = TrainData(self.cfg.data, batch_size=self.cfg.train.batch_size,
                                  seed=self.cfg.train.seed, arch=self.bundle.arch)
        return self.data

    def total_steps(self) -> int:
        """Optimizer steps this run plans (a continued file's steps not counted)."""
        t = self.cfg.train
        if t.epochs > 0:
            per_epoch = max(1, math.ceil(self.data.steps_per_epoch / t.grad_accum))
            return t.epochs * per_epoch
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

    def _seed_everything(self) -> None:
        seed = int(self.cfg.train.seed) % (2**32)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self.control.emit(Progress("log", message=f"warning: {message}"))

    # -- conditioning ------------------------------------------------------------------------
    def _condition(self, captions: list[str], sizes: list) -> Any:
        """Text conditioning; cached per (caption, size) while no text encoder is trained.
        Cache entries are computed one caption at a time so a value never depends on the
        batch it first came in (a resumed run fills its cache in another order)."""
        if self.te_trained or not self.cfg.data.cache_text:
            return self.bundle.condition(captions, sizes)
        keys = [(c, tuple(sizes[i]) if sizes else ()) for i, c in enumerate(captions)]
        for i, key in enumerate(keys):
            if key not in self._text_cache:
                with torch.no_grad():
                    fresh = self.bundle.condition([captions[i]], [sizes[i]] if sizes else [])
                self._text_cache[key] = _index_cond(fresh, 0)
        return _cat_cond([self._text_cache[k] for k in keys])

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, bundle, control = self.cfg, self.bundle, self.control
        t0 = time.time()
        for message in check_settings(cfg, tuple(bundle.text_encoders)):
            self._warn(message)
        state = self._read_state(self.resume_dir) if self.resume_dir else None
        existing = None
        if cfg.network.existing_lora and state is None:
            existing = self._read_existing(cfg.network.existing_lora)
        data = self._make_data()
        out_dir = cfg.save.output_dir or "."
        _check_writable(out_dir)
        final_path = os.path.join(out_dir, f"{cfg.save.output_name}.safetensors")
        guard = BaseGuard(bundle.base_modules())
        guard.freeze()
        ckpt = None
        result = None
        try:
            with torch.inference_mode(False), torch.enable_grad():
                self._seed_everything()
                adapter_dtype = torch.bfloat16 if cfg.train.adapter_dtype == "bf16" else torch.float32
                self.network = build_network(bundle.trainable_roots(), bundle.arch, cfg.network,
                                             seed=cfg.network.init_seed if cfg.network.init_seed
                                             is not None else cfg.train.seed,
                                             dtype=adapter_dtype).to(self.device)
                if existing is not None:
                    self._load_existing(*existing)
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
                    self._restore(state)
                total = self.step_offset + planned
                if cfg.data.cache_latents and hasattr(data, "cache_latents"):
                    with torch.no_grad():
                        data.cache_latents(bundle.encode, bundle.vae_id,
                                           progress=lambda i, n: control.emit(Progress(
                                               "log", message=f"caching latents {i}/{n}")))
                if cfg.train.gradient_checkpointing:
                    ckpt = GradientCheckpointing([bundle.unet, *(
                        te for p, te in bundle.text_encoders.items() if self.te_trained)]).enable()
                if state is not None:
                    _set_rng_states(state["rng"], self.generator)  # last: nothing may draw after
                stopped = self._loop(total, t0)
                self._close_epoch_iter()
                # the state holds the training point (schedule-free: before switching to eval)
                state_dir = self.save_state() if (cfg.save.save_state or stopped) else ""
                O.set_train_mode(self.optimizer, False)
                self.network.eval()
                path = final_path
                meta = self.save(path)
                history_path = self.write_history()
                result = TrainResult(
                    path=path, steps=self.step, total_steps=total,
                    first_loss=self.losses[0] if self.losses else float("nan"),
                    final_loss=_tail_mean(self.losses), seconds=time.time() - t0,
                    losses=list(self.losses), snapshots=list(self.snapshots), stopped=stopped,
                    stop_reason=control.stop_reason if stopped else "", state_dir=state_dir,
                    metadata=meta, modules=self.network.parts(), warnings=list(self.warnings),
                    history_path=history_path,
                    lrs=dict(self.history[-1]["lr"]) if self.history else self.current_lrs())
        finally:
            self._close_epoch_iter()
            if ckpt is not None:
                ckpt.disable()
            if self.network is not None:
                self.network.detach()
            guard.restore()
            self._text_cache.clear()
        guard.verify()
        control.emit(Progress("end", step=self.step, total=result.total_steps,
                              loss=result.final_loss, elapsed=result.seconds, path=result.path,
                              message="stopped" if result.stopped else "finished"))
        return result

    def _loop(self, total: int, t0: float) -> bool:
        """Train until `total` optimizer steps; True when stopped early by the control."""
        cfg, control = self.cfg, self.control
        params = self.network.trainable_parameters()
        accum = cfg.train.grad_accum
        amp_dtype = COMPUTE_DTYPES[cfg.train.dtype]
        use_amp = amp_dtype != torch.float32
        start_step = self.step
        control.emit(Progress("start", step=self.step, total=total))
        while self.step < total:
            control.wait_while_paused()
            if control.stop_requested:
                return True
            step_loss = torch.zeros((), device=self.device)
            for _ in range(accum):
                batch = self._next_batch()
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
                    loss = self._micro_step(batch)
                (loss / accum).backward()
                step_loss += loss.detach() / accum
            if cfg.optim.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            self.optimizer.step()
            lrs = self.current_lrs()  # what this step used: the scheduler moves on next
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.optim.scale_weight_norms > 0:
                _scale_weight_norms(self.network, cfg.optim.scale_weight_norms)
            value = float(step_loss)
            if not math.isfinite(value):
                raise TrainingError(
                    f"loss became {value} at step {self.step + 1}; lower the learning rate "
                    f"(optim.lr), use train.dtype fp32/bf16, or set optim.max_grad_norm")
            self.step += 1
            self.losses.append(value)
            self.history.append({"step": self.step, "loss": value, "lr": lrs})
            elapsed = time.time() - t0
            done = self.step - start_step
            eta = elapsed / done * (total - self.step) if done else None
            control.emit(Progress(
                "step", step=self.step, total=total, loss=value, loss_avg=_tail_mean(self.losses),
                lr=dict(lrs), epoch=self.epoch, elapsed=elapsed, eta=eta))
            self._maybe_snapshot(total)
        return False

    # -- data order --------------------------------------------------------------------------
    def _next_batch(self):
        """The next batch in (epoch, batch_in_epoch) order. An epoch ends as soon as its last
        batch is handed out, so the saved position is always the next batch to train on."""
        for _ in range(2):
            if self._epoch_iter is None:
                self._epoch_iter = self._open_epoch(self.epoch, self.batch_in_epoch)
                self._yielded_in_epoch = 0
            batch = next(self._epoch_iter, None)
            if batch is not None:
                self._yielded_in_epoch += 1
                self.batch_in_epoch += 1
                per_epoch = getattr(self.data, "steps_per_epoch", 0)
                if per_epoch and self.batch_in_epoch >= per_epoch:
                    self._end_epoch()
                return batch
            empty = self._yielded_in_epoch == 0 and self.batch_in_epoch == 0
            self._end_epoch()
            if empty:
                break
        raise TrainingError("the dataset produced no batch")

    def _open_epoch(self, epoch: int, start: int):
        try:
            takes_start = "start" in inspect.signature(self.data.batches).parameters
        except (TypeError, ValueError):
            takes_start = False
        if takes_start:
            return iter(self.data.batches(epoch, start=start))
        it = iter(self.data.batches(epoch))
        for _ in range(start):
            next(it, None)
        return it

    def _end_epoch(self) -> None:
        self._close_epoch_iter()
        self.epoch += 1
        self.batch_in_epoch = 0
        every = self.cfg.save.save_every_epochs
        if every and self.epoch % every == 0:
            self._pending_epoch_snapshot = self.epoch

    def _close_epoch_iter(self) -> None:
        it, self._epoch_iter = self._epoch_iter, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def _micro_step(self, batch) -> torch.Tensor:
        cfg, bundle = self.cfg, self.bundle
        if getattr(batch, "latents", None) is not None:
            latents = batch.latents.to(self.device)
        else:
            with torch.no_grad():
                latents = bundle.encode(batch.images.to(self.device))
        latents = latents.float()
        lc = cfg.loss
        noise = L.make_noise(latents, self.generator, lc.noise_offset,
                             lc.noise_offset_random_strength, lc.multires_noise_iterations,
                             lc.multires_noise_discount)
        timesteps = L.sample_timesteps(latents.shape[0], self.generator, lc.timestep_min,
                                       lc.timestep_max, lc.timestep_sampling, lc.logit_mean,
                                       lc.logit_std).to(self.device)
        input_noise = L.input_perturbation(noise, lc.input_perturbation, self.generator)
        noisy = L.noisy_latents(latents, input_noise, timesteps, self.alphas_cumprod)
        target = L.target_for(self.prediction, latents, noise, timesteps, self.alphas_cumprod)
        cond = self._condition(batch.captions, getattr(batch, "sizes", None) or [])
        pred = bundle.denoise(noisy, timesteps, cond)
        mask = getattr(batch, "mask", None)
        weight = getattr(batch, "loss_weight", None)
        return L.compute_loss(pred.float(), target.float(), timesteps, lc, self.alphas_cumprod,
                              self.prediction, mask=None if mask is None else mask.to(self.device),
                              sample_weight=None if weight is None else weight.to(self.device))

    def current_lrs(self) -> dict[str, float]:
        """Effective LR per param group: d * lr for adaptive optimizers, else the group's LR."""
        lrs = O.effective_lrs(self.optimizer)
        return {g.get("name", str(i)): lr for i, (g, lr) in
                enumerate(zip(self.optimizer.param_groups, lrs))}

    # -- files -------------------------------------------------------------------------------
    def info(self) -> LoraInfo:
        cfg, data = self.cfg, self.data
        w, h = parse_resolution(cfg.data.resolution)
        planned = self.total_steps()
        return LoraInfo(
            arch=self.bundle.arch, algo=cfg.network.algo, rank=cfg.network.rank,
            alpha=cfg.network.alpha, conv_rank=cfg.network.conv_rank,
            conv_alpha=cfg.network.conv_alpha, prediction=self.prediction,
            output_name=cfg.save.output_name, trigger_phrase=cfg.data.trigger_word,
            resolution=f"{w},{h}", model_name=self.bundle.model_name,
            model_hash=self.bundle.model_hash, steps=self.step, epoch=self.epoch,
            num_epochs=cfg.train.epochs, num_train_images=getattr(data, "num_images", 0),
            learning_rate=cfg.optim.lr, unet_lr=cfg.unet_lr, te_lr=cfg.te_lr,
            optimizer=optimizer_label(cfg.optim.optimizer, cfg.optim.optimizer_args),
            lr_scheduler=cfg.optim.scheduler, noise_offset=cfg.loss.noise_offset,
            min_snr_gamma=cfg.loss.min_snr_gamma, seed=cfg.train.seed, comment=cfg.save.comment,
            tag_frequency=data.tag_frequency() if hasattr(data, "tag_frequency") else {},
            dataset_dirs=data.dataset_dirs_meta() if hasattr(data, "dataset_dirs_meta") else {},
            session_id=self.session_id, started_at=self.started_at,
            extra={"ss_loss_type": cfg.loss.loss, "ss_huber_c": str(cfg.loss.huber_delta),
                   "ss_huber_schedule": cfg.loss.huber_schedule,
                   "ss_max_grad_norm": str(cfg.optim.max_grad_norm),
                   "ss_scale_weight_norms": str(cfg.optim.scale_weight_norms),
                   "ss_gradient_accumulation_steps": str(cfg.train.grad_accum),
                   "ss_batch_size_per_device": str(cfg.train.batch_size),
                   "ss_max_train_steps": str(self.step_offset + planned),
                   "ss_lr_warmup_steps": str(S.warmup_steps_for(
                       planned, cfg.optim.warmup_steps, cfg.optim.warmup_ratio)),
                   "ss_lr_scheduler_num_cycles": str(cfg.optim.scheduler_cycles),
                   "ss_lr_scheduler_power": str(cfg.optim.scheduler_power),
                   "ss_noise_offset_random_strength": str(cfg.loss.noise_offset_random_strength),
                   "ss_multires_noise_iterations": str(cfg.loss.multires_noise_iterations),
                   "ss_multires_noise_discount": str(cfg.loss.multires_noise_discount),
                   "ss_ip_noise_gamma": str(cfg.loss.input_perturbation),
                   "ss_debiased_estimation": str(cfg.loss.debiased_estimation),
                   "ss_zero_terminal_snr": str(cfg.model.zero_terminal_snr),
                   "ss_timestep_range": f"{cfg.loss.timestep_min},{cfg.loss.timestep_max}",
                   "ss_network_dropout": str(cfg.network.dropout),
                   "ss_block_ranks": cfg.network.block_ranks,
                   "ss_block_lr_weights": cfg.network.block_lr_weights,
                   "ss_mixed_precision": cfg.train.dtype,
                   "lora_train_ext.config": self.cfg.to_json()},
        )

    def save(self, path: str) -> dict[str, str]:
        """Write the adapter as it is now (schedule-free optimizers in eval mode)."""
        tensors = self.network.kohya_state_dict()
        return save_lora(tensors, self.info(), path, save_dtype=self.cfg.save.save_dtype)

    def history_path(self) -> str:
        s = self.cfg.save
        return os.path.join(s.output_dir or ".", f"{s.output_name}.history.json")

    def write_history(self) -> str:
        """NAME.history.json: [{"step", "loss", "lr": {group: effective LR}}], written atomically."""
        path = self.history_path()
        atomic_write_text(path, json.dumps(self.history) + "\n")
        return path

    def _maybe_snapshot(self, total: int) -> None:
        s = self.cfg.save
        name = None
        epoch_due, self._pending_epoch_snapshot = self._pending_epoch_snapshot, None
        if epoch_due is not None and self.step < total:
            name = f"{s.output_name}-{epoch_due:06d}"
        if name is None and s.save_every_steps and self.step % s.save_every_steps == 0 \
                and self.step < total:
            name = f"{s.output_name}-step{self.step:08d}"
        if name is None:
            return
        O.set_train_mode(self.optimizer, False)
        self.network.eval()
        path = os.path.join(s.output_dir or ".", name + ".safetensors")
        self.save(path)
        self.network.train()
        O.set_train_mode(self.optimizer, True)
        if path in self.snapshots:
            self.snapshots.remove(path)
        self.snapshots.append(path)
        self.write_history()
        self.control.emit(Progress("snapshot", step=self.step, total=total, path=path))
        if s.keep_last and len(self.snapshots) > s.keep_last:
            for old in self.snapshots[:-s.keep_last]:
                for p in (old, os.path.splitext(old)[0] + ".json"):
                    if os.path.exists(p):
                        os.remove(p)
            self.snapshots = self.snapshots[-s.keep_last:]

    # -- continuing a plain LoRA file --------------------------------------------------------
    def _read_existing(self, path: str) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
        """Read the file and check what its metadata and shapes say before any model work."""
        field_name = "network.existing_lora"
        if not os.path.isfile(path):
            raise UserError(field_name, f"file not found: {path}")
        try:
            tensors, meta = load_lora(path)
        except UserError as e:
            raise UserError(field_name, e.message) from None
        name, cfg = os.path.basename(path), self.cfg.network
        arch = self.bundle.arch
        version = meta.get("ss_base_model_version", "")
        file_arch = arch_from_version(version)
        if file_arch and file_arch != arch:
            raise UserError(field_name, f"{name} was trained for {version}; this model is {arch} "
                                        f"({BASE_MODEL_VERSION.get(arch)})")
        file_algo = _algo_of(meta)
        if file_algo and file_algo != cfg.algo and {file_algo, cfg.algo} != {"lora", "locon"}:
            raise UserError(field_name, f"{name} is a {file_algo} file; network.algo is {cfg.algo}")
        ranks = sorted({int(t.shape[0]) for k, t in tensors.items()
                        if k.endswith("lora_down.weight") and t.dim() == 2})
        if ranks and ranks != [cfg.rank]:
            raise UserError(field_name, f"{name} has rank {'/'.join(map(str, ranks))}; "
                                        f"set network.rank to {ranks[0]} to continue it")
        return tensors, meta, path

    def _load_existing(self, tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str) -> None:
        name = os.path.basename(path)
        own = self.network.kohya_state_dict()
        for key, t in tensors.items():
            if key.endswith(".alpha") and key in own and not torch.equal(
                    t.float().reshape(()), own[key].float().reshape(())):
                raise UserError("network.existing_lora",
                                f"{name} has alpha {float(t):g} ({key.split('.')[0]}), this "
                                f"network {float(own[key]):g}; set network.alpha / conv_alpha "
                                "to the file's values")
        try:
            self.network.load_kohya_state_dict(tensors)
        except (KeyError, ValueError) as e:
            raise UserError("network.existing_lora",
                            f"{name} does not fit this network "
                            f"(arch {self.bundle.arch}, algo {self.cfg.network.algo}, "
                            f"rank {self.cfg.network.rank}): {e}") from None
        self.step = self.step_offset = _steps_from(meta, path)

    # -- full state (exact resume) -----------------------------------------------------------
    def state_dir(self) -> str:
        return os.path.join(self.cfg.save.output_dir or ".", f"{self.cfg.save.output_name}-state")

    def save_state(self) -> str:
        """Write NAME-state/training_state.pth (atomically) and NAME-state/config.json; return the folder."""
        folder = self.state_dir()
        os.makedirs(folder, exist_ok=True)
        epoch, batch_in_epoch = self.epoch, self.batch_in_epoch
        if hasattr(self.data, "state_dict"):
            pos = self.data.state_dict()  # counts batches that came back empty, too
            if int(pos.get("epoch", -1)) == epoch:
                batch_in_epoch = max(batch_in_epoch, int(pos.get("batch_index", 0)))
        state = {
            "format": STATE_FORMAT,
            "step": self.step,
            "step_offset": self.step_offset,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "losses": list(self.losses),
            "history": list(self.history),
            "snapshots": list(self.snapshots),
            "network": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_states(self.generator),
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else {},
            "config": self.cfg.to_dict(),
            "session_id": self.session_id,
            "started_at": self.started_at,
        }
        atomic_write(os.path.join(folder, STATE_FILE), lambda tmp: torch.save(state, tmp))
        self.cfg.write(os.path.join(folder, "config.json"))
        return folder

    def _read_state(self, folder: str) -> dict:
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise UserError("resume", f"no saved state in {folder} (expected {STATE_FILE}, "
                                      "written with save.save_state or when a run is stopped)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or foreign file
            raise UserError("resume", f"cannot read {path}: {e}") from None
        if not isinstance(state, dict) or state.get("format") not in (1, STATE_FORMAT):
            raise UserError("resume", f"{path} is not a state this version can resume")
        changed = _config_changes(state.get("config") or {}, self.cfg.to_dict())
        if changed:
            self._warn("resuming with settings that differ from the saved run ("
                       + ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
                       + "); the result will not match an uninterrupted run")
        return state

    def _restore(self, state: dict) -> None:
        """Weights, optimizer, scheduler, counters and data position (RNGs come last, in run)."""
        try:
            self.network.load_state_dict(state["network"])
        except (RuntimeError, KeyError) as e:
            raise UserError("resume", f"the saved adapter does not fit this network: {e}") from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError("resume", f"the saved optimizer state does not fit: {e}") from None
        O.set_train_mode(self.optimizer, True)
        sched = dict(state["scheduler"])
        # the schedule's shape comes from this run's config; only its position is restored
        sched["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(sched)
        self.step, self.step_offset = int(state["step"]), int(state.get("step_offset", 0))
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self.losses = list(state["losses"])
        self.history = list(state.get("history", []))
        self.snapshots = list(state.get("snapshots", []))
        self.session_id, self.started_at = state["session_id"], state["started_at"]
        saved = state.get("data") or {}
        if saved and hasattr(self.data, "load_state_dict"):
            fingerprint = self.data.state_dict().get("fingerprint") \
                if hasattr(self.data, "state_dict") else None
            self.data.load_state_dict(saved)
            if saved.get("fingerprint") not in (None, fingerprint):
                self._warn("the dataset changed since the state was saved: the resumed data "
                           "order is not the one the run started with")


def train(bundle: ModelBundle, cfg: RunConfig, control: TrainControl | None = None,
          data: Any = None, resume_dir: str = "") -> TrainResult:
    return Trainer(bundle, cfg, control, data, resume_dir).run()


def optimizer_label(name: str, args_text: str) -> str:
    """ss_optimizer as kohya writes it: `Name(key=value,...)`, or the bare name."""
    try:
        name = O.canonical_name(name)
        args = O.parse_optimizer_args(args_text)
    except UserError:
        return name + (f"({args_text})" if args_text else "")
    if not args:
        return name
    return f"{name}({','.join(f'{k}={v}' for k, v in args.items())})"


def _rng_states(generator: torch.Generator) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def _set_rng_states(rng: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
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


def _algo_of(meta: dict[str, str]) -> str:
    module = meta.get("ss_network_module", "")
    try:
        args = json.loads(meta.get("ss_network_args") or "{}")
    except ValueError:
        args = {}
    algo = str(args.get("algo", "")) if isinstance(args, dict) else ""
    if module == "networks.lora":
        return algo if algo in ("lora", "locon") else "lora"
    return algo


def _tail_mean(values: list[float], n: int = 10) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail) if tail else float("nan")


def _check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError("save.output_dir", f"cannot write to {folder}: {e.strerror or e}") from None


def _steps_from(meta: dict[str, str], path: str) -> int:
    """Steps already trained: `ss_steps` metadata, else the number in the file name as
    ComfyUI's node writes it (`name_1200_steps.safetensors`, `name_1200_steps_20250225_2037`)
    or as our snapshots do (`name-step00001200`); 0 when neither says."""
    try:
        return max(0, int(meta.get("ss_steps", "")))
    except ValueError:
        pass
    stem = os.path.splitext(os.path.basename(path))[0]
    m = re.search(r"(\d+)_steps(?:_|$)", stem) or re.search(r"-step(\d+)$", stem)
    return int(m.group(1)) if m else 0


def _scale_weight_norms(network: AdapterNetwork, max_norm: float) -> None:
    """Scale each adapter down so the norm of its weight delta is at most max_norm (kohya)."""
    with torch.no_grad():
        for a in network:
            norm = a.delta_weight().norm()
            if norm > max_norm:
                if hasattr(a, "scale_delta_"):  # LyCORIS modules know how to scale their delta
                    a.scale_delta_(float(max_norm / norm))
                    continue
                ratio = math.sqrt(float(max_norm / norm))  # LoRA: up and down share the ratio
                for p in (a.lora_up.weight, a.lora_down.weight):
                    p.mul_(ratio)


def _index_cond(cond: Any, i: int) -> Any:
    if isinstance(cond, dict):
        return {k: v[i:i + 1] for k, v in cond.items()}
    return cond[i:i + 1]


def _cat_cond(parts: list) -> Any:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)

