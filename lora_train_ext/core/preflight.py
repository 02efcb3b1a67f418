"""The one check every entry point runs before any model work: the tab, the API, the command
line and the trainer all call `preflight()`.

It looks at everything and returns every problem at once, each a UserError naming its field:
the settings' ranges and choices (the settings table in config.py), the rules between them, the
optimizer (its package, its arguments, the LRs it accepts), the folders (dataset, regularization,
masks, cache, output), the dataset itself (at least one usable image), a file to continue from,
and what the host's model and device allow. `Preflight.raise_if_failed()` raises them together
as one `UserErrors`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import optim as O
from .config import RunConfig
from .device import dtype_is_slow
from .errors import UserError, UserErrors
from .networks.targets import parse_block_values

# the text-encoder parts of each architecture, as networks name them
TE_PARTS = {"sd1": ("te",), "sd2": ("te",), "sdxl": ("te1", "te2")}


@dataclass
class Preflight:
    problems: list[UserError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the guide's advice; the run may go on
    dataset_summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self) -> "Preflight":
        if self.problems:
            raise UserErrors(self.problems)
        return self


def preflight(cfg: RunConfig, *, arch: str | None = None, device: torch.device | str | None = None,
              dataset: bool = True, scan: bool = True,
              host_check: Callable[[RunConfig], None] | None = None,
              allow_pickle: bool = False, model_loaded: bool = False) -> Preflight:
    """Check `cfg` for a run on a model of `arch` (default: cfg.model.arch) on `device`.

    dataset: check the dataset, regularization and mask folders (False where the caller brings
    its own data, as tests do); scan: also scan the dataset for usable images (the trainer, which
    scans it right after, says False); host_check: the host's own refusals (raises UserError); a
    host trains its loaded model, so the headless settings (model.checkpoint, model.vae,
    model.base_dtype) are refused with it. allow_pickle: a .ckpt checkpoint may be unpickled
    (`train --allow-ckpt`); model_loaded: the model is built already (the trainer's own check),
    so model.checkpoint and model.vae are not read again."""
    out = Preflight()
    out.problems += cfg.problems()
    arch = arch or cfg.model.arch
    bad_fields = {p.field for p in out.problems}
    if not bad_fields & {"optim.optimizer", "optim.optimizer_args", "optim.lr", "optim.unet_lr",
                         "optim.te_lr", "network.train_on", "network.block_ranks",
                         "network.block_lr_weights", "network.loraplus_ratio"}:
        try:
            out.warnings += check_settings(cfg, TE_PARTS.get(arch, ("te",)))
        except UserError as e:
            out.problems.append(e)
    if cfg.train.dtype == "fp16" and device is not None and torch.device(device).type != "cuda":
        out.problems.append(UserError("train.dtype", "fp16 needs a CUDA GPU; use bf16 or fp32 "
                                                     "on the CPU"))
    elif device is not None and "train.dtype" not in bad_fields:
        slow = dtype_is_slow(device, cfg.train.dtype)
        if slow:
            out.warnings.append(slow)
    if host_check is not None:
        out.problems += _headless_only(cfg)
        try:
            host_check(cfg)
        except UserError as e:
            out.problems.append(e)
    elif not model_loaded and not bad_fields & {"model.checkpoint", "model.vae"}:
        out.problems += _checkpoint_problems(cfg, arch, allow_pickle)
    out.problems += _output_problems(cfg)
    out.problems += _file_problems(cfg, arch)
    if dataset and cfg.mode.kind == "difference":  # image pairs instead of a captioned set
        out.problems += _pair_problems(cfg, out)
    elif dataset and cfg.mode.kind != "slider":  # a slider trains from prompts alone
        folder_problems = _dataset_folder_problems(cfg)
        out.problems += folder_problems
        if scan and not folder_problems and "data.resolution" not in bad_fields:
            out.problems += _dataset_problems(cfg, out)
    return out


def _output_problems(cfg: RunConfig) -> list[UserError]:
    folder = cfg.save.output_dir or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        return [UserError("save.output_dir", f"{folder} is a file, not a folder")]
    probe_dir = folder
    while not os.path.exists(probe_dir):  # the nearest folder that exists must be writable
        parent = os.path.dirname(os.path.abspath(probe_dir))
        if parent == os.path.abspath(probe_dir):
            break
        probe_dir = parent
    if not os.path.isdir(probe_dir) or not os.access(probe_dir, os.W_OK | os.X_OK):
        return [UserError("save.output_dir", f"cannot write to {folder}")]
    return []


HEADLESS_SETTINGS = ("model.checkpoint", "model.vae", "model.base_dtype")


def _headless_only(cfg: RunConfig) -> list[UserError]:
    """The WebUI (and the preview) train the model they have loaded, in its own precision."""
    from .config import RunConfig as _Defaults

    default = _Defaults()
    return [UserError(path, "only the headless `train` command uses it; the WebUI trains the "
                            "model (and VAE) it has loaded: leave it "
                            + (repr(default.get(path)) if default.get(path) else "empty"))
            for path in HEADLESS_SETTINGS if cfg.get(path) != default.get(path)]


def _checkpoint_problems(cfg: RunConfig, arch: str, allow_pickle: bool) -> list[UserError]:
    """The checkpoint (and VAE) file: readable, a trainable arch, the arch the run is for, known
    widths; nothing is built (a safetensors header is all that is read)."""
    path = cfg.model.checkpoint
    if not path:
        if cfg.model.vae:
            return [UserError("model.vae", "a VAE file goes with model.checkpoint (headless "
                                           "`train`); give the checkpoint too")]
        return []
    from .models.checkpoint_file import inspect_checkpoint

    try:
        found = inspect_checkpoint(path, cfg.model.vae, allow_pickle)
    except UserError as e:
        return [e]
    if found.arch != arch:
        return [UserError("model.arch", f"the checkpoint is {found.arch}, not {arch}; leave "
                                        "model.arch out (it is read from the checkpoint)")]
    return []


def _file_problems(cfg: RunConfig, arch: str) -> list[UserError]:
    path = cfg.network.existing_lora
    if not path:
        return []
    if not os.path.isfile(path):
        return [UserError("network.existing_lora", f"file not found: {path}")]
    from .inspect import arch_from_version

    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # not a safetensors file, truncated, ...
        return [UserError("network.existing_lora", f"cannot read {os.path.basename(path)} as a "
                                                   f"safetensors file: {e}")]
    version = str(meta.get("ss_base_model_version", ""))
    file_arch = arch_from_version(version)
    if file_arch and file_arch != arch:
        return [UserError("network.existing_lora", f"{os.path.basename(path)} was trained for "
                                                   f"{version}; this model is {arch}")]
    return []


def _dataset_folder_problems(cfg: RunConfig) -> list[UserError]:
    d = cfg.data
    out = []
    if not d.dataset_dir:
        out.append(UserError("data.dataset_dir", "give the folder with your training images"))
    elif not os.path.isdir(d.dataset_dir):
        out.append(UserError("data.dataset_dir", f"folder not found: {d.dataset_dir}"))
    if d.reg_dir and not os.path.isdir(d.reg_dir):
        out.append(UserError("data.reg_dir", f"folder not found: {d.reg_dir}"))
    if d.validation_dir and not os.path.isdir(d.validation_dir):
        out.append(UserError("data.validation_dir", f"folder not found: {d.validation_dir}"))
    if d.masked_loss and d.mask_dir and not os.path.isdir(d.mask_dir):
        out.append(UserError("data.mask_dir", f"folder not found: {d.mask_dir}"))
    if d.cache_to_disk and d.cache_dir and os.path.exists(d.cache_dir) and \
            not os.path.isdir(d.cache_dir):
        out.append(UserError("data.cache_dir", f"{d.cache_dir} is a file, not a folder"))
    return out


def _pair_problems(cfg: RunConfig, out: Preflight) -> list[UserError]:
    """Difference training: NAME + NAME<mode.pair_suffix> in the dataset folder, or the second
    images in mode.after_dir. Unmatched images are warnings naming their folder's setting (the
    run leaves them out); no pair at all is a problem."""
    from .modes import scan_pairs

    if "mode.pair_suffix" in {p.field for p in out.problems}:
        return []
    try:
        found = scan_pairs(cfg)
    except UserError as e:
        return [e]
    out.dataset_summary = found.summary()
    out.warnings += found.unmatched_messages()
    lc = cfg.loss
    if lc.loss in ("huber", "smooth_l1"):
        out.warnings.append(f"loss.loss: difference training measures the x0 shift with mse "
                            f"(or l1); {lc.loss} is not used")
    if lc.min_snr_gamma or lc.debiased_estimation:
        out.warnings.append("loss.min_snr_gamma / loss.debiased_estimation: difference training "
                            "weighs every timestep alike (its loss is in x0 units); not used")
    if not found.pairs:
        return [UserError("data.dataset_dir",
                          f"no image pairs in {cfg.data.dataset_dir}: a pair is NAME.png with "
                          + (f"NAME.png in mode.after_dir ({cfg.mode.after_dir})"
                             if cfg.mode.after_dir else f"NAME{cfg.mode.pair_suffix}.png beside it")
                          + (f" ({found.unmatched_messages()[0]})" if found.unmatched_messages()
                             else ""))]
    return []


def _dataset_problems(cfg: RunConfig, out: Preflight) -> list[UserError]:
    from .data import check_dataset

    try:
        report = check_dataset(cfg.data, cfg.train.batch_size, seed=cfg.train.seed)
    except UserError as e:
        return [e]
    out.dataset_summary = report.summary_text()
    if not report.ok:
        return [UserError("data.dataset_dir", f"no usable image in {cfg.data.dataset_dir}: "
                                              + report.summary_text().replace("\n", "; "))]
    if cfg.data.validation_dir:
        from .data import TrainData

        try:
            TrainData(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                      split="validation")
        except UserError as e:
            return [e]
    return []


def trained_parts(cfg: RunConfig, te_parts: tuple[str, ...] = ("te",)) -> list[str]:
    """The parts a run trains with a non-zero LR: 'unet' and/or the text encoders' parts."""
    want = {"both": ["unet", *te_parts], "unet": ["unet"], "te": list(te_parts)}[cfg.network.train_on]
    return [p for p in want if (cfg.unet_lr if p == "unet" else cfg.te_lr) > 0]


def check_settings(cfg: RunConfig, te_parts: tuple[str, ...] = ("te",)) -> list[str]:
    """Check the optimizer settings before any model work; return the guide's warnings.

    The optimizer is built once on stand-in tensors with the run's parameter groups (one per
    trained part, two with LoRA+), so a missing package, an unknown argument or LRs an adaptive
    optimizer refuses are a UserError here rather than a crash at the first step.
    """
    o, n = cfg.optim, cfg.network
    parts = trained_parts(cfg, te_parts)
    if not parts:
        raise UserError("optim.lr", "every trained part has learning rate 0")
    spec = O.get_spec(o.optimizer)
    parse_block_values(n.block_ranks, "network.block_ranks", integer=True)
    block_weights = parse_block_values(n.block_lr_weights, "network.block_lr_weights")
    if spec.same_lr and "unet" in parts and any(w != 1.0 for w in block_weights.values()):
        raise UserError("network.block_lr_weights",
                        f"{spec.name} needs one LR for every parameter, and per-block LR weights "
                        "give some blocks another; clear them or pick a non-adaptive optimizer")
    base_lrs = {cfg.unet_lr if p == "unet" else cfg.te_lr for p in parts}
    if spec.same_lr and n.loraplus_ratio != 1.0 and len(base_lrs) == 1:
        raise UserError("network.loraplus_ratio",
                        f"{spec.name} needs one LR for every parameter, and LoRA+ (ratio "
                        f"{n.loraplus_ratio:g}) gives the up weights another; set it to 1")
    groups = []
    for p in parts:
        lr = cfg.unet_lr if p == "unet" else cfg.te_lr
        groups.append({"params": [torch.zeros(1, requires_grad=True)], "lr": lr, "name": p})
        if n.loraplus_ratio != 1.0:
            groups.append({"params": [torch.zeros(1, requires_grad=True)],
                           "lr": lr * n.loraplus_ratio, "name": f"{p}_up"})
    O.build_optimizer(o.optimizer, groups, o.optimizer_args)
    warnings = []
    if cfg.train.ema and "schedulefree" in o.optimizer.lower():
        warnings.append(f"train.ema with {o.optimizer}: the optimizer already averages its "
                        "weights; the EMA file averages its training point, not the averaged "
                        "weights it saves")
    return warnings + O.adaptive_warnings(
        o.optimizer, cfg.unet_lr if "unet" in parts else None,
        cfg.te_lr if any(p != "unet" for p in parts) else None, o.scheduler,
        args_text=o.optimizer_args, warmup_steps=o.warmup_steps, warmup_ratio=o.warmup_ratio,
        loraplus_ratio=n.loraplus_ratio)
