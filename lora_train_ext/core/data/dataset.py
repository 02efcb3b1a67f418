"""TrainData: the dataset a run trains on, as bucketed batches in a seeded order.

One epoch holds every training image `repeats` times plus the regularization samples (balanced
to the same count, as kohya does), grouped by bucket so all images of a batch share a size.
Batch order, crops, flips, colour jitter and caption draws come from (seed, epoch, batch, slot)
only, so an epoch can be replayed or resumed in the middle with identical batches.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Generator

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig, parse_resolution
from ..errors import UserError
from .augment import color_jitter, mask_to_tensor, to_pil, to_tensor
from .buckets import BucketRules, Placement, apply_placement, plan_placement
from .cache import LatentCache, latent_key
from .captions import (CaptionRules, CountTokens, approx_token_count, process_caption,
                       tag_counts)
from .images import ImageReadError, file_sha256, load_image, load_mask, parse_color
from .report import DatasetReport
from .scan import ImageItem, Problem, ScanResult, scan_dataset
from .split import split_scan

TOO_SMALL_UPSCALE = 2.0  # images enlarged more than this to fill their bucket are reported

Progress = Callable[[int, int], None]  # (done, total)

# Stream ids keep the random draws of different purposes independent of each other.
_ORDER, _CAPTION, _AUGMENT, _FIXED_CROP, _REG_PICK = 11, 12, 13, 14, 15


@dataclass
class Batch:
    """One training batch; every sample has the same bucket size (H, W).

    images: (B, 3, H, W) float32 in [-1, 1], or None when latents are cached.
    latents: (B, C, H/8, W/8) as the encode function returned them (cast to the cache dtype),
        or None when not cached.
    loss_weight: (B,) float32, 1.0 or the prior loss weight for regularization samples.
    mask: (B, 1, H, W) float32 in [0, 1] (1 = train on this pixel) with masked loss, else None.
    sizes: per sample (orig_h, orig_w, crop_top, crop_left, target_h, target_w) for SDXL.
    keys: per sample a stable id (the image path) - with `captions` enough to key a text cache.
    """

    images: torch.Tensor | None
    latents: torch.Tensor | None
    captions: list[str]
    loss_weight: torch.Tensor
    mask: torch.Tensor | None
    sizes: list[tuple[int, int, int, int, int, int]]
    keys: list[str] = field(default_factory=list)
    is_reg: list[bool] = field(default_factory=list)
    part: BatchPart | None = None  # a sharded dataset (distributed run): which share this is

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    def empty(cls, part: BatchPart) -> "Batch":
        """A process's share of a global batch that holds no sample (a distributed run)."""
        return cls(None, None, [], torch.zeros(0), None, [], part=part)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        def move(t: torch.Tensor | None, cast: bool) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if cast and dtype is not None else t.dtype,
                        non_blocking=True)
        return Batch(move(self.images, True), move(self.latents, True), list(self.captions),
                     move(self.loss_weight, False), move(self.mask, False), list(self.sizes),
                     list(self.keys), list(self.is_reg), self.part)


@dataclass(frozen=True)
class BatchPart:
    """One process's share of a global batch (a distributed run, `TrainData.shard`).

    slots: the global batch's slot of each sample in this share (in order; a slot whose image
        could not be read is left out). size: the samples the global batch planned, every
        process's share together. bucket: (W, H) of its images.
    """

    slots: tuple[int, ...]
    size: int
    bucket: tuple[int, int]


def share_of(count: int, rank: int, world: int) -> tuple[int, int]:
    """Slots [lo, hi) of a global batch of `count` that process `rank` of `world` reads: a
    balanced split in rank order (the first count % world processes get one more)."""
    base, extra = divmod(count, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass
class _Sample:
    """Everything about one batch slot except the pixels."""
    item: int
    slot: int
    caption: str
    flip: bool
    placement: Placement


class TrainData:
    """The run's dataset, all the trainer asks of one (`bundle.TrainingData`) and more. Scans at
    construction; raises UserError for a missing folder or an empty dataset before any model work.

    count_tokens: counts a caption's tokens for the token limit (default: an approximation of
        CLIP's tokenizer, see captions.approx_token_count).
    workers: threads that decode and resize images (default min(4, CPUs)).
    require_images: False only for check_dataset, which reports an empty dataset instead.
    split: "train", the images trained on (without the ones `validation_count` holds out);
        "validation", the validation images: the held-out ones or those of `validation_dir`,
        each once, without random caption rules, flips, random crops or colour changes
        (`validation.validation_view`).
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, seed: int, arch: str = "sd1",
                 count_tokens: CountTokens | None = None, workers: int | None = None,
                 require_images: bool = True, split: str = "train"):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError("train.batch_size", f"{batch_size!r} is not valid; give 1 or more")
        if split not in ("train", "validation"):
            raise ValueError(f"split {split!r}: expected 'train' or 'validation'")
        self.split = split
        if split == "validation":
            from .split import validation_view

            cfg = validation_view(cfg)
        self.cfg = cfg
        self.batch_size = batch_size
        self.seed = int(seed)
        self.arch = arch
        self.count_tokens = count_tokens or approx_token_count
        self.workers = max(1, workers if workers is not None else min(4, os.cpu_count() or 1))
        self.background = parse_color(cfg.background)
        self.caption_rules = CaptionRules.from_config(cfg)
        self._reg_rules = replace(self.caption_rules, trigger_word="")
        if cfg.resize_mode not in ("crop", "stretch", "pad", "none"):
            raise UserError("data.resize_mode", f"{cfg.resize_mode!r} is not valid; choose one "
                            "of crop, stretch, pad, none")
        if not isinstance(cfg.repeats, int) or cfg.repeats < 1:
            raise UserError("data.repeats", f"{cfg.repeats!r} is not valid; give 1 or more")
        if cfg.bucket_step < 8 or cfg.bucket_step % 8:
            raise UserError("data.bucket_step", "must be a multiple of 8")
        self.bucket_rules = BucketRules(
            resolution=parse_resolution(cfg.resolution), min_side=cfg.min_bucket_side,
            max_side=max(cfg.max_bucket_side, cfg.min_bucket_side), step=cfg.bucket_step,
            enable=cfg.enable_buckets, no_upscale=cfg.no_upscale, mode=cfg.resize_mode)
        self._notes: list[str] = []
        self._problems: list[Problem] = []
        self._scan(require_images)
        self._plan_epoch()
        self._cache: LatentCache | None = None
        self._latent_keys: dict[tuple[int, bool], str] = {}
        self._fixed: dict[int, Placement] = {}
        self._masks: dict[tuple[int, bool], torch.Tensor] = {}
        self._broken: set[int] = set()
        self._encode: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._vae_id = ""
        self._cache_dtype: torch.dtype | None = None
        self._position = (0, 0)
        self._shard: tuple[int, int] | None = None
        self.report = self._build_report()

    # -- scanning -------------------------------------------------------------------------------
    def _scan(self, require_images: bool) -> None:
        cfg = self.cfg
        if not cfg.dataset_dir or not os.path.isdir(cfg.dataset_dir):
            raise UserError("data.dataset_dir",
                            f"folder not found: {cfg.dataset_dir!r}" if cfg.dataset_dir else
                            "no dataset folder given")
        if cfg.reg_dir and not os.path.isdir(cfg.reg_dir):
            raise UserError("data.reg_dir", f"folder not found: {cfg.reg_dir!r}")
        if cfg.mask_dir and cfg.masked_loss and not os.path.isdir(cfg.mask_dir):
            raise UserError("data.mask_dir", f"folder not found: {cfg.mask_dir!r}")
        common = dict(caption_extension=cfg.caption_extension,
                      default_caption=cfg.default_caption, trigger_word=cfg.trigger_word,
                      mask_dir=cfg.mask_dir, want_masks=cfg.masked_loss, workers=self.workers)
        self.train_scan: ScanResult = split_scan(
            scan_dataset(cfg.dataset_dir, repeats=cfg.repeats, **common), cfg, self.seed,
            self.split, require_images)
        self.reg_scan: ScanResult | None = None
        if cfg.reg_dir:
            self.reg_scan = scan_dataset(cfg.reg_dir, repeats=1, is_reg=True, **common)
        self._problems += self.train_scan.problems
        self._notes += self.train_scan.notes
        if self.reg_scan:
            self._problems += self.reg_scan.problems
            self._notes += self.reg_scan.notes
        self.items: list[ImageItem] = self.train_scan.items + (
            self.reg_scan.items if self.reg_scan else [])
        if require_images and not self.train_scan.items and self.split == "validation":
            raise UserError("data.validation_dir", f"no readable images (png, jpg, jpeg, webp, "
                                                   f"bmp) in {cfg.dataset_dir}")
        if require_images and not self.train_scan.items:
            hint = ""
            bad = [p for p in self.train_scan.problems
                   if p.kind in ("bad_repeat_folder", "unreadable")]
            if bad:
                hint = "; " + "; ".join(f"{p.path}: {p.detail}" for p in bad[:3])
            raise UserError("data.dataset_dir",
                            f"no readable images (png, jpg, jpeg, webp, bmp) in "
                            f"{cfg.dataset_dir}{hint}")
        buckets = self.bucket_rules.buckets()
        self.buckets_of: list[tuple[int, int]] = []
        for item in self.items:
            bucket = self.bucket_rules.bucket_for((item.width, item.height), buckets)
            self.buckets_of.append(bucket)
            base = plan_placement((item.width, item.height), bucket, cfg.resize_mode)
            if base.scale > TOO_SMALL_UPSCALE:
                self._problems.append(Problem(
                    item.path, "too_small",
                    f"{item.width}x{item.height} is enlarged {base.scale:.1f}x to its bucket "
                    f"{bucket[0]}x{bucket[1]}; it will look soft (use a bigger image, or "
                    f"no_upscale)"))
            full = process_caption(item.caption, replace(
                self._rules_for(item), shuffle=False, caption_dropout=0.0, tag_dropout=0.0,
                max_tokens=0), None, self.count_tokens)
            tokens = self.count_tokens(full)
            if tokens > self.caption_rules.max_tokens:
                self._problems.append(Problem(
                    item.path, "long_caption",
                    f"about {tokens} tokens, over the limit of {self.caption_rules.max_tokens}; "
                    f"trailing tags are dropped"))
            if cfg.masked_loss and item.mask_path is None and not item.has_alpha:
                self._problems.append(Problem(item.path, "missing_mask",
                                              "no mask file and no alpha channel"))

    # -- epoch plan -----------------------------------------------------------------------------
    def _plan_epoch(self) -> None:
        """Per-item repeats for one epoch (fixed for the whole run) and the entries per bucket."""
        n_train = len(self.train_scan.items)
        repeats = [item.repeats for item in self.train_scan.items]
        train_total = sum(repeats)
        reg_items = list(range(n_train, len(self.items)))
        reg_repeats = self._balance_reg(reg_items, train_total)
        self._repeats = repeats + reg_repeats
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for idx, n in enumerate(self._repeats):
            if n > 0:
                by_bucket.setdefault(self.buckets_of[idx], []).extend([idx] * n)
        self._bucket_entries = {b: np.asarray(v, dtype=np.int64)
                                for b, v in sorted(by_bucket.items())}
        self.repeats_total = train_total
        self.reg_repeats_total = sum(reg_repeats)
        self.steps_per_epoch = sum(-(-len(v) // self.batch_size)
                                   for v in self._bucket_entries.values())
        samples = sum(len(v) for v in self._bucket_entries.values())
        full = -(-samples // self.batch_size)
        if self.batch_size > 1 and self.steps_per_epoch > full * 1.25:
            self._notes.append(
                f"{len(self._bucket_entries)} buckets for {samples} samples per epoch: "
                f"{self.steps_per_epoch - full} more batches than with one size, many of them "
                f"smaller than batch size {self.batch_size}")
        res_w, res_h = self.bucket_rules.resolution
        if self.arch == "sdxl" and res_w * res_h < 768 * 768:
            self._notes.append(f"SDXL trains best at about 1024x1024; resolution is "
                               f"{res_w}x{res_h}")

    def _balance_reg(self, reg_items: list[int], train_total: int) -> list[int]:
        """kohya's balance: regularization samples per epoch = training samples per epoch.
        Each reg image first gets its folder's repeats; if that is short of the target, one more
        repeat is added to each in turn; if it is over, a seeded subset (fixed for the run) is
        used."""
        if not reg_items or train_total == 0:
            return [0] * len(reg_items)
        counts = [self.items[i].repeats for i in reg_items]
        total = sum(counts)
        if total < train_total:
            k = 0
            while total < train_total:
                counts[k % len(counts)] += 1
                total += 1
                k += 1
        elif total > train_total:
            rng = np.random.default_rng([self.seed, _REG_PICK])
            slots = np.repeat(np.arange(len(reg_items)), counts)
            chosen = rng.choice(len(slots), size=train_total, replace=False)
            counts = np.bincount(slots[chosen], minlength=len(reg_items)).tolist()
            unused = sum(1 for c in counts if c == 0)
            if unused:
                self._notes.append(f"{unused} regularization image(s) are not used: there are "
                                   f"more than training samples per epoch ({train_total})")
        return [int(c) for c in counts]

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The item indices of every batch of `epoch`, in order; len == steps_per_epoch."""
        rng = np.random.default_rng([self.seed, int(epoch), _ORDER])
        batches: list[np.ndarray] = []
        for entries in self._bucket_entries.values():
            order = entries[rng.permutation(len(entries))]
            batches += [order[i:i + self.batch_size] for i in range(0, len(order),
                                                                    self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def shard(self, rank: int, world: int) -> None:
        """Read only process `rank`'s share of every global batch (a distributed run of `world`
        processes; `batch_size` is then the global batch). Every process plans the same epochs
        (same seed) and takes its slots (`share_of`); samples keep their global slot, so crops,
        flips and captions are those one process would draw. Every global batch is yielded, as
        a Batch whose `part` says which share it is, with no sample where the share is empty
        (the last batch of a bucket) or unreadable: the processes stay in step."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world}")
        self._shard = (int(rank), int(world))

    # -- contract -------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return len(self.train_scan.items)

    @property
    def latents_cached(self) -> bool:
        return self._cache is not None

    @property
    def captions_are_random(self) -> bool:
        """True when captions change between draws (shuffle / dropout): a text-encoder output
        cache would go stale, so the trainer encodes every batch."""
        return self.caption_rules.is_random

    def fixed_captions(self) -> dict[str, str]:
        """item key (path) -> caption, when captions are not random: what a text-encoder cache
        needs to precompute. Raises if captions are random."""
        if self.captions_are_random:
            raise ValueError("captions are random (shuffle or dropout); they cannot be cached")
        return {item.path: self._caption(i, None) for i, item in enumerate(self.items)
                if self._repeats[i] > 0}

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """folder key -> tag -> number of training images whose caption has it (ss_tag_frequency).
        Captions as trained without the random rules: trigger, prefix, caption, suffix."""
        out: dict[str, dict[str, int]] = {}
        for folder in self.train_scan.folders:
            if folder.images:
                out[folder.key] = tag_counts([self._caption_of(item, None)
                                              for item in folder.images])
        return out

    def dataset_dirs_meta(self) -> dict[str, dict[str, int]]:
        """folder key -> {"n_repeats", "img_count"} (ss_dataset_dirs)."""
        return {f.key: {"n_repeats": f.repeats, "img_count": len(f.images)}
                for f in self.train_scan.folders if f.images}

    def reg_dataset_dirs_meta(self) -> dict[str, dict[str, int]]:
        """Same for the regularization folder(s) (ss_reg_dataset_dirs)."""
        if not self.reg_scan:
            return {}
        return {f.key: {"n_repeats": f.repeats, "img_count": len(f.images)}
                for f in self.reg_scan.folders if f.images}

    def state_dict(self) -> dict:
        """Where the data order stands: `batch_index` batches of `epoch` have been handed out.
        Resume with `batches(state["epoch"], start=state["batch_index"])`; the order itself
        needs nothing saved, it follows from (seed, epoch). The fingerprint (paths, repeats,
        buckets) tells load_state_dict whether the dataset changed meanwhile."""
        epoch, index = self._position
        return {"epoch": epoch, "batch_index": index, "seed": self.seed,
                "steps_per_epoch": self.steps_per_epoch, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Check the snapshot against this dataset (a changed dataset or seed is a note in
        `report`) and restore the position. It does not make batches() skip anything: the
        caller passes start= (or skips batches itself), so a position is never skipped twice."""
        epoch, index = int(state.get("epoch", 0)), int(state.get("batch_index", 0))
        if state.get("fingerprint") not in (None, self._fingerprint()):
            self._notes.append("the dataset changed since the snapshot: the resumed data order "
                               "is not the one the run started with")
            self.report.notes = list(self._notes)
        if int(state.get("seed", self.seed)) != self.seed:
            self._notes.append("the seed changed since the snapshot: the data order differs")
            self.report.notes = list(self._notes)
        self._position = (epoch, min(index, self.steps_per_epoch))

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for item, n, bucket in zip(self.items, self._repeats, self.buckets_of):
            h.update(f"{item.path}|{n}|{bucket}|{item.width}x{item.height}\n".encode())
        return h.hexdigest()[:16]

    # -- captions and placements ----------------------------------------------------------------
    def _rules_for(self, item: ImageItem) -> CaptionRules:
        """Regularization images never get the trigger word: they show the class without the
        subject (prior preservation); prefix, suffix and the random rules still apply."""
        return self._reg_rules if item.is_reg else self.caption_rules

    def _caption_of(self, item: ImageItem, rng: np.random.Generator | None) -> str:
        return process_caption(item.caption, self._rules_for(item), rng, self.count_tokens)

    def _caption(self, idx: int, rng: np.random.Generator | None) -> str:
        return self._caption_of(self.items[idx], rng)

    def _fixed_placement(self, idx: int) -> Placement:
        """The placement used for cached latents: center crop, or a random crop drawn once per
        image from the seed (applied before caching)."""
        if idx not in self._fixed:
            item = self.items[idx]
            fraction = (0.5, 0.5)
            if self.cfg.crop == "random":  # keyed by name: adding an image moves no crop
                name = f"{item.folder}/{os.path.basename(item.path)}".encode("utf-8")
                name_id = int.from_bytes(hashlib.sha256(name).digest()[:8], "little")
                fraction = tuple(np.random.default_rng([self.seed, name_id, _FIXED_CROP])
                                 .random(2).tolist())
            self._fixed[idx] = plan_placement((item.width, item.height), self.buckets_of[idx],
                                              self.cfg.resize_mode, fraction)
        return self._fixed[idx]

    def _sample(self, epoch: int, batch_index: int, slot: int, idx: int) -> _Sample:
        caption_rng = np.random.default_rng([self.seed, epoch, batch_index, slot, _CAPTION])
        caption = self._caption(idx, caption_rng)
        aug = np.random.default_rng([self.seed, epoch, batch_index, slot, _AUGMENT])
        flip = bool(self.cfg.flip) and bool(aug.random() < 0.5)
        if self.latents_cached:
            placement = self._fixed_placement(idx)
        else:
            item = self.items[idx]
            fraction = tuple(aug.random(2).tolist()) if self.cfg.crop == "random" else (0.5, 0.5)
            placement = plan_placement((item.width, item.height), self.buckets_of[idx],
                                       self.cfg.resize_mode, fraction)
        return _Sample(idx, slot, caption, flip, placement)

    # -- pixels ---------------------------------------------------------------------------------
    def _pixels(self, idx: int, placement: Placement, flip: bool,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(3, H, W) in [-1, 1] and the (1, H, W) mask (or None) for one item."""
        item = self.items[idx]
        reduce_to = placement.resized if placement.resized != placement.original else None
        img, alpha = load_image(item.path, self.background, expect_size=placement.original,
                                reduce_to=reduce_to)
        out = apply_placement(img, placement, self.background)
        mask_img = None
        if self.cfg.masked_loss:
            if item.mask_path:
                source = load_mask(item.mask_path, img.size)
            elif alpha is not None:
                source = alpha
            else:
                source = Image.new("L", img.size, 255)
            mask_img = apply_placement(source, placement, 0, resample=Image.BILINEAR)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
            if mask_img is not None:
                mask_img = mask_img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(out), (mask_to_tensor(mask_img) if mask_img is not None else None)

    def _mark_broken(self, idx: int, error: Exception) -> None:
        if idx not in self._broken:
            self._broken.add(idx)
            problem = Problem(self.items[idx].path, "unreadable", f"skipped during the run: "
                              f"{error}")
            self._problems.append(problem)
            self.report.problems.append(problem)

    def _make_batch(self, epoch: int, batch_index: int, entries: np.ndarray) -> Batch | None:
        lo, hi = (0, len(entries)) if self._shard is None else share_of(len(entries),
                                                                         *self._shard)
        samples = [self._sample(epoch, batch_index, slot, int(entries[slot]))
                   for slot in range(lo, hi)]
        samples = [s for s in samples if s.item not in self._broken]
        images, latents, masks, kept = [], [], [], []
        for s in samples:
            if self.latents_cached:
                try:
                    latent, mask = self._cached(s)
                except (ImageReadError, OSError) as e:
                    self._mark_broken(s.item, e)
                    continue
                latents.append(latent)
                if mask is not None:
                    masks.append(mask)
            else:
                try:
                    pixels, mask = self._pixels(s.item, s.placement, s.flip)
                except (ImageReadError, OSError) as e:
                    self._mark_broken(s.item, e)
                    continue
                if self.cfg.color_aug:
                    aug = np.random.default_rng([self.seed, epoch, batch_index, s.slot,
                                                 _AUGMENT + 100])
                    pixels = color_jitter(pixels, aug)
                images.append(pixels)
                if mask is not None:
                    masks.append(mask)
            kept.append(s)
        part = None
        if self._shard is not None:
            part = BatchPart(tuple(s.slot for s in kept), len(entries),
                             self.buckets_of[int(entries[0])])
        if not kept:
            return None if part is None else Batch.empty(part)
        prior = float(self.cfg.prior_loss_weight)
        return Batch(
            images=torch.stack(images) if images else None,
            latents=torch.stack(latents) if latents else None,
            captions=[s.caption for s in kept],
            loss_weight=torch.tensor([prior if self.items[s.item].is_reg else 1.0
                                      for s in kept], dtype=torch.float32),
            mask=torch.stack(masks) if masks else None,
            sizes=[s.placement.sdxl_size(s.flip) for s in kept],
            keys=[self.items[s.item].path for s in kept],
            is_reg=[self.items[s.item].is_reg for s in kept], part=part)

    def batches(self, epoch: int, start: int = 0) -> Generator[Batch, None, None]:
        """The batches of `epoch` in their seeded order, from batch index `start` (resume:
        start=state["batch_index"]; skipped batches cost nothing, no image is loaded for them).
        Images that fail to load are left out of their batch with an `unreadable` problem in
        `report`; a batch left empty that way is not yielded."""
        plan = self.epoch_plan(epoch)
        start = max(0, int(start))
        if self.latents_cached or self.workers <= 1:
            for b in range(start, len(plan)):
                batch = self._make_batch(epoch, b, plan[b])
                self._position = (epoch, b + 1)
                if batch is not None:
                    yield batch
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="lora-data") as pool:
            ahead = min(len(plan), start + self.workers)
            futures = {b: pool.submit(self._make_batch, epoch, b, plan[b])
                       for b in range(start, ahead)}
            for b in range(start, len(plan)):
                batch = futures.pop(b).result()
                if ahead < len(plan):
                    futures[ahead] = pool.submit(self._make_batch, epoch, ahead, plan[ahead])
                    ahead += 1
                self._position = (epoch, b + 1)
                if batch is not None:
                    yield batch
            for f in futures.values():
                f.cancel()

    # -- latent cache ---------------------------------------------------------------------------
    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], vae_id: str,
                      progress: Progress | None = None, *, encode_batch_size: int | None = None,
                      dtype: torch.dtype | None = None) -> None:
        """Encode every used image once (both flips when flip is on) and serve latents from then
        on. encode: (B, 3, H, W) float32 in [-1, 1] -> (B, C, H/8, W/8). vae_id names the VAE
        (e.g. its file hash) so a different VAE never reuses entries. progress(done, total) is
        called after each encoded chunk (entries found in the cache count as done at once).
        dtype: store latents in this dtype (default: as encode returns them)."""
        cfg = self.cfg
        directory = None
        if cfg.cache_to_disk:
            directory = cfg.cache_dir or os.path.join(cfg.dataset_dir, ".latent_cache")
        self._cache = cache = LatentCache(directory)
        self._encode, self._vae_id, self._cache_dtype = encode, str(vae_id), dtype
        self._fixed.clear()
        self._masks.clear()
        used = [i for i, n in enumerate(self._repeats) if n > 0 and i not in self._broken]
        flips = (False, True) if cfg.flip else (False,)
        tasks = [(i, f) for i in used for f in flips]
        total = len(tasks)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="lora-hash") as pool:
            hashes = dict(zip(used, pool.map(self._hash_or_none, used)))
        keys: dict[tuple[int, bool], str] = {}
        for i, f in tasks:
            if hashes[i] is None:
                continue
            keys[(i, f)] = self._key(i, hashes[i], f)
        todo = [t for t in tasks if t in keys and (keys[t] not in cache or cfg.masked_loss)]
        done = total - len(todo)
        if progress:
            progress(done, total)
        per_process = self.batch_size if self._shard is None else \
            -(-self.batch_size // self._shard[1])  # a process's share of a global batch
        chunk = max(1, encode_batch_size or per_process)
        groups: dict[tuple[int, int], list[tuple[int, bool]]] = {}
        for t in todo:
            groups.setdefault(self.buckets_of[t[0]], []).append(t)
        chunks = [group[k:k + chunk] for group in groups.values()
                  for k in range(0, len(group), chunk)]
        # Decoding runs `ahead` chunks in front of the encoder, so a fast (GPU) VAE is not
        # left waiting for Pillow, and a slow one does not leave the loaders idle.
        ahead = 2
        with ThreadPoolExecutor(self.workers, thread_name_prefix="lora-cache") as pool:
            pending = [[pool.submit(self._load_for_cache, t) for t in part]
                       for part in chunks[:ahead]]
            for k, part in enumerate(chunks):
                futures = pending.pop(0)
                if k + ahead < len(chunks):
                    pending.append([pool.submit(self._load_for_cache, t)
                                    for t in chunks[k + ahead]])
                encode_rows, encode_keys = [], []
                for (i, f), future in zip(part, futures):
                    result = future.result()
                    if isinstance(result, Exception):
                        self._mark_broken(i, result)
                        continue
                    pixels, mask = result
                    if cfg.masked_loss:
                        self._store_mask((i, f), mask, self.buckets_of[i])
                    if keys[(i, f)] not in cache:
                        encode_rows.append(pixels)
                        encode_keys.append(keys[(i, f)])
                if encode_rows:
                    self._encode_rows(encode_rows, encode_keys)
                done += len(part)
                if progress:
                    progress(done, total)
        self._latent_keys = {t: k for t, k in keys.items() if t[0] not in self._broken}
        for i in [i for i in used if hashes[i] is None]:
            self._mark_broken(i, RuntimeError("cannot read the file"))
        for note in self._cache_notes():
            if note not in self._notes:
                self._notes.append(note)
        self.report.notes = list(self._notes)

    def _cached(self, s: _Sample) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cached latent (and mask) of a sample; an entry that went missing (a cache file
        deleted mid-run) is encoded again rather than dropped."""
        task = (s.item, s.flip)
        key = self._latent_keys.get(task)
        latent = self._cache.get(key) if key is not None else None
        mask = self._masks.get(task)
        if latent is None or (self.cfg.masked_loss and mask is None):
            pixels, pixel_mask = self._pixels(s.item, s.placement, s.flip)
            if key is None:
                key = self._key(s.item, file_sha256(self.items[s.item].path), s.flip)
                self._latent_keys[task] = key
            if latent is None:
                latent = self._encode_rows([pixels], [key])[0]
            if self.cfg.masked_loss:
                mask = self._store_mask(task, pixel_mask, s.placement.bucket)
        return latent, (mask.float().div(255.0) if mask is not None else None)

    def _store_mask(self, task: tuple[int, bool], mask: torch.Tensor | None,
                    bucket: tuple[int, int]) -> torch.Tensor:
        """Masks of cached samples stay in memory as uint8 (1, H, W): 1 byte per pixel."""
        stored = (mask if mask is not None else torch.ones(1, bucket[1], bucket[0]))
        stored = stored.mul(255).round().to(torch.uint8)
        self._masks[task] = stored
        return stored

    def _encode_rows(self, rows: list[torch.Tensor], keys: list[str]) -> list[torch.Tensor]:
        with torch.no_grad():
            out = self._encode(torch.stack(rows))
        if self._cache_dtype is not None:
            out = out.to(self._cache_dtype)
        latents = [latent.detach().to("cpu").clone() for latent in out]
        for key, latent in zip(keys, latents):
            self._cache.put(key, latent)
        return latents

    def _cache_notes(self) -> list[str]:
        cfg = self.cfg
        notes = []
        if cfg.crop == "random" and cfg.resize_mode in ("crop", "none"):
            notes.append("latents are cached: each image's random crop is drawn once (from the "
                         "seed) before caching, not every epoch")
        if cfg.flip:
            notes.append("latents are cached: flip is applied before caching (both the image "
                         "and its mirror are cached, one is picked per step)")
        if cfg.color_aug:
            notes.append("latents are cached: colour augmentation is off (it cannot be applied "
                         "to latents); turn caching off to use it")
        return notes

    def _key(self, idx: int, sha256: str, flip: bool) -> str:
        """The background colour shows only through transparency and padding, so it is part
        of the key only then (changing it does not re-encode opaque images)."""
        bg = self.background if self.items[idx].has_alpha or self.cfg.resize_mode == "pad" \
            else ""
        return latent_key(sha256, self._vae_id, self._fixed_placement(idx).signature(), flip, bg)

    def _hash_or_none(self, idx: int) -> str | None:
        try:
            return file_sha256(self.items[idx].path)
        except OSError:
            return None

    def _load_for_cache(self, task: tuple[int, bool]):
        idx, flip = task
        try:
            return self._pixels(idx, self._fixed_placement(idx), flip)
        except (ImageReadError, OSError) as e:
            return e

    @property
    def cache(self) -> LatentCache | None:
        return self._cache

    # -- report and preview ---------------------------------------------------------------------
    def _build_report(self) -> DatasetReport:
        cfg = self.cfg
        n_train = len(self.train_scan.items)
        buckets: dict[str, int] = {}
        reg_buckets: dict[str, int] = {}
        for idx, bucket in enumerate(self.buckets_of):
            target = buckets if idx < n_train else reg_buckets
            name = f"{bucket[0]}x{bucket[1]}"
            target[name] = target.get(name, 0) + 1
        order = lambda d: dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))  # noqa: E731
        if self.latents_cached or cfg.cache_latents:
            for note in self._cache_notes():
                if note not in self._notes:
                    self._notes.append(note)
        report = DatasetReport(
            dataset_dir=os.path.abspath(cfg.dataset_dir), images=n_train,
            repeats_total=self.repeats_total, buckets=order(buckets),
            problems=list(self._problems), steps_per_epoch=self.steps_per_epoch,
            batch_size=self.batch_size, folders=self.dataset_dirs_meta(),
            reg_dir=os.path.abspath(cfg.reg_dir) if cfg.reg_dir else "",
            reg_images=len(self.items) - n_train, reg_repeats_total=self.reg_repeats_total,
            reg_buckets=order(reg_buckets), notes=list(self._notes))
        report.sort_problems()
        return report

    def preview(self, count: int = 4, epoch: int = 0) -> list[tuple[Image.Image, str]]:
        """The first `count` samples of `epoch` as the model sees them (bucketed, cropped,
        flipped, jittered) with their captions - for the tab's dataset panel. Decodes images
        even when latents are cached."""
        out: list[tuple[Image.Image, str]] = []
        for b, entries in enumerate(self.epoch_plan(epoch)):
            for slot, idx in enumerate(entries):
                s = self._sample(epoch, b, slot, int(idx))
                try:
                    pixels, _ = self._pixels(s.item, s.placement, s.flip)
                except (ImageReadError, OSError):
                    continue
                out.append((to_pil(pixels), s.caption))
                if len(out) >= count:
                    return out
        return out


def check_dataset(cfg: DataConfig, batch_size: int = 1, *, seed: int = 0,
                  count_tokens: CountTokens | None = None) -> DatasetReport:
    """Scan and report without training. Raises UserError only for a missing folder or a bad
    setting; an empty dataset is a report with images == 0 (and `ok` False)."""
    data = TrainData(cfg, batch_size=batch_size, seed=seed, count_tokens=count_tokens,
                     require_images=False)
    return data.report
