"""Validation images: which training images `data.validation_count` holds out, and how the
validation images are read.

The held-out images are picked by the seed and each image's name (folder/file), not by its
position in the scan, so adding or removing other images moves few of them. They are left out of
training entirely (epochs, repeats, `ss_num_train_images`, tag frequency), so a run with
validation_count N trains what a run on the dataset without those N images trains.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

from ..config import DataConfig
from ..errors import UserError
from .scan import ImageItem, ScanResult


def validation_view(cfg: DataConfig) -> DataConfig:
    """The data settings the validation images are read with: the validation folder (or the
    dataset, for held-out images), no regularization images, and nothing random - no tag
    shuffling or dropout, no flips, centre crops, no colour changes - so every measurement sees
    the same inputs. Latents are kept in memory (validation sets are small)."""
    return replace(cfg, dataset_dir=cfg.validation_dir or cfg.dataset_dir, reg_dir="",
                   shuffle_tags=False, caption_dropout=0.0, tag_dropout=0.0, flip=False,
                   crop="center", color_aug=False, cache_latents=True, cache_to_disk=False)


def held_out(items: list[ImageItem], count: int, seed: int) -> set[str]:
    """The paths of the `count` images held out: the first `count` by sha256(seed, folder/name)."""
    def rank(item: ImageItem) -> bytes:
        name = f"{int(seed)}|{item.folder}/{os.path.basename(item.path)}"
        return hashlib.sha256(name.encode("utf-8")).digest()

    return {item.path for item in sorted(items, key=rank)[:max(0, int(count))]}


def split_scan(scan: ScanResult, cfg: DataConfig, seed: int, split: str,
               require_images: bool = True) -> ScanResult:
    """The part of a dataset scan that `split` ("train" or "validation") reads. Validation
    images are read once each (repeats 1)."""
    if split == "validation" and cfg.validation_dir:
        def keep(item: ImageItem) -> bool:
            return True
        held: set[str] = set()
    elif cfg.validation_count > 0 and not cfg.validation_dir:
        items = scan.items
        if items and cfg.validation_count >= len(items):
            raise UserError("data.validation_count",
                            f"holding out {cfg.validation_count} of {len(items)} images leaves "
                            f"none to train on; give at most {len(items) - 1}")
        held = held_out(items, cfg.validation_count, seed)

        def keep(item: ImageItem) -> bool:
            return (item.path in held) == (split == "validation")
    else:
        if split == "validation":
            raise UserError("data.validation_count", "no validation images: set "
                                                     "data.validation_count or validation_dir")
        return scan
    once = split == "validation"
    folders = [replace(f, images=[replace(i, repeats=1) if once else i
                                  for i in f.images if keep(i)]) for f in scan.folders]
    notes = list(scan.notes)
    if held and split == "train":
        names = sorted(os.path.basename(p) for p in held)
        notes.append(f"{len(held)} image(s) held out for validation (not trained on): "
                     + ", ".join(names[:8]) + (", ..." if len(names) > 8 else ""))
    return ScanResult(folders, list(scan.problems), notes)
