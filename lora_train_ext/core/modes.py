"""Training modes beyond captioned images (`mode.kind`).

- slider (concept sliders / LECO): no images. Each step makes latents at a random timestep by
  running the frozen model from noise for a few DDIM steps on the target prompt, takes the frozen
  model's predictions for the positive, negative and neutral prompts (the adapter at strength 0)
  and trains the adapter so that at strength s the prediction for the target prompt is
  `neutral + s * guidance * (positive - negative)`. A slider draws s = +1 or -1 per step (one
  file then goes both ways: +s toward the positive, -s toward the negative); enhance uses +1,
  erase trains +1 toward `neutral - guidance * (positive - negative)`.

A mode is `TrainingData` the trainer reads like a dataset; their batches carry their own loss
(`Batch.loss`), so the loop itself is the same for every mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .config import RunConfig, parse_resolution


@dataclass
class ModeBatch:
    """A batch whose loss its mode computes: `loss(trainer) -> scalar tensor`."""
    loss: Callable[[Any], torch.Tensor]
    captions: list[str] = field(default_factory=list)
    latents: torch.Tensor | None = None
    images: torch.Tensor | None = None
    sizes: list = field(default_factory=list)
    mask: torch.Tensor | None = None
    loss_weight: torch.Tensor | None = None


class _Positions:
    """The data position part of TrainingData (steps_per_epoch batches an epoch)."""

    steps_per_epoch = 1
    num_images = 0

    def __init__(self):
        self._position = (0, 0)

    def state_dict(self) -> dict:
        epoch, index = self._position
        return {"epoch": epoch, "batch_index": index}

    def load_state_dict(self, state: dict) -> None:
        self._position = (int(state.get("epoch", 0)), int(state.get("batch_index", 0)))

    def tag_frequency(self) -> dict:
        return {}

    def dataset_dirs_meta(self) -> dict:
        return {}


# -- slider ---------------------------------------------------------------------------------------
class SliderData(_Positions):
    """Prompts only: one batch per step, each makes its own latents (see the module's doc)."""

    def __init__(self, cfg: RunConfig, arch: str):
        super().__init__()
        self.cfg = cfg
        self.batch_size = cfg.train.batch_size
        w, h = parse_resolution(cfg.data.resolution)
        self.latent_hw = (h // 8, w // 8)
        self.steps_per_epoch = 1

    def cache_latents(self, encode, vae_id, progress=None) -> None:
        """Nothing to encode: the latents are made every step."""

    def batches(self, epoch: int, start: int = 0):
        for index in range(start, self.steps_per_epoch):
            self._position = (epoch, index + 1)
            m = self.cfg.mode
            yield ModeBatch(loss=self._loss, captions=[m.target] * self.batch_size)

    def _loss(self, trainer) -> torch.Tensor:
        m, bundle, net = self.cfg.mode, trainer.bundle, trainer.network
        g, device = trainer.generator, trainer.device
        b = self.batch_size
        ac = trainer.alphas_cumprod.float()
        lo, hi = self.cfg.loss.timestep_min, self.cfg.loss.timestep_max
        t = int(torch.randint(lo, hi, (1,), generator=g, device=g.device))
        sign = 1.0
        if m.action == "slider":
            sign = 1.0 if int(torch.randint(0, 2, (1,), generator=g, device=g.device)) else -1.0
        x = torch.randn((b, 4, *self.latent_hw), generator=g, device=g.device).to(device)
        net.set_multiplier(0.0)
        try:
            with torch.no_grad():
                cond_target = trainer.condition([m.target] * b)
                x = _denoise_to(bundle, x, t, cond_target, ac, m.denoise_steps, trainer.prediction)
                tt = torch.full((b,), t, device=device, dtype=torch.long)
                e_pos = bundle.denoise(x, tt, trainer.condition([m.positive] * b)).float()
                e_neg = bundle.denoise(x, tt, trainer.condition([m.negative] * b)).float()
                e_neu = bundle.denoise(x, tt, trainer.condition(
                    [m.neutral or m.target] * b)).float()
        finally:
            net.set_multiplier(sign)
        direction = m.guidance * (e_pos - e_neg)
        goal = e_neu - direction if m.action == "erase" else e_neu + sign * direction
        pred = bundle.denoise(x, tt, trainer.condition([m.target] * b))
        net.set_multiplier(1.0)
        return F.mse_loss(pred.float(), goal)


def _denoise_to(bundle, x: torch.Tensor, t: int, cond, ac: torch.Tensor, steps: int,
                prediction: str) -> torch.Tensor:
    """DDIM (eta 0) with the model as it is (the adapter off) from pure noise at 999 to t."""
    if steps <= 0 or t >= 999:
        return x
    ts = torch.linspace(999, t, steps + 1).round().long().tolist()
    for now, nxt in zip(ts[:-1], ts[1:]):
        tt = torch.full((x.shape[0],), now, device=x.device, dtype=torch.long)
        out = bundle.denoise(x, tt, cond).float()
        a, a_next = ac[now], ac[nxt]
        if prediction == "v":
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
            eps = (1 - a).sqrt() * x + a.sqrt() * out
        else:
            eps = out
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def make_mode_data(cfg: RunConfig, arch: str):
    """The TrainingData of a mode, None for images (the captioned dataset)."""
    if cfg.mode.kind == "slider":
        return SliderData(cfg, arch)
    return None

