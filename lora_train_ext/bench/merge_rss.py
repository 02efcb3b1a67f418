"""Peak memory and time of the streaming checkpoint merge at real size.

    python -m lora_train_ext.bench.merge_rss [--arch sd1|sdxl|all] [--rank 32] [--dir DIR]
                                             [--keep]

Builds a random fp16 checkpoint with every tensor name and shape of the real SD1.5 (or SDXL
base) checkpoint, from the key lists in tests/reference/checkpoint_keys (SDXL's VAE has SD1.5's
layout, so SD1.5's VAE list stands in for it), and a rank-R LoRA (LoRA targets: UNet
transformer blocks + text encoders, alpha R/2), both in a temp folder. Then runs
`python -m lora_train_ext merge` in a child process and reports its wall time and peak resident
set (`ru_maxrss` of that child, from os.wait4 in a lean launcher process), next to the peak of a child that only imports
the same modules (the interpreter + torch floor). Needs the repository checkout (the key
lists) and about 2 x the checkpoint's size of disk (SD1.5 ~2 GB, SDXL ~7 GB each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..core import keys
from ..core.fsio import atomic_write
from ..core.lora_file import LoraInfo, save_lora
from ..core.lowrank import module_kinds
from ..core.stream_io import SafetensorsReader, SafetensorsWriter, TensorSpec

ROOT = Path(__file__).resolve().parents[2]
KEYS_DIR = ROOT / "tests" / "reference" / "checkpoint_keys"
KEY_FILES = {"sd1": ("sd15_unet.tsv", "sd15_te.tsv", "sd15_vae.tsv"),
             "sdxl": ("sdxl_unet.tsv", "sdxl_te1.tsv", "sdxl_te2.tsv", "sd15_vae.tsv")}


def reference_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name in KEY_FILES[arch]:
        path = KEYS_DIR / name
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run the benchmark from a repository checkout")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                key, _, shape = line.partition("\t")
                shapes[key] = tuple(int(n) for n in shape.split("x")) if shape.strip() else ()
    return shapes


def write_random_checkpoint(shapes: dict[str, tuple[int, ...]], path: str, seed: int = 0) -> int:
    """fp16 N(0, 0.02) tensors, written one at a time (the writer never holds the file)."""
    specs = [(k, TensorSpec(torch.float16, s)) for k, s in shapes.items()]
    g = torch.Generator().manual_seed(seed)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            writer = SafetensorsWriter(f, specs, {"format": "pt"})
            for key, spec in specs:
                writer.write(key, (torch.randn(spec.shape, generator=g) * 0.02).half())
            writer.finish()
    atomic_write(path, write)
    return os.path.getsize(path)


def write_random_lora(arch: str, shapes: dict[str, tuple[int, ...]], rank: int, path: str,
                      seed: int = 1) -> int:
    """A rank-`rank` LoRA on every plain LoRA target whose weight the checkpoint has."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name in module_kinds(arch, conv=False):
        targets = keys.kohya_to_checkpoint(name, arch)
        key, rows = targets[0]
        if key not in shapes:
            continue
        shape = shapes[key]
        if rows is not None:
            targets = keys.kohya_to_checkpoint(name, arch, width=shape[0] // 3)
            rows = targets[0][1]
            shape = (rows.stop - rows.start, *shape[1:])
        out, rest = shape[0], shape[1:]
        down = torch.randn((rank, *rest), generator=g) * 0.02
        up = torch.randn((out, rank, *([1] * (len(shape) - 2))), generator=g) * 0.02
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2.0)
    save_lora(tensors, LoraInfo(arch=arch, rank=rank, alpha=rank / 2.0), path, save_dtype="fp16",
              sidecar=False)
    return os.path.getsize(path)


# A lean launcher runs each measured command: Linux keeps a process's peak RSS across fork and
# exec, so a child forked straight from this (large) process would start with our peak.
LAUNCHER = r"""
import json, os, subprocess, sys, time
out, err, result = sys.argv[1:4]
with open(out, "wb") as o, open(err, "wb") as e:
    t0 = time.time()
    p = subprocess.Popen(sys.argv[4:], stdout=o, stderr=e)
    _, status, usage = os.wait4(p.pid, 0)
with open(result, "w") as f:
    json.dump({"code": os.waitstatus_to_exitcode(status), "seconds": time.time() - t0,
               "maxrss_kib": usage.ru_maxrss}, f)
"""


def run_child(args: list[str], log_dir: str, name: str) -> tuple[int, float, int]:
    """(exit code, seconds, peak RSS in bytes) of `python args...`, run by the launcher."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out, err, result = (os.path.join(log_dir, f"{name}.{ext}") for ext in ("out", "err", "json"))
    subprocess.run([sys.executable, "-c", LAUNCHER, out, err, result, sys.executable, *args],
                   cwd=str(ROOT), env=env, check=True)
    with open(result, encoding="utf-8") as f:
        r = json.load(f)
    return r["code"], r["seconds"], r["maxrss_kib"] * 1024  # Linux: KiB


def bench(arch: str, rank: int, folder: str, say) -> dict:
    shapes = reference_shapes(arch)
    base, lora, out = (os.path.join(folder, f"{arch}-{n}.safetensors")
                       for n in ("base", "lora", "merged"))
    t0 = time.time()
    say(f"{arch}: writing a random fp16 checkpoint ({len(shapes)} tensors)")
    ckpt_bytes = write_random_checkpoint(shapes, base)
    lora_bytes = write_random_lora(arch, shapes, rank, lora)
    build = time.time() - t0
    say(f"{arch}: {ckpt_bytes / 2**30:.2f} GiB checkpoint, {lora_bytes / 2**20:.1f} MiB LoRA, "
        f"{build:.1f}s; merging in a child process")
    code, floor_s, floor_rss = run_child(
        ["-c", "import lora_train_ext.cli, lora_train_ext.cli_files, lora_train_ext.core.merge"],
        folder, f"{arch}-import")
    if code:
        raise SystemExit(f"the import-only child failed ({code})")
    code, seconds, rss = run_child(["-m", "lora_train_ext", "merge", "--base", base, "--lora",
                                    lora, "--out", out], folder, f"{arch}-merge")
    if code:
        with open(os.path.join(folder, f"{arch}-merge.err"), encoding="utf-8") as f:
            raise SystemExit(f"merge failed ({code}): {f.read()[-2000:]}")
    with open(os.path.join(folder, f"{arch}-merge.out"), encoding="utf-8") as f:
        result = json.loads(f.read().strip().splitlines()[-1])
    with SafetensorsReader(out) as r:
        assert set(r.specs) == set(shapes)
    largest = max(TensorSpec(torch.float16, s).nbytes for s in shapes.values())
    return {
        "arch": arch, "rank": rank, "tensors": len(shapes),
        "checkpoint_mib": round(ckpt_bytes / 2**20, 1), "lora_mib": round(lora_bytes / 2**20, 1),
        "largest_tensor_mib": round(largest / 2**20, 1),
        "changed_tensors": result["changed_tensors"], "merge_seconds": round(seconds, 2),
        "merge_seconds_inside": result["seconds"], "peak_rss_mib": round(rss / 2**20, 1),
        "import_only_rss_mib": round(floor_rss / 2**20, 1),
        "peak_rss_over_import_mib": round((rss - floor_rss) / 2**20, 1),
        "peak_rss_fraction_of_checkpoint": round(rss / ckpt_bytes, 3),
        "build_seconds": round(build, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_train_ext.bench.merge_rss",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sd1", "sdxl", "all"), default="sd1")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dir", default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args(argv)
    arches = ("sd1", "sdxl") if args.arch == "all" else (args.arch,)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    folder = args.dir or tempfile.mkdtemp(prefix="merge_rss_")
    os.makedirs(folder, exist_ok=True)
    results = []
    try:
        for arch in arches:
            row = bench(arch, args.rank, folder, say)
            say(f"{arch}: merge {row['merge_seconds']}s, peak RSS {row['peak_rss_mib']} MiB "
                f"(import only {row['import_only_rss_mib']} MiB) for a "
                f"{row['checkpoint_mib']} MiB checkpoint")
            results.append(row)
            if not args.keep:
                for name in os.listdir(folder):
                    if name.startswith(arch + "-") and name.endswith(".safetensors"):
                        os.remove(os.path.join(folder, name))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
