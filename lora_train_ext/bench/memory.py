"""Peak memory of training runs on the CPU, per option, next to the memory estimate.

    python -m lora_train_ext.bench.memory [--size real|tiny] [--arch sd1] [--steps 2]
                                          [--case NAME ...] [--keep DIR]

Each case runs in a fresh interpreter (a child process), so what earlier cases allocated never
counts. The child builds the model (`--size real`: a random checkpoint of the real widths, written
once from `tests/reference/checkpoint_keys` as `bench.load_rss` does, loaded with
`load_checkpoint` at the case's base dtype; `--size tiny`: the in-code tiny model after a small
warm-up run that loads every lazily imported module), then measures on Linux:

- `rss_model`: resident memory after loading, less the interpreter's before (`VmRSS`);
- `run_growth`: the run's peak resident memory (`VmHWM`, reset through `/proc/self/clear_refs`
  just before the run) less the resident memory just before it; apart, the peak of the set-up
  (checks, network, latent and text caches: up to the first step) and of the steps;
- the estimate (`core.memory.estimate`) of the same run: `model_bytes` and `run_bytes`.

Cases are the options of docs/PERFORMANCE.md's memory table: base precision fp32 / bf16,
gradient checkpointing, offloading (a no-op on the CPU: it moves to the CPU), resolution 256 /
512, batch 1 / 2. Prints one JSON object per case, then a Markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    # name: (base dtype, train dtype, resolution, batch, checkpointing, offload[, train_on])
    "fp32": ("fp32", "fp32", 256, 1, False, False),
    "bf16-base": ("bf16", "bf16", 256, 1, False, False),
    "checkpointing": ("fp32", "fp32", 256, 1, True, False),
    "offload": ("fp32", "fp32", 256, 1, False, True),
    "batch2": ("fp32", "fp32", 256, 2, False, False),
    "res512": ("fp32", "fp32", 512, 1, False, False),
    "res512-checkpointing": ("fp32", "fp32", 512, 1, True, False),
    "te": ("fp32", "fp32", 256, 1, False, False, "both"),  # the UNet and the text encoders
    "te-checkpointing": ("fp32", "fp32", 256, 1, True, False, "both"),
}
TINY_CASES = {
    "tiny-256-b4": ("fp32", "fp32", 256, 4, False, False),
    "tiny-256-b4-checkpointing": ("fp32", "fp32", 256, 4, True, False),
    "tiny-512-b4": ("fp32", "fp32", 512, 4, False, False),
    "tiny-512-b2-checkpointing": ("fp32", "fp32", 512, 2, True, False),
}
MiB = 2**20


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def _settle() -> int:
    """Free what can be freed, reset the peak; return the resident memory now."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM to VmRSS
    return _status("VmRSS")


def _dataset(folder: str, resolution: int, count: int) -> str:
    from PIL import Image
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:02d}.png"))
        with open(os.path.join(folder, f"{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(f"a photo of thing {i}")
    return folder


def _config(arch: str, data: str, out: str, case: tuple, steps: int):
    from ..core.config import RunConfig

    base_dtype, dtype, res, batch, ckpt, offload, *rest = case
    cfg = RunConfig()
    cfg.model.arch = arch
    cfg.data.dataset_dir = data
    cfg.data.resolution = str(res)
    cfg.data.enable_buckets = False
    cfg.network.train_on = rest[0] if rest else "unet"
    cfg.network.rank = 8
    cfg.network.alpha = 8.0
    cfg.optim.optimizer = "AdamW"
    cfg.train.max_steps = steps
    cfg.train.batch_size = batch
    cfg.train.dtype = dtype
    cfg.train.gradient_checkpointing = ckpt
    cfg.train.offload_frozen = offload
    cfg.save.output_dir = out
    cfg.save.output_name = "bench"
    return cfg.validate()


def child(name: str, size: str, arch: str, checkpoint: str, work: str, steps: int) -> dict:
    import torch

    from ..core.memory import estimate
    from ..core.trainer import Trainer

    case = {**CASES, **TINY_CASES}[name]
    base_dtype, _, res, batch, *_ = case
    before_model = _settle()
    if size == "real":
        from ..core.models.checkpoint_file import load_checkpoint

        bundle, _ = load_checkpoint(checkpoint, base_dtype=base_dtype, tokenizer="stand-in",
                                    hash_file=False)
    else:
        from ..core.models.tiny import build_bundle

        bundle = build_bundle(arch, "tiny", seed=0)
    data = _dataset(os.path.join(work, f"data-{res}-{batch}"), res, max(2, batch))
    if size == "tiny":  # every module the run imports, every thread pool, before measuring
        warm = _config(arch, _dataset(os.path.join(work, "warm"), 64, 1),
                       os.path.join(work, "warm-out"), ("fp32", "fp32", 64, 1, False, False), 1)
        Trainer(bundle, warm).run()
    cfg = _config(arch, data, os.path.join(work, "out-" + name), case, steps)
    model_rss = _status("VmRSS") - before_model
    from ..core.bundle import TrainControl

    phases: dict[str, int] = {}

    def at_start(event) -> None:  # set-up done (checks, network, latent and text caches)
        if event.kind == "start":
            phases["setup"] = _status("VmHWM") - before
            phases["held"] = _status("VmRSS") - before
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")

    before = _settle()
    result = Trainer(bundle, cfg, TrainControl(at_start)).run()
    phases["steps"] = _status("VmHWM") - before  # from the held memory at the start
    growth = max(phases["setup"], phases["steps"])
    est = estimate(cfg, arch=arch, unet=bundle.unet, text_encoders=bundle.text_encoders,
                   vae=bundle.vae, device="cpu", images=max(2, batch), captions=max(2, batch))
    return {"case": name, "size": size, "arch": arch, "base_dtype": base_dtype,
            "train_dtype": case[1], "resolution": res, "batch": batch,
            "checkpointing": case[4], "offload": case[5],
            "train_on": cfg.network.train_on, "steps": result.steps,
            "threads": torch.get_num_threads(),
            "rss_model_mib": round(model_rss / MiB), "run_growth_mib": round(growth / MiB),
            "setup_growth_mib": round(phases["setup"] / MiB),
            "steps_growth_mib": round(phases["steps"] / MiB),
            "held_at_start_mib": round(phases["held"] / MiB),
            "estimate_model_mib": round(est.model_bytes / MiB),
            "estimate_run_mib": round(est.run_bytes / MiB),
            "run_error": round(est.run_bytes / growth - 1, 3) if growth > 0 else None,
            "peak_mib": round((model_rss + growth) / MiB),
            "estimate_peak_mib": round(est.peak_bytes / MiB),
            "peak_error": round(est.peak_bytes / (model_rss + growth) - 1, 3),
            "estimate_phase": "caching" if est.parts.get("phase") else "steps"}


def run_case(name: str, size: str, arch: str, checkpoint: str, work: str, steps: int,
             timeout: float | None = None) -> dict:
    """One case in a fresh interpreter; its JSON report."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "lora_train_ext.bench.memory", "--child", name, size, arch,
         checkpoint or "-", work, "--steps", str(steps)],
        capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| case | base | res | batch | ckpt | offload | model RSS | run growth | "
             "estimate run | error | peak | estimate peak | error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['base_dtype']} | {r['resolution']} | {r['batch']} | "
            f"{'on' if r['checkpointing'] else 'off'} | {'on' if r['offload'] else 'off'} | "
            f"{r['rss_model_mib']} MiB | {r['run_growth_mib']} MiB | {r['estimate_run_mib']} MiB"
            f" | {r['run_error'] * 100:+.0f}% | {r['peak_mib']} MiB | "
            f"{r['estimate_peak_mib']} MiB | {r['peak_error'] * 100:+.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_train_ext.bench.memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--arch", choices=("sd1", "sd2", "sdxl"), default="sd1")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--case", action="append", default=[],
                        help=f"cases to run (default: all of the size's): "
                             f"{', '.join(CASES)}; {', '.join(TINY_CASES)}")
    parser.add_argument("--keep", default="", help="work folder to keep (the checkpoint)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
        name, size, arch, checkpoint, work = args.child
        print(json.dumps(child(name, size, arch, checkpoint, work, args.steps)))
        return 0
    names = args.case or list(CASES if args.size == "real" else TINY_CASES)
    work = args.keep or tempfile.mkdtemp(prefix="lora_train_ext_mem_")
    os.makedirs(work, exist_ok=True)
    try:
        checkpoint = ""
        if args.size == "real":
            from .load_rss import reference_shapes, write_random_checkpoint

            checkpoint = os.path.join(work, f"random-{args.arch}-fp16.safetensors")
            if not os.path.isfile(checkpoint):
                write_random_checkpoint(checkpoint, reference_shapes(args.arch)[0])
        rows = []
        for name in names:
            row = run_case(name, args.size, args.arch, checkpoint, work, args.steps)
            print(json.dumps(row), flush=True)
            rows.append(row)
        print(table(rows))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
