"""Datasets: kohya folder layout, captions, aspect-ratio buckets, augmentation, regularization
images, latent cache and the dataset check (SPEC D1-D6)."""

from .buckets import BucketRules, Placement, apply_placement, make_buckets, plan_placement
from .cache import LatentCache, latent_key
from .captions import (CaptionRules, approx_token_count, chunk_caption, process_caption,
                       split_tags)
from .dataset import Batch, BatchPart, TrainData, check_dataset, share_of
from .images import IMAGE_EXTENSIONS, ImageReadError, load_image
from .report import PROBLEM_KINDS, DatasetReport
from .scan import Problem

__all__ = [
    "Batch", "BatchPart", "BucketRules", "CaptionRules", "DatasetReport", "IMAGE_EXTENSIONS", "ImageReadError",
    "LatentCache", "PROBLEM_KINDS", "Placement", "Problem", "TrainData", "apply_placement",
    "approx_token_count", "check_dataset", "chunk_caption", "latent_key", "load_image",
    "make_buckets", "plan_placement", "process_caption", "share_of", "split_tags",
]
