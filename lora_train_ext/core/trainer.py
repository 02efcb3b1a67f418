"""The training loop. It knows a ModelBundle, a RunConfig and a TrainControl; nothing of any UI.

Read top to bottom: prepare (data, freeze, network, optimizer), loop (noise, predict, loss,
step), finish (save, detach, restore, verify). The base model is given back bit-identical whether
the run finishes, is stopped, or fails.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
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
from .guard import BaseGuard
from .lora_file import LoraInfo, load_lora, now_iso, save_lora
from .networks import AdapterNetwork, build_network, part_of

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_FILE = "state.pt"


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


class Trainer:
    """One run. `run()` may be called once."""

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
        self.epoch = 0
        self.batch_in_epoch = 0
        self.losses: list[float] = []
        self.snapshots: list[str] = []
        self.session_id = uuid.uuid4().hex
        self.started_at = now_iso()
        self._text_cache: dict[tuple, Any] = {}

    # -- set-up ------------------------------------------------------------------------------
    def _make_data(self):
        if self.data is None:
            from .data import TrainData

            self.data = TrainData(self.cfg.data, batch_size=self.cfg.train.batch_size,
                                  seed=self.cfg.train.seed, arch=self.bundle.arch)
        return self.data

    def total_steps(self) -> int:
        t = self.cfg.train
        if t.epochs > 0:
            per_epoch = max(1, math.ceil(self.data.steps_per_epoch / t.grad_accum))
            return t.epochs * per_epoch
        return t.max_steps

    def _param_groups(self) -> list[dict]:
        """UNet and text-encoder groups with their own LR; LoRA+ gives up weights ratio x LR."""
        cfg, net = self.cfg, self.network
        groups = []
        for part in net.parts():
            lr = cfg.unet_lr if part == "unet" else cfg.te_lr
            params = net.trainable_parameters(part)
            if cfg.network.loraplus_ratio != 1.0:
                ups = [p for a in net if part_of(a.name) == part
                       for n, p in a.named_parameters() if n.startswith("lora_up")]
                up_ids = {id(p) for p in ups}
                rest = [p for p in params if id(p) not in up_ids]
                groups.append({"params": rest, "lr": lr, "name": part})
                groups.append({"params": ups, "lr": lr * cfg.network.loraplus_ratio,
                               "name": f"{part}_up"})
            else:
                groups.append({"params": params, "lr": lr, "name": part})
        return [g for g in groups if g["params"] and g["lr"] > 0]

    def _seed_everything(self) -> None:
        seed = int(self.cfg.train.seed) % (2**32)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    # -- conditioning ------------------------------------------------------------------------
    def _condition(self, captions: list[str], sizes: list) -> Any:
        if self.te_trained or not self.cfg.data.cache_text:
            return self.bundle.condition(captions, sizes)
        parts = []
        missing = [i for i, c in enumerate(captions)
                   if (c, tuple(sizes[i]) if sizes else ()) not in self._text_cache]
        if missing:
            with torch.no_grad():
                fresh = self.bundle.condition([captions[i] for i in missing],
                                              [sizes[i] for i in missing] if sizes else [])
            for j, i in enumerate(missing):
                key = (captions[i], tuple(sizes[i]) if sizes else ())
                self._text_cache[key] = _index_cond(fresh, j)
        for i, c in enumerate(captions):
            parts.append(self._text_cache[(c, tuple(sizes[i]) if sizes else ())])
        return _cat_cond(parts)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, bundle, control = self.cfg, self.bundle, self.control
        t0 = time.time()
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
                if cfg.network.existing_lora and not self.resume_dir:
                    self._load_existing(cfg.network.existing_lora)
                self.te_trained = any(p != "unet" for p in self.network.parts())
                self.network.train()
                self.network.attach()
                groups = self._param_groups()
                if not groups:
                    raise UserError("optim.lr", "every trained part has learning rate 0")
                self.optimizer = O.build_optimizer(cfg.optim.optimizer, groups, cfg.optim.optimizer_args)
                total = self.total_steps()
                self.scheduler = S.build_scheduler(
                    cfg.optim.scheduler, self.optimizer, total, warmup_steps=cfg.optim.warmup_steps,
                    warmup_ratio=cfg.optim.warmup_ratio, cycles=cfg.optim.scheduler_cycles,
                    power=cfg.optim.scheduler_power)
                if self.resume_dir:
                    self._load_state(self.resume_dir)
                if cfg.data.cache_latents and hasattr(data, "cache_latents"):
                    with torch.no_grad():
                        data.cache_latents(bundle.encode, bundle.vae_id,
                                           progress=lambda i, n: control.emit(Progress(
                                               "log", message=f"caching latents {i}/{n}")))
                if cfg.train.gradient_checkpointing:
                    ckpt = GradientCheckpointing([bundle.unet, *(
                        te for p, te in bundle.text_encoders.items() if self.te_trained)]).enable()
                stopped = self._loop(total, t0)
                O.set_train_mode(self.optimizer, False)
                self.network.eval()
                path = final_path
                meta = self.save(path)
                state_dir = self.save_state() if (cfg.save.save_state or stopped) else ""
                result = TrainResult(
                    path=path, steps=self.step, total_steps=total,
                    first_loss=self.losses[0] if self.losses else float("nan"),
                    final_loss=_tail_mean(self.losses), seconds=time.time() - t0,
                    losses=list(self.losses), snapshots=list(self.snapshots), stopped=stopped,
                    stop_reason=control.stop_reason if stopped else "", state_dir=state_dir,
                    metadata=meta, modules=self.network.parts())
        finally:
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
        batches = self._batch_stream()
        while self.step < total:
            control.wait_while_paused()
            if control.stop_requested:
                return True
            step_loss = torch.zeros((), device=self.device)
            for _ in range(accum):
                batch = next(batches)
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
                    loss = self._micro_step(batch)
                (loss / accum).backward()
                step_loss += loss.detach() / accum
            if cfg.optim.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            self.optimizer.step()
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
            elapsed = time.time() - t0
            done = self.step - start_step
            eta = elapsed / done * (total - self.step) if done else None
            control.emit(Progress(
                "step", step=self.step, total=total, loss=value, loss_avg=_tail_mean(self.losses),
                lr=self.current_lrs(), epoch=self.epoch, elapsed=elapsed, eta=eta))
            self._maybe_snapshot(total)
        return False

    def _batch_stream(self):
        """Batches forever, epoch after epoch, resuming at (epoch, batch_in_epoch)."""
        while True:
            skip = self.batch_in_epoch
            produced = False
            for i, batch in enumerate(self.data.batches(self.epoch)):
                produced = True
                if i < skip:
                    continue
                self.batch_in_epoch = i + 1
                yield batch
            if not produced:
                raise TrainingError("the dataset produced no batch")
            self.epoch += 1
            self.batch_in_epoch = 0
            if self.cfg.save.save_every_epochs and self.epoch % self.cfg.save.save_every_epochs == 0:
                self._pending_epoch_snapshot = self.epoch

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
        input_noise = noise
        if lc.input_perturbation > 0:
            input_noise = noise + lc.input_perturbation * torch.randn(
                noise.shape, generator=self.generator, device=noise.device, dtype=noise.dtype)
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
        lrs = O.effective_lrs(self.optimizer)
        return {g.get("name", str(i)): lr for i, (g, lr) in
                enumerate(zip(self.optimizer.param_groups, lrs))}

    # -- files -------------------------------------------------------------------------------
    def info(self) -> LoraInfo:
        cfg, data = self.cfg, self.data
        w, h = parse_resolution(cfg.data.resolution)
        return LoraInfo(
            arch=self.bundle.arch, algo=cfg.network.algo, rank=cfg.network.rank,
            alpha=cfg.network.alpha, conv_rank=cfg.network.conv_rank,
            conv_alpha=cfg.network.conv_alpha, prediction=self.prediction,
            output_name=cfg.save.output_name, trigger_phrase=cfg.data.trigger_word,
            resolution=f"{w},{h}", model_name=self.bundle.model_name,
            model_hash=self.bundle.model_hash, steps=self.step, epoch=self.epoch,
            num_epochs=cfg.train.epochs, num_train_images=getattr(data, "num_images", 0),
            learning_rate=cfg.optim.lr, unet_lr=cfg.unet_lr, te_lr=cfg.te_lr,
            optimizer=cfg.optim.optimizer + (f"({cfg.optim.optimizer_args})"
                                             if cfg.optim.optimizer_args else ""),
            lr_scheduler=cfg.optim.scheduler, noise_offset=cfg.loss.noise_offset,
            min_snr_gamma=cfg.loss.min_snr_gamma, seed=cfg.train.seed, comment=cfg.save.comment,
            tag_frequency=data.tag_frequency() if hasattr(data, "tag_frequency") else {},
            dataset_dirs=data.dataset_dirs_meta() if hasattr(data, "dataset_dirs_meta") else {},
            session_id=self.session_id, started_at=self.started_at,
            extra={"ss_loss_type": cfg.loss.loss, "ss_huber_c": str(cfg.loss.huber_delta),
                   "ss_huber_schedule": cfg.loss.huber_schedule,
                   "ss_max_grad_norm": str(cfg.optim.max_grad_norm),
                   "ss_gradient_accumulation_steps": str(cfg.train.grad_accum),
                   "ss_batch_size_per_device": str(cfg.train.batch_size),
                   "ss_max_train_steps": str(self.total_steps()),
                   "ss_lr_warmup_steps": str(cfg.optim.warmup_steps),
                   "ss_multires_noise_iterations": str(cfg.loss.multires_noise_iterations),
                   "ss_multires_noise_discount": str(cfg.loss.multires_noise_discount),
                   "ss_debiased_estimation": str(cfg.loss.debiased_estimation),
                   "ss_zero_terminal_snr": str(cfg.model.zero_terminal_snr),
                   "ss_timestep_range": f"{cfg.loss.timestep_min},{cfg.loss.timestep_max}",
                   "ss_mixed_precision": cfg.train.dtype,
                   "lora_train_ext.config": self.cfg.to_json()},
        )

    def save(self, path: str) -> dict[str, str]:
        """Write the adapter as it is now (schedule-free optimizers in eval mode)."""
        tensors = self.network.kohya_state_dict()
        return save_lora(tensors, self.info(), path, save_dtype=self.cfg.save.save_dtype)

    def _maybe_snapshot(self, total: int) -> None:
        s = self.cfg.save
        name = None
        epoch_due = getattr(self, "_pending_epoch_snapshot", None)
        if epoch_due is not None:
            self._pending_epoch_snapshot = None
            if self.step < total:
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
        self.snapshots.append(path)
        self.control.emit(Progress("snapshot", step=self.step, total=total, path=path))
        if s.keep_last and len(self.snapshots) > s.keep_last:
            for old in self.snapshots[:-s.keep_last]:
                for p in (old, os.path.splitext(old)[0] + ".json"):
                    if os.path.exists(p):
                        os.remove(p)
            self.snapshots = self.snapshots[-s.keep_last:]

    def _load_existing(self, path: str) -> None:
        tensors, meta = load_lora(path)
        try:
            self.network.load_kohya_state_dict(tensors)
        except (KeyError, ValueError) as e:
            raise UserError("network.existing_lora",
                            f"{os.path.basename(path)} does not fit this network "
                            f"(arch {self.bundle.arch}, algo {self.cfg.network.algo}, "
                            f"rank {self.cfg.network.rank}): {e}") from None
        self.step = _steps_from(meta, path)

    # -- full state (exact resume) -----------------------------------------------------------
    def save_state(self) -> str:
        folder = os.path.join(self.cfg.save.output_dir or ".", f"{self.cfg.save.output_name}-state")
        os.makedirs(folder, exist_ok=True)
        state = {
            "format": 1,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "losses": self.losses,
            "network": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "generator": self.generator.get_state(),
            },
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else {},
            "config": self.cfg.to_dict(),
            "session_id": self.session_id,
            "started_at": self.started_at,
        }
        tmp = os.path.join(folder, f".{STATE_FILE}.tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(folder, STATE_FILE))
        self.cfg.write(os.path.join(folder, "config.json"))
        return folder

    def _load_state(self, folder: str) -> None:
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise UserError("resume", f"no saved state in {folder} (expected {STATE_FILE})")
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.losses = list(state["losses"])
        self.session_id, self.started_at = state["session_id"], state["started_at"]
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.generator.set_state(rng["generator"])
        if state["data"] and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])


def train(bundle: ModelBundle, cfg: RunConfig, control: TrainControl | None = None,
          data: Any = None, resume_dir: str = "") -> TrainResult:
    return Trainer(bundle, cfg, control, data, resume_dir).run()


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
    """Steps already trained: `ss_steps` metadata, else a number at the end of the file name
    (`name_1200_steps.safetensors`, `name-step00001200`), as ComfyUI's node reads it."""
    import re

    try:
        return int(meta.get("ss_steps", ""))
    except ValueError:
        pass
    stem = os.path.splitext(os.path.basename(path))[0]
    m = re.search(r"(\d+)(?:_steps)?$", stem)
    return int(m.group(1)) if m else 0


def _scale_weight_norms(network: AdapterNetwork, max_norm: float) -> None:
    """Scale each adapter down so the norm of its weight delta is at most max_norm (kohya)."""
    with torch.no_grad():
        for a in network:
            norm = a.delta_weight().norm()
            if norm > max_norm:
                ratio = math.sqrt(float(max_norm / norm))
                for p in a.parameters():
                    p.mul_(ratio)


def _index_cond(cond: Any, i: int) -> Any:
    if isinstance(cond, dict):
        return {k: v[i:i + 1] for k, v in cond.items()}
    return cond[i:i + 1]


def _cat_cond(parts: list) -> Any:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


@contextlib.contextmanager
def adapters_attached(network: AdapterNetwork, multiplier: float = 1.0):
    """Attach a network for the body (sampling, tests), then detach it again."""
    network.set_multiplier(multiplier)
    network.attach()
    try:
        yield network
    finally:
        network.detach()
