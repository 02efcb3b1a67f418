"""Loading a real-size checkpoint: time and peak memory of the streaming loader, then training speed.

    python -m lora_train_ext.bench.load_rss [--arch sd1] [--steps 2] [--resolution 256]
                                            [--base-dtype fp32|bf16] [--keep DIR]

Writes a random checkpoint of the real widths in fp16 (every tensor name and shape of the real
SD1.5 / SD2.1-v / SDXL checkpoint: `tests/reference/checkpoint_keys/*.tsv` where the source tree
has them, else the in-code models' own table, which the tests check equals them), tensor by tensor
so the writer never holds it whole. Then a child process (a fresh interpreter: its peak RSS is the
loader's alone) loads it with `load_checkpoint` and reports:

- load time, and peak RSS (`ru_maxrss`) before and after loading, next to the file's size and the
  loaded weights' size: streaming means peak - before ~ the weights in memory (fp32: twice the fp16
  file), with no second copy (the whole file, a state dict) on top;
- seconds per training step (LoRA rank 8 on UNet and text encoder, batch 1 at the given resolution,
  AdamW, fp32 on the CPU), and the peak RSS after training.

The text is tokenized with the offline stand-in tokenizer (random weights: only speed and memory
are measured here). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REFERENCE = {"sd1": ("sd15_unet", "sd15_vae", "sd15_te"),
             "sd2": ("sd21v_unet", "sd21v_vae", "sd21v_te"),
             "sdxl": ("sdxl_unet", "sd15_vae", "sdxl_te1", "sdxl_te2")}


def reference_shapes(arch: str) -> tuple[dict[str, tuple[int, ...]], str]:
    """(key -> shape, where from): the reference lists of the source tree, else the in-code
    models' table."""
    folder = Path(__file__).resolve().parents[2] / "tests" / "reference" / "checkpoint_keys"
    if folder.is_dir():
        shapes: dict[str, tuple[int, ...]] = {}
        for name in REFERENCE[arch]:
            for line in (folder / f"{name}.tsv").read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                key, _, shape = line.partition("\t")
                shapes[key] = tuple(int(s) for s in shape.split("x")) if shape.strip() else ()
        return shapes, "tests/reference/checkpoint_keys"
    from ..core.models.checkpoint_file import expected_shapes

    return dict(expected_shapes(arch, "real")), "in-code model table"


def write_random_checkpoint(path: str, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> int:
    """A safetensors file of random fp16 tensors, written one tensor at a time; returns its size.
    Norm scales (1-D `.weight`) near 1, everything else small, so a forward stays finite."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        n = 2
        for s in shape:
            n *= s
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key, shape in shapes.items():
            t = torch.randn(shape, generator=gen) * 0.02
            if len(shape) == 1 and key.endswith(".weight"):
                t += 1.0
            if key.endswith("logit_scale"):
                t.fill_(4.6052)
            f.write(t.to(torch.float16).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return os.path.getsize(path)


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def _make_dataset(folder: str, resolution: int, count: int = 2) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    for i in range(count):
        pixels = (torch.rand(resolution, resolution, 3, generator=gen) * 255).to(torch.uint8)
        Image.fromarray(pixels.numpy()).save(os.path.join(folder, f"img{i}.png"))
        with open(os.path.join(folder, f"img{i}.txt"), "w", encoding="utf-8") as f:
            f.write(f"a photo of thing {i}")


def child(path: str, steps: int, resolution: int, base_dtype: str, work: str) -> dict:
    """In a fresh process: load, then train `steps` steps; memory and times."""
    from ..core.bundle import TrainControl
    from ..core.config import RunConfig
    from ..core.models.checkpoint_file import load_checkpoint
    from ..core.trainer import train

    before = _rss_bytes()
    t0 = time.perf_counter()
    bundle, info = load_checkpoint(path, base_dtype=base_dtype, tokenizer="stand-in")
    load_s = time.perf_counter() - t0
    after_load = _rss_bytes()
    weights = sum(t.numel() * t.element_size() for m in bundle.base_modules()
                  for t in list(m.parameters()) + list(m.buffers()))

    data = os.path.join(work, "data")
    _make_dataset(data, resolution)
    cfg = RunConfig()
    cfg.model.arch = info.arch
    cfg.data.dataset_dir = data
    cfg.data.resolution = str(resolution)
    cfg.data.enable_buckets = False
    cfg.train.max_steps = steps
    cfg.train.batch_size = 1
    cfg.train.dtype = "fp32" if base_dtype == "fp32" else base_dtype
    cfg.save.output_dir = os.path.join(work, "out")
    cfg.save.output_name = "bench"
    times: dict[str, list[float]] = {"start": [], "step": []}
    startup: dict[str, float] = {}

    def on_event(e) -> None:
        if e.kind in times:
            times[e.kind].append(time.perf_counter())
        if e.kind == "step" and e.timings and not startup:
            startup.update(e.timings)

    control = TrainControl(on_event)
    t1 = time.perf_counter()
    result = train(bundle, cfg, control)
    total_s = time.perf_counter() - t1
    start = times["start"][0]
    per_step = (times["step"][-1] - start) / max(1, len(times["step"]))
    return {
        "arch": info.arch, "size": info.size, "base_dtype": base_dtype,
        "load_seconds": round(load_s, 2), "file_sha256": info.sha256[:10],
        "weights_bytes": weights,
        "rss_before_load_bytes": before, "rss_peak_after_load_bytes": after_load,
        "load_rss_increase_bytes": after_load - before,
        "train_steps": result.steps, "resolution": resolution, "batch": 1,
        "seconds_per_step": round(per_step, 2),
        "seconds_before_first_step": round(start - t1, 2),  # checks, network, latent cache
        # train() to the first optimizer step: guard_s (the base weights' fingerprint), set_up_s,
        # cache_s (latent caching, apart), first_step_s
        "startup": startup,
        "train_seconds": round(total_s, 2),
        "rss_peak_after_train_bytes": _rss_bytes(),
        "final_loss": result.final_loss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_train_ext.bench.load_rss",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(REFERENCE), default="sd1")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--base-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--keep", default="", help="write the checkpoint here and keep it")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # PATH WORK (internal)
    args = parser.parse_args(argv)
    if args.child:
        out = child(args.child[0], args.steps, args.resolution, args.base_dtype, args.child[1])
        print(json.dumps(out))
        return 0

    work = args.keep or tempfile.mkdtemp(prefix="lora_train_ext_bench_")
    os.makedirs(work, exist_ok=True)
    try:
        shapes, source = reference_shapes(args.arch)
        path = os.path.join(work, f"random-{args.arch}-fp16.safetensors")
        t0 = time.perf_counter()
        size = write_random_checkpoint(path, shapes)
        write_s = time.perf_counter() - t0
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.run(
            [sys.executable, "-m", "lora_train_ext.bench.load_rss", "--steps", str(args.steps),
             "--resolution", str(args.resolution), "--base-dtype", args.base_dtype,
             "--child", path, work], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        report.update({"tensors": len(shapes), "keys_from": source, "file_bytes": size,
                       "write_seconds": round(write_s, 2),
                       "load_rss_increase_over_file": round(
                           report["load_rss_increase_bytes"] / size, 3),
                       "load_rss_increase_over_weights": round(
                           report["load_rss_increase_bytes"] / report["weights_bytes"], 3)})
        print(json.dumps(report))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
