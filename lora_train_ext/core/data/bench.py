"""Latent-cache build speed and size, for the closing notes and for tuning.

    python -m lora_train_ext.core.data.bench [--vae] [--repeat 3]

Writes generated photos-like JPEG / PNG images to a temporary folder, builds the cache with a
stand-in encoder that returns a VAE's output shape (B, 4, H/8, W/8) fp32 - so the figure is the
data pipeline's own cost: decode, orient, resize, crop, hash, store - and reports images/s (best
of --repeat runs: the fairest figure on a shared machine) and bytes per cached latent in memory
and on disk. --vae also encodes a few images with the real-size SD1 VAE (random weights; the
speed does not depend on them) on the CPU, when lora_train_ext.core.models provides build_vae.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from . import scan
from .dataset import TrainData


def stand_in_encode(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 4, H/8, W/8) float32, at negligible cost."""
    pooled = torch.nn.functional.avg_pool2d(x, 8)
    return torch.cat([pooled, pooled[:, :1]], dim=1)


def write_images(folder: str, count: int, size: tuple[int, int], ext: str) -> None:
    os.makedirs(folder, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(count):
        base = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256, (xx + yy) % 256], -1)
        noise = np.random.default_rng(i).normal(0, 20, base.shape)
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"{i}.{ext}"), quality=92)


def measure(resolution: int, source: tuple[int, int], count: int, ext: str = "jpg",
            disk: bool = False, encode=stand_in_encode, repeat: int = 3,
            batch_size: int = 4) -> dict:
    tmp = tempfile.mkdtemp(prefix="lora-bench-")
    try:
        write_images(os.path.join(tmp, "data", "1_x"), count, source, ext)
        best_scan = best_build = float("inf")
        per_latent = 0.0
        for run in range(repeat):
            cfg = DataConfig(dataset_dir=os.path.join(tmp, "data"), resolution=str(resolution),
                             max_bucket_side=max(1024, 2 * resolution), cache_to_disk=disk,
                             cache_dir=os.path.join(tmp, f"cache{run}"))
            scan._INSPECTED.clear()  # time a cold scan, not the per-process inspection cache
            t0 = time.perf_counter()
            data = TrainData(cfg, batch_size=batch_size, seed=0)
            t1 = time.perf_counter()
            data.cache_latents(encode, "bench")
            t2 = time.perf_counter()
            best_scan, best_build = min(best_scan, t1 - t0), min(best_build, t2 - t1)
            per_latent = data.cache.nbytes() / max(1, len(data.cache))
        return {"resolution": resolution, "source": f"{source[0]}x{source[1]} {ext}",
                "images": count, "store": "disk" if disk else "memory",
                "scan_images_per_s": count / best_scan, "cache_images_per_s": count / best_build,
                "bytes_per_latent": per_latent}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _print(row: dict, label: str) -> None:
    speed = row["cache_images_per_s"]
    build = f"{speed:7.2f} img/s" if speed >= 1 else f"{1 / speed:6.1f} s/img"
    print(f"{label:9s} {row['resolution']:5d} {row['source']:>15s} n={row['images']:<3d} "
          f"{row['store']:6s} scan {row['scan_images_per_s']:7.1f} img/s   cache build "
          f"{build}   {row['bytes_per_latent']:9.0f} B/latent   (load avg "
          f"{os.getloadavg()[0]:.1f})", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", action="store_true", help="also time the real-size SD1 VAE")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--vae-only", action="store_true", help="only the SD1 VAE rows")
    args = parser.parse_args(argv)
    print(f"CPU threads: {os.cpu_count()}, torch threads: {torch.get_num_threads()}")
    for disk in (False, True) if not args.vae_only else ():
        _print(measure(512, (768, 768), 48, disk=disk, repeat=args.repeat), "stand-in")
        _print(measure(1024, (1536, 1536), 24, disk=disk, repeat=args.repeat), "stand-in")
    if not args.vae_only:
        _print(measure(512, (768, 768), 24, "png", repeat=args.repeat), "stand-in")
        _print(measure(1024, (1536, 1536), 12, "png", repeat=args.repeat), "stand-in")
        _print(measure(512, (4032, 3024), 12, repeat=args.repeat), "phone")
        _print(measure(1024, (4032, 3024), 12, repeat=args.repeat), "phone")
    if args.vae or args.vae_only:
        from ..models.specs import build_vae

        vae = build_vae("sd1", "real")

        def encode(x: torch.Tensor) -> torch.Tensor:
            return vae.encode(x).mode()

        _print(measure(512, (768, 768), 3, encode=encode, repeat=1, batch_size=1), "SD VAE")
        _print(measure(1024, (1536, 1536), 2, encode=encode, repeat=1, batch_size=1), "SD VAE")


if __name__ == "__main__":
    main()
