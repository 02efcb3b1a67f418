"""The demo: a tiny SD1-, SD2- or SDXL-shaped model made in code, trained on the shipped images,
on the CPU.

It writes the base model as a WebUI-style checkpoint, trains a UNet + text-encoder network (LoRA by
default; any algorithm of `networks.SUPPORTED_ALGOS`), saves it, loads it back (the round-trip must
be exact), merges it into a copy of the checkpoint and checks that the merged model predicts what
the base model with the network hooked in predicts.

It is `train` (headless.py) on a checkpoint it writes itself, and so doubles as a headless trainer
on the tiny model: `run_demo(cfg=...)` takes any RunConfig
(optimizer, scheduler, loss, snapshots, ...), `stop_after` stops the run as an interrupt would
(its state is saved), and `resume_dir` continues a saved run to its configured end.
"""

from __future__ import annotations

import os
import time
from importlib import resources

import torch

from .core.config import RunConfig
from .core.errors import UserError
from .core.lora_file import load_lora
from .core.merge import merge_lora_into_checkpoint
from .core.models.tiny import (build_bundle, checkpoint_state_dict, load_checkpoint_state_dict,
                               write_checkpoint)
from .core.networks import build_network
from .core.preflight import preflight
from .headless import train_on_checkpoint

DEMO_RESOLUTION = 64
DEMO_NAME = "demo_lora"
ARCH_TITLES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}


def demo_comment(arch: str) -> str:
    return f"lora-train-ext demo on a tiny random {ARCH_TITLES[arch]}-shaped model"


def demo_dataset_dir() -> str:
    return str(resources.files("lora_train_ext") / "demo_data")


def demo_pairs_dir() -> str:
    """Image pairs for `demo --mode difference`: three shapes and the same with a warm tint."""
    return str(resources.files("lora_train_ext") / "demo_pairs")


def demo_defaults(out_dir: str = "demo_out") -> RunConfig:
    """The demo's settings: 64 px, no buckets, fp32, AdamW 1e-3, 120 steps of batch 4, rank 8."""
    return demo_config(out_dir, steps=120, seed=0, rank=8, alpha=None, lr=1e-3, batch_size=4,
                       grad_accum=1)


def demo_config(out_dir: str, steps: int, seed: int, rank: int, alpha: float | None, lr: float,
                batch_size: int, grad_accum: int, dataset: str = "", arch: str = "sd1",
                prediction: str = "auto", algo: str = "lora") -> RunConfig:
    """prediction: 'auto' (the arch's own: v for SD2, epsilon otherwise), 'epsilon' or 'v'."""
    cfg = RunConfig()
    cfg.model.arch = arch
    cfg.model.prediction = prediction
    cfg.network.algo = algo
    cfg.data.dataset_dir = dataset or demo_dataset_dir()
    cfg.data.resolution = str(DEMO_RESOLUTION)
    cfg.data.enable_buckets = False
    cfg.data.min_bucket_side = 64
    cfg.data.max_bucket_side = 256
    cfg.network.rank = rank
    cfg.network.alpha = float(rank if alpha is None else alpha)
    cfg.optim.lr = lr
    cfg.train.max_steps = steps
    cfg.train.seed = seed
    cfg.train.batch_size = batch_size
    cfg.train.grad_accum = grad_accum
    cfg.train.dtype = "fp32"
    cfg.save.output_dir = out_dir
    cfg.save.output_name = DEMO_NAME
    cfg.save.save_dtype = "fp32"
    cfg.save.comment = demo_comment(arch) if arch in ARCH_TITLES else ""
    return cfg


def run_demo(out_dir: str = "demo_out", steps: int = 120, seed: int = 0, rank: int = 8,
             alpha: float | None = None, lr: float = 1e-3, batch_size: int = 4,
             grad_accum: int = 1, dataset: str = "", progress=None, *,
             cfg: RunConfig | None = None, stop_after: int = 0, resume_dir: str = "",
             arch: str = "sd1", prediction: str = "auto", algo: str = "lora",
             log=None) -> dict:
    """Train on the tiny model and check the file; return the summary the CLI prints.

    The demo is `train` on a checkpoint it writes itself: the tiny model of `model.arch` as
    OUT/base.safetensors, then the same path as `python -m lora_train_ext train --checkpoint`
    (headless.train_on_checkpoint: load, NAME.config.toml, train), then its own checks: the file
    re-loads exactly, and the LoRA merged into the checkpoint predicts what the hooked model does.

    cfg: the whole run (then the single settings before `progress`, and arch / prediction / algo,
    are ignored): `model.arch` picks the tiny model, `model.prediction` its prediction type
    ('auto': the arch's own), `network.algo` the algorithm; a `model.checkpoint` in it is
    replaced by the demo's own.
    stop_after: request a stop once this step is done, as an interrupt would; the state is saved.
    resume_dir: a NAME-state folder to continue (cfg should be its config.json).
    log: receives the `checkpoint: ...` line.
    """
    t0 = time.time()
    if cfg is None:
        cfg = demo_config(out_dir, steps, seed, rank, alpha, lr, batch_size, grad_accum, dataset,
                          arch=arch, prediction=prediction, algo=algo)
    if cfg.model.arch != "sd1" and cfg.save.comment == demo_comment("sd1"):
        cfg.save.comment = demo_comment(cfg.model.arch)  # the demo's defaults, another arch
    cfg.model.checkpoint = ""  # the demo writes its own; checked once it is there
    if cfg.mode.kind == "difference" and not cfg.mode.after_dir and \
            os.path.normpath(cfg.data.dataset_dir) == os.path.normpath(demo_dataset_dir()):
        cfg.data.dataset_dir = demo_pairs_dir()  # the demo's images have no pairs; these do
    # every setting, the folders, the dataset and the optimizer's package, before model work
    preflight(cfg, device="cpu", dataset=not resume_dir).raise_if_failed()
    out_dir = cfg.save.output_dir or "."
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError("save.output_dir", f"cannot create {out_dir}: {e.strerror or e}") from None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is too small to gain from threads; they cost here
    try:
        return _run(cfg, out_dir, progress, t0, stop_after, resume_dir, log)
    finally:
        torch.set_num_threads(threads)


def write_demo_checkpoint(cfg: RunConfig, out_dir: str) -> str:
    """OUT/base.safetensors: the tiny model of cfg.model.arch from the run's seed (its
    prediction type in the metadata: the given one, or the arch's own)."""
    prediction = None if cfg.model.prediction == "auto" else cfg.model.prediction
    bundle = build_bundle(cfg.model.arch, "tiny", seed=cfg.train.seed, prediction=prediction)
    return write_checkpoint(bundle, os.path.join(out_dir, "base.safetensors"))


def _run(cfg: RunConfig, out_dir: str, progress, t0: float, stop_after: int,
         resume_dir: str, log) -> dict:
    seed = cfg.train.seed
    arch = cfg.model.arch
    base_path = write_demo_checkpoint(cfg, out_dir)
    cfg.model.checkpoint = base_path
    preflight(cfg, device="cpu", dataset=False).raise_if_failed()  # the file just written
    run = train_on_checkpoint(cfg, progress=progress, stop_after=stop_after,
                              resume_dir=resume_dir, device="cpu", log=log, checked=True)
    bundle, result = run.bundle, run.result

    # re-load: a fresh network filled from the file must equal the trained one
    tensors, meta = load_lora(result.path)
    reloaded = build_network(bundle.trainable_roots(), arch, cfg.network, seed=seed + 1)
    reloaded.load_kohya_state_dict(tensors)
    roundtrip_exact = all(torch.equal(tensors[k], v) for k, v in reloaded.kohya_state_dict().items())

    # merge into the checkpoint file; the merged model must predict what the hooked one does
    merged_path = os.path.join(out_dir, "merged.safetensors")
    report = merge_lora_into_checkpoint(base_path, [(result.path, 1.0)], merged_path, arch=arch)
    merge_error = _merge_check(bundle, reloaded, merged_path, seed)

    return {
        "lora_path": os.path.abspath(result.path),
        "base_path": base_path,
        "merged_path": os.path.abspath(merged_path),
        "steps": result.steps,
        "total_steps": result.total_steps,
        "stopped": result.stopped,
        "state_dir": os.path.abspath(result.state_dir) if result.state_dir else "",
        "optimizer": meta.get("ss_optimizer", ""),
        "scheduler": meta.get("ss_lr_scheduler", ""),
        "first_loss": round(result.first_loss, 6),
        "final_loss": round(result.final_loss, 6),
        "lr": {k: float(f"{v:.6g}") for k, v in result.lrs.items()},
        "warnings": result.warnings,
        "snapshots": [os.path.abspath(p) for p in result.snapshots],
        "history_path": os.path.abspath(result.history_path) if result.history_path else "",
        "samples": [os.path.abspath(p) for p in result.samples],
        "sample_seconds": round(result.sample_seconds, 2),
        "modules": result.modules,
        "file_bytes": os.path.getsize(result.path),
        "roundtrip_exact": roundtrip_exact,
        "merged_modules": report.changed_modules,
        "merge_max_abs_diff": merge_error,
        "seconds": round(time.time() - t0, 2),
    }


@torch.no_grad()
def _merge_check(bundle, network, merged_path: str, seed: int) -> float:
    """Max |hooked - merged| of the UNet + text encoders' output on one fixed input.

    The merged checkpoint's weights are copied into the bundle for one forward and the base
    weights copied back after it (exact: copies, no subtraction)."""
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor([500])
    caption = ["shp style, red circle, white background"]

    network.attach()
    try:
        hooked = bundle.denoise(x, t, bundle.condition(caption))
    finally:
        network.detach()

    base = {k: v.clone() for k, v in checkpoint_state_dict(bundle).items()}  # may share storage
    load_checkpoint_state_dict(bundle, load_file(merged_path))
    try:
        out = bundle.denoise(x, t, bundle.condition(caption))
    finally:
        load_checkpoint_state_dict(bundle, base)
    return float((out - hooked).abs().max())
