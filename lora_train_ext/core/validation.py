"""The validation loss: the training loss measured on images the run does not train on, the same
way every time, so values compare across steps and across runs.

The images are the ones `data.validation_count` holds out of the dataset (picked by the seed) or
those of `data.validation_dir`, read once each without any random augmentation
(`data.split.validation_view`) and encoded once. Each image is measured at
`train.validation_timesteps` fixed timesteps spread evenly over [timestep_min, timestep_max),
each with its own noise drawn once from a generator seeded with NOISE_SEED and the image's file
name (not the run's seed, nor the image's place in the batch order: runs with other seeds
measure the same image with the same noise). The loss is the run's loss
(`loss.loss`, min-SNR / debiased weights, masks) on plain Gaussian noise: no noise offset,
pyramid noise or input perturbation.

A measurement runs in eval mode (no dropout; schedule-free optimizers' averaged weights), without
gradients, under the training's autocast, and touches neither the run's noise generator nor the
process RNGs, so a run trains the same weights with or without validation. It is due at the
run's start, every `train.validate_every_steps` steps and at the last step (not when a run is
stopped early). A resumed run does not measure its start again.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

from . import loss as L
from . import optim as O
from .config import RunConfig
from .data import TrainData
from .dtypes import TORCH_DTYPES
from .run_state import process_rngs_kept

if TYPE_CHECKING:
    from .trainer import Trainer

NOISE_SEED = 20240917  # fixed: the validation noise is the same for every run


def wanted(cfg: RunConfig) -> bool:
    return bool(cfg.data.validation_count or cfg.data.validation_dir)


def fixed_timesteps(t_min: int, t_max: int, count: int) -> list[int]:
    """`count` timesteps at the middles of `count` equal parts of [t_min, t_max)."""
    width = (t_max - t_min) / count
    return [min(t_max - 1, t_min + int((k + 0.5) * width)) for k in range(count)]


@dataclass
class _Batch:
    latents: torch.Tensor  # (B, C, h, w) on the CPU
    captions: list[str]
    sizes: list
    mask: torch.Tensor | None
    noise: list[torch.Tensor]  # one (B, C, h, w) per fixed timestep, on the CPU


class Validation:
    """The validation set of one run. Built before model work (it scans the images: a missing
    or empty folder is a UserError then); `prepare()` encodes them once the model is set up."""

    def __init__(self, cfg: RunConfig, arch: str):
        self.cfg = cfg
        self.data = TrainData(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                              arch=arch, split="validation")
        self.timesteps = fixed_timesteps(cfg.loss.timestep_min, cfg.loss.timestep_max,
                                         cfg.train.validation_timesteps)
        self.batches: list[_Batch] = []
        self.seconds = 0.0  # time spent measuring (kept out of the run's speed and ETA)

    @property
    def num_images(self) -> int:
        return self.data.num_images

    def due(self, step: int, total: int) -> bool:
        every = self.cfg.train.validate_every_steps
        return step >= total or (every > 0 and step % every == 0)

    def prepare(self, encode, vae_id: str) -> None:
        """Encode every image once and draw the fixed noise."""
        started = time.time()
        with process_rngs_kept(), torch.no_grad():
            self.data.cache_latents(encode, vae_id)
            self.batches = []
            for batch in self.data.batches(0):
                latents = batch.latents.float().cpu()
                per_image = [_noise(key, latents.shape[1:], len(self.timesteps))
                             for key in batch.keys]
                noise = [torch.stack([n[k] for n in per_image])
                         for k in range(len(self.timesteps))]
                self.batches.append(_Batch(latents, list(batch.captions), list(batch.sizes),
                                           batch.mask, noise))
        self.seconds += time.time() - started

    def measure(self, run: Trainer) -> float:
        """The mean loss over every image and fixed timestep with the adapter as it is now."""
        started = time.time()
        cfg, bundle, device = self.cfg, run.bundle, run.device
        amp_dtype = TORCH_DTYPES[cfg.train.dtype]
        total, count = 0.0, 0
        with process_rngs_kept(), torch.no_grad(), _eval_weights(run.network, run.optimizer):
            for b in self.batches:
                latents = b.latents.to(device)
                mask = None if b.mask is None else b.mask.to(device)
                with torch.autocast(device.type, dtype=amp_dtype,
                                    enabled=amp_dtype != torch.float32):
                    cond = run._condition(b.captions, b.sizes)
                for t, noise in zip(self.timesteps, b.noise):
                    ts = torch.full((latents.shape[0],), t, dtype=torch.long, device=device)
                    noise = noise.to(device)
                    noisy = L.noisy_latents(latents, noise, ts, run.alphas_cumprod)
                    target = L.target_for(run.prediction, latents, noise, ts, run.alphas_cumprod)
                    with torch.autocast(device.type, dtype=amp_dtype,
                                        enabled=amp_dtype != torch.float32):
                        pred = bundle.denoise(noisy, ts, cond)
                    loss = L.compute_loss(pred.float(), target.float(), ts, cfg.loss,
                                          run.alphas_cumprod, run.prediction, mask=mask)
                    total += float(loss) * latents.shape[0]
                    count += latents.shape[0]
        self.seconds += time.time() - started
        return total / max(1, count)


def _noise(key: str, shape: torch.Size, count: int) -> list[torch.Tensor]:
    """An image's noise, one tensor per fixed timestep: from a generator seeded with NOISE_SEED
    and the image's file name, so it does not depend on the order or batch the image is in."""
    digest = hashlib.sha256(f"{NOISE_SEED}|{os.path.basename(key)}".encode("utf-8")).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return [torch.randn(tuple(shape), generator=generator) for _ in range(count)]


@contextmanager
def _eval_weights(network: Any, optimizer: Any) -> Iterator[None]:
    """The network in eval mode (schedule-free optimizers: their averaged weights); afterwards
    train mode with every parameter exactly as it was (switching a schedule-free optimizer to
    eval and back recomputes the weights, which may round differently)."""
    saved = None
    if O.is_schedule_free(optimizer):
        saved = [p.detach().clone() for p in network.parameters()]
    O.set_train_mode(optimizer, False)
    network.eval()
    try:
        yield
    finally:
        network.train()
        O.set_train_mode(optimizer, True)
        if saved is not None:
            with torch.no_grad():
                for p, old in zip(network.parameters(), saved):
                    p.copy_(old)
