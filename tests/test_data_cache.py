"""Latent cache: every key part causes a miss, nothing else does; disk writes are atomic."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lora_train_ext.core.config import DataConfig
from lora_train_ext.core.data import LatentCache, TrainData, latent_key


class CountingEncoder:
    """(B, 3, H, W) -> (B, 4, H/8, W/8), counting how many images it encoded."""

    def __init__(self):
        self.images = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled[:, :1] * 0.5], dim=1)


def _write(path, size, seed, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 4), np.uint8)
    if mode == "RGBA":
        arr[: h // 2, :, 3] = 0
        arr[h // 2:, :, 3] = 255
        Image.fromarray(arr, "RGBA").save(path)
    else:
        Image.fromarray(arr[..., :3], "RGB").save(path)


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "img"
    _write(root / "2_a" / "wide.png", (120, 64), 1)
    _write(root / "2_a" / "tall.png", (64, 120), 2)
    _write(root / "2_a" / "square.png", (80, 80), 3)
    _write(root / "2_a" / "alpha.png", (96, 64), 4, mode="RGBA")
    return root


def make_cfg(root, tmp_path, **kw):
    base = dict(dataset_dir=str(root), resolution="64", min_bucket_side=32, max_bucket_side=128,
                bucket_step=32, cache_to_disk=True, cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return DataConfig(**base)


def build(cfg, vae_id="vae-1", seed=0):
    enc = CountingEncoder()
    data = TrainData(cfg, batch_size=2, seed=seed, workers=2)
    data.cache_latents(enc, vae_id)
    return data, enc.images


N = 4


def test_second_build_hits_everything(dataset, tmp_path):
    cfg = make_cfg(dataset, tmp_path)
    first, n1 = build(cfg)
    second, n2 = build(cfg)
    assert (n1, n2) == (N, 0)
    a = [b.latents for b in first.batches(0)]
    b = [b.latents for b in second.batches(0)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("change, misses", [
    ("nothing", 0),
    ("vae", N),
    ("resolution", N),
    ("resize_mode", N),
    ("crop", "moved"),      # random crop moves the window of images with an overhang
    ("flip", N),            # mirrored latents are new entries, unflipped ones hit
    ("background", 1),      # only the transparent image shows the background
    ("image_bytes", 1),
    ("image_size", 1),
    ("seed_with_random_crop", "moved"),
    ("seed_center_crop", 0),
    ("captions", 0),
])
def test_every_key_change_misses(dataset, tmp_path, change, misses):
    cfg = make_cfg(dataset, tmp_path, crop="random" if change == "seed_with_random_crop"
                   else "center")
    before, first = build(cfg)
    assert first == N
    vae, seed = "vae-1", 0
    if change == "vae":
        vae = "vae-2"
    elif change == "resolution":
        cfg.resolution = "96"
    elif change == "resize_mode":
        cfg.resize_mode = "stretch"
    elif change == "crop":
        cfg.crop = "random"
    elif change == "flip":
        cfg.flip = True
    elif change == "background":
        cfg.background = "#000000"
    elif change == "image_bytes":
        _write(dataset / "2_a" / "square.png", (80, 80), 99)
    elif change == "image_size":
        _write(dataset / "2_a" / "square.png", (88, 80), 3)
    elif change in ("seed_with_random_crop", "seed_center_crop"):
        seed = 1
    elif change == "captions":
        (dataset / "2_a" / "square.txt").write_text("new caption")
    after, again = build(cfg, vae, seed)
    if misses == "moved":  # exactly the images whose crop window moved (3 have an overhang)
        windows = lambda d: [d._fixed_placement(i).crop for i in range(N)]  # noqa: E731
        misses = sum(a != b for a, b in zip(windows(before), windows(after)))
        assert misses >= 1
    assert again == misses


def test_memory_cache_is_per_object(dataset, tmp_path):
    cfg = make_cfg(dataset, tmp_path, cache_to_disk=False)
    data, n1 = build(cfg)
    _, n2 = build(cfg)
    assert (n1, n2) == (N, N)
    assert data.cache.directory is None and len(data.cache) == N
    assert not (tmp_path / "cache").exists()


def test_disk_entries_are_complete_safetensors(dataset, tmp_path):
    data, _ = build(make_cfg(dataset, tmp_path, flip=True))
    files = [os.path.join(b, n) for b, _, ns in os.walk(tmp_path / "cache") for n in ns]
    assert len(files) == 2 * N and all(f.endswith(".safetensors") for f in files)
    assert len(data.cache) == 2 * N


def test_corrupt_entry_is_a_miss(dataset, tmp_path):
    cfg = make_cfg(dataset, tmp_path)
    build(cfg)
    files = sorted(os.path.join(b, n) for b, _, ns in os.walk(tmp_path / "cache") for n in ns)
    with open(files[0], "r+b") as f:
        f.truncate(os.path.getsize(files[0]) // 2)
    _, again = build(cfg)
    assert again == 1


def test_entry_deleted_mid_run_is_encoded_again(dataset, tmp_path):
    cfg = make_cfg(dataset, tmp_path)
    enc = CountingEncoder()
    data = TrainData(cfg, batch_size=2, seed=0)
    data.cache_latents(enc, "v")
    for base, _, names in os.walk(tmp_path / "cache"):
        for name in names:
            os.remove(os.path.join(base, name))
    batches = list(data.batches(0))
    assert sum(len(b) for b in batches) == 2 * N
    assert enc.images == 2 * N
    assert not any(p.kind == "unreadable" for p in data.report.problems)


def test_progress_and_dtype(dataset, tmp_path):
    calls = []
    data = TrainData(make_cfg(dataset, tmp_path, cache_to_disk=False, flip=True), batch_size=3,
                     seed=0)
    data.cache_latents(CountingEncoder(), "v", lambda done, total: calls.append((done, total)),
                       dtype=torch.float16)
    assert calls[0] == (0, 2 * N) and calls[-1] == (2 * N, 2 * N)
    assert all(a <= b for (a, _), (b, _) in zip(calls, calls[1:]))
    batch = next(iter(data.batches(0)))
    assert batch.latents.dtype == torch.float16 and batch.images is None
    assert any("flip" in note for note in data.report.notes)


def test_latent_cache_unit(tmp_path):
    key = latent_key("ab" * 32, "vae", "sig", False)
    assert key != latent_key("ab" * 32, "vae", "sig", True)
    assert key != latent_key("ab" * 32, "vae2", "sig", False)
    cache = LatentCache(str(tmp_path))
    assert cache.get(key) is None and key not in cache
    cache.put(key, torch.arange(8.0).view(2, 2, 2))
    assert key in cache and torch.equal(cache.get(key), torch.arange(8.0).view(2, 2, 2))
    assert not [n for _, _, ns in os.walk(tmp_path) for n in ns if ".tmp" in n]
    assert cache.prune({key}) == 0 and cache.prune(set()) == 1 and key not in cache
