"""Training modes beyond captioned images (`mode.kind`).

- slider (concept sliders / LECO): no images. Each step makes latents at a random timestep by
  running the frozen model from noise for a few DDIM steps on the target prompt, takes the frozen
  model's predictions for the positive, negative and neutral prompts (the adapter at strength 0)
  and trains the adapter so that at strength s the prediction for the target prompt is
  `neutral + s * guidance * (positive - negative)`. A slider draws s = +1 or -1 per step (one
  file then goes both ways: +s toward the positive, -s toward the negative); enhance uses +1,
  erase trains +1 toward `neutral - guidance * (positive - negative)`.
- difference (ADDifT-style): image pairs, a first image and a second one (NAME.png +
  NAME_after.png, or two folders with the same names). Both members are noised with the same
  noise and the same timestep and go through the model in one batch, the adapter off (strength
  0: the frozen model's prediction, the baseline) and on (strength 1). The loss is measured on
  the denoised estimate x0 (from the prediction at the fixed noised input: x0 = (x - sigma *
  eps) / sqrt(alpha_bar), or sqrt(alpha_bar) * x - sigma * v): with the adapter, the x0
  estimate of each member should be the frozen one moved by the change, second - first (in
  latents). What the pair has in common cancels, so the adapter learns only the change; at -1 it
  takes it away, like a slider whose direction comes from images.
  TrainTrain's ADDifT trains the adapter (at +-0.25, alternating) on one member to predict what
  the frozen model predicts on the other. In x0 terms that moves the estimate by the change only
  where the frozen model cannot tell the members apart (high noise), and on the tiny test model,
  whose content is buried in the noise at every timestep, that target did not learn; the target
  here asks for the same move at every noise level, which the tests measure.

A mode is `TrainingData` the trainer reads like a dataset; their batches carry their own loss
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
    name: str  # the first image's file name
    first: str
    second: str
    caption: str


@dataclass
class PairScan:
    """The pairs of a dataset folder and the images without their other half."""
    pairs: list[Pair]
    no_second: list[str]  # first images (file names) whose second image is missing
    no_first: list[str]  # second images whose first image is missing
    first_dir: str
    second_dir: str  # mode.after_dir, or "" for NAME<suffix> in the dataset folder
    suffix: str

    def unmatched_messages(self) -> list[str]:
        """One line per kind of unmatched image, naming the setting the folder comes from."""
        out = []
        if self.no_second:
            where = (f"no image of the same name in mode.after_dir ({self.second_dir})"
                     if self.second_dir else f"no NAME{self.suffix} image beside it")
            out.append(f"data.dataset_dir: {len(self.no_second)} first image(s) without a "
                       f"second image ({where}), left out: {_names(self.no_second)}")
        if self.no_first:
            field = "mode.after_dir" if self.second_dir else "data.dataset_dir"
            out.append(f"{field}: {len(self.no_first)} second image(s) without a first image "
                       f"in data.dataset_dir, left out: {_names(self.no_first)}")
        return out

    def summary(self) -> str:
        how = (f"first images in {self.first_dir}, second images of the same name in "
               f"{self.second_dir}" if self.second_dir else
               f"NAME + NAME{self.suffix} in {self.first_dir}")
        lines = [f"{len(self.pairs)} image pair(s) ({how})", *self.unmatched_messages()]
        return "\n".join(lines)


def _names(names: list[str], shown: int = 10) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def _images_by_stem(folder: str) -> dict[str, str]:
    from .data.images import is_image_file

    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        if is_image_file(name) and os.path.isfile(os.path.join(folder, name)):
            out.setdefault(os.path.splitext(name)[0], name)
    return out


def scan_pairs(cfg: RunConfig) -> PairScan:
    """The pairs of the dataset folder: NAME + NAME<mode.pair_suffix> in data.dataset_dir, or
    NAME in data.dataset_dir + NAME in mode.after_dir. UserError naming the folder's setting
    when a folder is missing."""
    d, m = cfg.data, cfg.mode
    first_dir, second_dir = d.dataset_dir, m.after_dir
    if not first_dir:
        raise UserError("data.dataset_dir", "give the folder with the first images of the pairs")
    if not os.path.isdir(first_dir):
        raise UserError("data.dataset_dir", f"folder not found: {first_dir}")
    if second_dir and not os.path.isdir(second_dir):
        raise UserError("mode.after_dir", f"folder not found: {second_dir}")
    firsts = _images_by_stem(first_dir)
    suffix = m.pair_suffix
    if second_dir:
        seconds = _images_by_stem(second_dir)
        if os.path.realpath(second_dir) == os.path.realpath(first_dir):
            raise UserError("mode.after_dir", "is the dataset folder itself; give the folder "
                                              "with the second images, or leave it empty for "
                                              f"NAME{suffix} pairs")
        match = {stem: os.path.join(second_dir, name) for stem, name in seconds.items()}
        spare = [name for stem, name in seconds.items() if stem not in firsts]
    else:
        seconds = {stem[:-len(suffix)]: name for stem, name in firsts.items()
                   if stem.endswith(suffix) and len(stem) > len(suffix)}
        firsts = {stem: name for stem, name in firsts.items()
                  if not (stem.endswith(suffix) and len(stem) > len(suffix))}
        match = {stem: os.path.join(first_dir, name) for stem, name in seconds.items()}
        spare = [name for stem, name in seconds.items() if stem not in firsts]
    ext = d.caption_extension if d.caption_extension.startswith(".") else "." + d.caption_extension
    pairs, no_second = [], []
    for stem, name in firsts.items():
        if stem not in match:
            no_second.append(name)
            continue
        caption = d.default_caption
        caption_file = os.path.join(first_dir, stem + ext)
        if os.path.isfile(caption_file):
            with open(caption_file, encoding="utf-8", errors="replace") as f:
                caption = f.read().strip()
        if d.trigger_word:
            caption = f"{d.trigger_word}, {caption}" if caption else d.trigger_word
        pairs.append(Pair(name, os.path.join(first_dir, name), match[stem], caption))
    return PairScan(pairs, no_second, sorted(spare), first_dir, second_dir, suffix)


def pair_pixels(path: str, size: tuple[int, int], field: str = "data.dataset_dir") -> torch.Tensor:
    """(3, h, w) in -1..1: the image scaled to cover `size` (w, h) and centre-cropped."""
    from PIL import Image, ImageOps

    from .data.images import ImageReadError, load_image

    try:
        image, _ = load_image(path)
    except ImageReadError as e:
        raise UserError(field, f"{os.path.basename(path)}: {e}") from None
    image = ImageOps.fit(image, size, method=Image.BICUBIC, centering=(0.5, 0.5))
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class PairData(_Positions):
    """Image pairs at the training resolution (scaled and centre-cropped, the same for both;
    no buckets), their latents encoded once; batches of pairs in a per-epoch shuffled order."""

    def __init__(self, cfg: RunConfig, arch: str):
        super().__init__()
        self.cfg = cfg
        self.scan = scan_pairs(cfg)
        self.pairs = self.scan.pairs
        if not self.pairs:
            raise UserError("data.dataset_dir", "no image pairs: " + self.scan.summary())
        self.batch_size = cfg.train.batch_size
        self.num_images = 2 * len(self.pairs)
        self.steps_per_epoch = max(1, -(-len(self.pairs) // self.batch_size))
        self.size = parse_resolution(cfg.data.resolution)
        self._latents: list[tuple[torch.Tensor, torch.Tensor]] = []

    def cache_latents(self, encode, vae_id, progress=None) -> None:
        """Encode every pair once (both members in one batch)."""
        self._latents = []
        second_field = "mode.after_dir" if self.scan.second_dir else "data.dataset_dir"
        for i, pair in enumerate(self.pairs):
            pixels = torch.stack([pair_pixels(pair.first, self.size),
                                  pair_pixels(pair.second, self.size, second_field)])
            with torch.no_grad():
                lat = encode(pixels).detach().float().cpu()
            self._latents.append((lat[0:1], lat[1:2]))
            if progress is not None:
                progress(i + 1, len(self.pairs))

    def dataset_dirs_meta(self) -> dict:
        key = os.path.basename(os.path.normpath(self.scan.first_dir))
        return {key: {"n_repeats": 1, "img_count": self.num_images}}

    def batches(self, epoch: int, start: int = 0):
        order = np.random.default_rng([int(self.cfg.train.seed) % 2**32, epoch]).permutation(
            len(self.pairs))
        for index in range(start, self.steps_per_epoch):
            self._position = (epoch, index + 1)
            chosen = [int(i) for i in order[index * self.batch_size:(index + 1) * self.batch_size]]
            yield ModeBatch(loss=lambda trainer, c=chosen: self._loss(trainer, c),
                            captions=[self.pairs[i].caption for i in chosen])

    def _loss(self, trainer, chosen: list[int]) -> torch.Tensor:
        from . import loss as L

        if not self._latents:  # the latent cache is off: encode now, once
            self.cache_latents(trainer.bundle.encode, trainer.bundle.vae_id)
        bundle, net, g, device = trainer.bundle, trainer.network, trainer.generator, trainer.device
        first = torch.cat([self._latents[i][0] for i in chosen]).to(device)
        second = torch.cat([self._latents[i][1] for i in chosen]).to(device)
        lc, ac = self.cfg.loss, trainer.alphas_cumprod
        noise = L.make_noise(first, g, lc.noise_offset, lc.noise_offset_random_strength,
                             lc.multires_noise_iterations, lc.multires_noise_discount).to(device)
        t = L.timesteps_for(first.shape[0], g, lc).to(device)
        cond = trainer.condition([self.pairs[i].caption for i in chosen])
        shift, change = difference_step(bundle, net, first, second, noise, t, cond, ac,
                                        trainer.prediction)
        kind = "l1" if lc.loss == "l1" else "mse"
        return L.elementwise_loss(shift, change, kind).mean()


def x0_scale(t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str,
             like: torch.Tensor) -> torch.Tensor:
    """c with x0 = (...) - c * output at a fixed input: sigma / sqrt(alpha_bar) for epsilon
    prediction, sigma for v, per sample, shaped to broadcast over `like`."""
    a = alphas_cumprod.to(like.device)[t].float().reshape(-1, *([1] * (like.dim() - 1)))
    sigma = (1 - a).sqrt()
    return sigma if prediction == "v" else sigma / a.sqrt()


def difference_step(bundle, net, first: torch.Tensor, second: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor, cond, alphas_cumprod: torch.Tensor, prediction: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the adapter's shift of the denoised estimate, the change): both members noised with the
    same noise and timestep, one batch; the frozen prediction (strength 0) on each is its
    baseline, and the adapter at strength 1 should move the x0 estimate by second - first.
    The adapter is left at strength 1."""
    from . import loss as L

    both = torch.cat([first, second])
    tt = torch.cat([t, t])
    x = L.noisy_latents(both, torch.cat([noise, noise]), tt, alphas_cumprod)
    cond2 = _cat_cond([cond, cond])
    net.set_multiplier(0.0)
    try:
        with torch.no_grad():
            frozen = bundle.denoise(x, tt, cond2).float()
    finally:
        net.set_multiplier(1.0)
    pred = bundle.denoise(x, tt, cond2).float()
    shift = -x0_scale(tt, alphas_cumprod, prediction, pred) * (pred - frozen)
    change = (second - first).float()
    return shift, torch.cat([change, change])


def _cat_cond(parts: list) -> Any:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def make_mode_data(cfg: RunConfig, arch: str):
    """The TrainingData of a mode, None for images (the captioned dataset)."""
    if cfg.mode.kind == "slider":
        return SliderData(cfg, arch)
    if cfg.mode.kind == "difference":
        return PairData(cfg, arch)
    return None

