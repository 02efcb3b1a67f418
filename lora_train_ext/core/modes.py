"""Training modes beyond captioned images (`mode.kind`).

- slider (concept sliders / LECO): no images. Each step makes latents at a random timestep by
  running the frozen model from noise for a few DDIM steps on the target prompt, takes the frozen
  model's predictions for the positive, negative and neutral prompts (the adapter at strength 0)
  and trains the adapter so that at strength s the prediction for the target prompt is
  `neutral + s * guidance * (positive - negative)`. A slider draws s = +1 or -1 per step (one
  file then goes both ways: +s toward the positive, -s toward the negative); enhance uses +1,
  erase trains +1 toward `neutral - guidance * (positive - negative)`.
- difference (ADDifT-style): image pairs (NAME + NAME_after). Both images get the same noise and
  timestep; the adapter learns to make the prediction for the first image what the frozen model
  predicts for the second, so the change between them is what it learns. The first image's
  frozen prediction is the baseline the change is measured from.

Both are `TrainingData` the trainer reads like a dataset; their batches carry their own loss
(`Batch.loss`), so the loop itself is the same for every mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import RunConfig, parse_resolution
from .errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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


# -- difference -----------------------------------------------------------------------------------
@dataclass
class Pair:
    before: str
    after: str
    caption: str


def find_pairs(cfg: RunConfig) -> tuple[list[Pair], list[str]]:
    """(pairs, names of first images without a second one)."""
    d, m = cfg.data, cfg.mode
    folder = d.dataset_dir
    if not os.path.isdir(folder):
        raise UserError("data.dataset_dir", f"folder not found: {folder}")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
    stems = {os.path.splitext(f)[0]: f for f in names}
    pairs, unmatched = [], []
    for stem, name in stems.items():
        if not m.after_dir and m.pair_suffix and stem.endswith(m.pair_suffix):
            continue  # a second image
        if m.after_dir:
            after = next((os.path.join(m.after_dir, stem + e) for e in IMAGE_EXTS
                          if os.path.isfile(os.path.join(m.after_dir, stem + e))), None)
        else:
            other = stems.get(stem + m.pair_suffix)
            after = os.path.join(folder, other) if other else None
        if after is None:
            unmatched.append(name)
            continue
        caption_file = os.path.join(folder, stem + d.caption_extension)
        caption = d.default_caption
        if os.path.isfile(caption_file):
            with open(caption_file, encoding="utf-8", errors="replace") as f:
                caption = f.read().strip()
        if d.trigger_word:
            caption = f"{d.trigger_word}, {caption}" if caption else d.trigger_word
        pairs.append(Pair(os.path.join(folder, name), after, caption))
    return pairs, unmatched


class PairData(_Positions):
    """Image pairs, both members at the training resolution (centre crop), latents cached."""

    def __init__(self, cfg: RunConfig, arch: str):
        super().__init__()
        self.cfg = cfg
        self.pairs, self.unmatched = find_pairs(cfg)
        if not self.pairs:
            raise UserError("data.dataset_dir",
                            f"no image pairs in {cfg.data.dataset_dir} (NAME.png with "
                            f"NAME{cfg.mode.pair_suffix}.png"
                            + (f", or NAME.png in {cfg.mode.after_dir}" if cfg.mode.after_dir
                               else "") + ")")
        self.batch_size = cfg.train.batch_size
        self.num_images = 2 * len(self.pairs)
        self.steps_per_epoch = max(1, -(-len(self.pairs) // self.batch_size))
        self.size = parse_resolution(cfg.data.resolution)
        self._latents: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._encode = None

    def _pixels(self, path: str) -> torch.Tensor:
        from PIL import Image, ImageOps

        from .data.images import load_image

        image, _ = load_image(path)
        w, h = self.size
        image = ImageOps.fit(image, (w, h), method=Image.BICUBIC, centering=(0.5, 0.5))
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1)

    def cache_latents(self, encode, vae_id, progress=None) -> None:
        self._latents = []
        for i, pair in enumerate(self.pairs):
            with torch.no_grad():
                lat = encode(torch.stack([self._pixels(pair.before), self._pixels(pair.after)]))
            self._latents.append((lat[0:1].detach().float().cpu(), lat[1:2].detach().float().cpu()))
            if progress is not None:
                progress(i + 1, len(self.pairs))
        self._encode = encode

    def batches(self, epoch: int, start: int = 0):
        order = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(len(self.pairs))
        for index in range(start, self.steps_per_epoch):
            self._position = (epoch, index + 1)
            chosen = [int(i) for i in order[index * self.batch_size:(index + 1) * self.batch_size]]
            yield ModeBatch(loss=lambda trainer, c=chosen: self._loss(trainer, c),
                            captions=[self.pairs[i].caption for i in chosen])

    def _pair_latents(self, chosen: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._latents:  # not cached (cache_latents off): encode now
            raise UserError("data.cache_latents", "difference training needs the latent cache; "
                                                  "turn data.cache_latents on")
        before = torch.cat([self._latents[i][0] for i in chosen]).to(device)
        after = torch.cat([self._latents[i][1] for i in chosen]).to(device)
        return before, after

    def _loss(self, trainer, chosen: list[int]) -> torch.Tensor:
        from . import loss as L

        bundle, net, g = trainer.bundle, trainer.network, trainer.generator
        before, after = self._pair_latents(chosen, trainer.device)
        lc = self.cfg.loss
        noise = torch.randn(before.shape, generator=g, device=g.device).to(trainer.device)
        t = L.sample_timesteps(before.shape[0], g, lc.timestep_min, lc.timestep_max,
                               lc.timestep_sampling, lc.logit_mean, lc.logit_std
                               ).to(trainer.device)
        ac = trainer.alphas_cumprod
        x_before = L.noisy_latents(before, noise, t, ac)
        x_after = L.noisy_latents(after, noise, t, ac)  # the same noise and timestep
        captions = [self.pairs[i].caption for i in chosen]
        cond = trainer.condition(captions)
        net.set_multiplier(0.0)
        try:
            with torch.no_grad():
                goal = bundle.denoise(x_after, t, cond).float()
        finally:
            net.set_multiplier(1.0)
        pred = bundle.denoise(x_before, t, trainer.condition(captions))
        return F.mse_loss(pred.float(), goal)


def make_mode_data(cfg: RunConfig, arch: str):
    """The TrainingData of a mode, None for images (the captioned dataset)."""
    if cfg.mode.kind == "slider":
        return SliderData(cfg, arch)
    if cfg.mode.kind == "difference":
        return PairData(cfg, arch)
    return None


def pair_report(cfg: RunConfig) -> str:
    """For the dataset check: how many pairs, which first images have no second one."""
    pairs, unmatched = find_pairs(cfg)
    text = f"{len(pairs)} image pair(s)"
    if unmatched:
        text += f"; without a second image: {', '.join(unmatched[:10])}" + \
            (f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else "")
    return text

