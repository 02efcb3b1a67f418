"""A LoRA file's metadata: every kohya `ss_*` and Stability `modelspec.*` key, in one place.

`LoraInfo` holds the facts; `build_metadata` turns them into the string dict the writer
(`lora_file.save_lora`) stores and hashes; `run_info` is the `LoraInfo` of a training run, its
settings included under the kohya keys that name them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import optim as O
from . import sched as S
from .config import RunConfig, parse_resolution
from .errors import UserError

if TYPE_CHECKING:
    from .bundle import ModelBundle, TrainingData

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
# LyCORIS's names where ours differ (its `algo` network arg, kohya's ss_network_args)
LYCORIS_ALGO_NAMES = {"oft": "diag-oft"}
OFT_ALGOS = ("oft", "boft")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class LoraInfo:
    """Facts that go into a file's metadata. Only arch, algo, rank and alpha are required.
    OFT / BOFT: rank is the block size setting (LyCORIS's dim), alpha the constraint."""

    arch: str
    algo: str = "lora"
    rank: int = 8
    alpha: float = 1.0
    conv_rank: int = 0
    conv_alpha: float = 0.0
    prediction: str = "epsilon"
    output_name: str = "lora"
    title: str = ""
    trigger_phrase: str = ""
    resolution: str = "512,512"
    model_name: str = ""
    model_hash: str = ""
    steps: int = 0
    epoch: int = 0
    num_epochs: int = 0
    num_train_images: int = 0
    learning_rate: float = 0.0
    unet_lr: float = 0.0
    te_lr: float = 0.0
    optimizer: str = ""
    lr_scheduler: str = ""
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0
    seed: int = 0
    comment: str = ""
    tag_frequency: dict | None = None
    dataset_dirs: dict | None = None
    session_id: str = ""
    started_at: str = ""
    finished_at: str = ""  # empty: the time the metadata is built (a file and its EMA twin share one)
    extra: dict[str, str] | None = None  # more keys, written after the others (run_settings)
    network_args: dict[str, str] | None = None  # more ss_network_args (OFT's rescaled)


def build_metadata(info: LoraInfo, file_name: str = "") -> dict[str, str]:
    """kohya `ss_*` and Stability `modelspec.*` keys; every value a string. file_name: the
    written file's name without extension (`ss_output_name`; default info.output_name)."""
    lycoris_algo = LYCORIS_ALGO_NAMES.get(info.algo, info.algo)
    args: dict[str, Any] = {"algo": lycoris_algo}
    if info.conv_rank:
        args.update(conv_dim=str(info.conv_rank), conv_alpha=str(info.conv_alpha))
    if info.algo in OFT_ALGOS:
        args["constraint"] = _num(info.alpha)  # LyCORIS's name; the files' alpha
    args.update(info.network_args or {})
    is_lycoris = info.algo not in ("lora", "locon")
    arch_key = "sd2v" if info.arch == "sd2" and info.prediction == "v" else info.arch
    w, h = (info.resolution.split(",") + [info.resolution])[:2]
    meta = {
        "ss_network_module": "lycoris.kohya" if is_lycoris else "networks.lora",
        "ss_network_dim": str(info.rank),
        "ss_network_alpha": _num(info.alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": BASE_MODEL_VERSION[info.arch],
        "ss_v2": str(info.arch == "sd2"),
        "ss_v_parameterization": str(info.prediction == "v"),
        "ss_sd_model_name": info.model_name,
        "ss_sd_model_hash": info.model_hash,
        "ss_resolution": f"({w.strip()}, {h.strip()})",
        "ss_num_train_images": str(info.num_train_images),
        "ss_num_epochs": str(info.num_epochs),
        "ss_epoch": str(info.epoch),
        "ss_steps": str(info.steps),
        "ss_learning_rate": _num(info.learning_rate),
        "ss_unet_lr": _num(info.unet_lr),
        "ss_text_encoder_lr": _num(info.te_lr),
        "ss_optimizer": info.optimizer,
        "ss_lr_scheduler": info.lr_scheduler,
        "ss_noise_offset": _num(info.noise_offset),
        "ss_min_snr_gamma": _num(info.min_snr_gamma),
        "ss_seed": str(info.seed),
        "ss_training_comment": info.comment,
        "ss_tag_frequency": json.dumps(info.tag_frequency or {}),
        "ss_dataset_dirs": json.dumps(info.dataset_dirs or {}),
        "ss_output_name": file_name or info.output_name,
        "ss_session_id": info.session_id,
        "ss_training_started_at": info.started_at,
        "ss_training_finished_at": info.finished_at or now_iso(),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCH[arch_key]}/"
                                  f"{'lycoris-' + lycoris_algo if is_lycoris else 'lora'}",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if info.arch == "sdxl" else "diffusers",
        "modelspec.title": info.title or info.output_name,
        "modelspec.resolution": f"{w.strip()}x{h.strip()}",
        "modelspec.date": info.finished_at or now_iso(),
        "modelspec.trigger_phrase": info.trigger_phrase,
        "modelspec.prediction_type": info.prediction,
    }
    for k, v in (info.extra or {}).items():
        meta[k] = str(v)
    return meta


def _num(x: float) -> str:
    return str(float(x))


# -- a training run ------------------------------------------------------------------------------
def run_info(cfg: RunConfig, bundle: ModelBundle, data: TrainingData, *, prediction: str,
             steps: int, epoch: int, planned_steps: int, step_offset: int, session_id: str,
             started_at: str) -> LoraInfo:
    """The facts of a run at `steps` (a continued file's steps included) in `epoch`.
    planned_steps: this run's optimizer steps; step_offset: the continued file's."""
    w, h = parse_resolution(cfg.data.resolution)
    net = cfg.network
    rank, alpha, conv_rank, conv_alpha, args = net.rank, net.alpha, net.conv_rank, \
        net.conv_alpha, None
    if net.algo in OFT_ALGOS:  # LyCORIS's dim / conv_dim are the block size, alpha unused
        rank, alpha, args = net.oft_block_size, net.oft_constraint, \
            {"rescaled": str(bool(net.oft_rescaled))}
        conv_rank, conv_alpha = (net.oft_block_size, net.oft_constraint) if net.conv_rank \
            else (0, 0.0)
    return LoraInfo(
        arch=bundle.arch, algo=net.algo, rank=rank, alpha=alpha, conv_rank=conv_rank,
        conv_alpha=conv_alpha, network_args=args, prediction=prediction,
        output_name=cfg.save.output_name, trigger_phrase=cfg.data.trigger_word,
        resolution=f"{w},{h}", model_name=bundle.model_name,
        model_hash=bundle.model_hash, steps=steps, epoch=epoch,
        num_epochs=cfg.train.epochs, num_train_images=data.num_images,
        learning_rate=cfg.optim.lr, unet_lr=cfg.unet_lr, te_lr=cfg.te_lr,
        optimizer=optimizer_label(cfg.optim.optimizer, cfg.optim.optimizer_args),
        lr_scheduler=cfg.optim.scheduler, noise_offset=cfg.loss.noise_offset,
        min_snr_gamma=cfg.loss.min_snr_gamma, seed=cfg.train.seed, comment=cfg.save.comment,
        tag_frequency=data.tag_frequency(), dataset_dirs=data.dataset_dirs_meta(),
        session_id=session_id, started_at=started_at,
        extra=run_settings(cfg, planned_steps, step_offset))


def run_settings(cfg: RunConfig, planned_steps: int, step_offset: int) -> dict[str, str]:
    """The run's settings that LoraInfo has no field for, as kohya names them, and the whole
    config as JSON (`lora_train_ext.config`)."""
    loss, optim = cfg.loss, cfg.optim
    return {
        "ss_loss_type": loss.loss, "ss_huber_c": str(loss.huber_delta),
        "ss_huber_schedule": loss.huber_schedule,
        "ss_max_grad_norm": str(optim.max_grad_norm),
        "ss_scale_weight_norms": str(optim.scale_weight_norms),
        "ss_gradient_accumulation_steps": str(cfg.train.grad_accum),
        "ss_batch_size_per_device": str(cfg.train.batch_size),
        "ss_max_train_steps": str(step_offset + planned_steps),
        "ss_lr_warmup_steps": str(S.warmup_steps_for(
            planned_steps, optim.warmup_steps, optim.warmup_ratio)),
        "ss_lr_scheduler_num_cycles": str(optim.scheduler_cycles),
        "ss_lr_scheduler_power": str(optim.scheduler_power),
        "ss_noise_offset_random_strength": str(loss.noise_offset_random_strength),
        "ss_multires_noise_iterations": str(loss.multires_noise_iterations),
        "ss_multires_noise_discount": str(loss.multires_noise_discount),
        "ss_ip_noise_gamma": str(loss.input_perturbation),
        "ss_debiased_estimation": str(loss.debiased_estimation),
        "ss_zero_terminal_snr": str(cfg.model.zero_terminal_snr),
        "ss_timestep_range": f"{loss.timestep_min},{loss.timestep_max}",
        "ss_network_dropout": str(cfg.network.dropout),
        "ss_block_ranks": cfg.network.block_ranks,
        "ss_block_lr_weights": cfg.network.block_lr_weights,
        "ss_mixed_precision": cfg.train.dtype,
        "lora_train_ext.config": shareable_config_json(cfg),
        "lora_train_ext.mode": training_mode_json(cfg),
    }


def training_mode_json(cfg: RunConfig) -> str:
    """How the file was made: the mode and, for a slider, its prompts; for difference training
    how the pairs were named (folder names only, no paths) and what +1 does (what inspect
    shows)."""
    m = cfg.mode
    out: dict[str, Any] = {"mode": m.kind}
    if m.kind == "slider":
        out.update(target=m.target, positive=m.positive, negative=m.negative,
                   neutral=m.neutral or m.target, action=m.action, guidance=m.guidance)
    elif m.kind == "difference":
        folder = os.path.basename(os.path.normpath(cfg.data.dataset_dir or "."))
        if m.after_dir:
            pairs = f"{folder}/NAME -> {os.path.basename(os.path.normpath(m.after_dir))}/NAME"
        else:
            pairs = f"{folder}/NAME -> {folder}/NAME{m.pair_suffix}"
        out.update(pairs=pairs, strength_1="adds the change (first -> second)",
                   caption=cfg.data.default_caption, trigger=cfg.data.trigger_word)
    return json.dumps(out)


def optimizer_label(name: str, args_text: str) -> str:
    """ss_optimizer as kohya writes it: `Name(key=value,...)`, or the bare name."""
    try:
        name = O.canonical_name(name)
        args = O.parse_optimizer_args(args_text)
    except UserError:
        return name + (f"({args_text})" if args_text else "")
    if not args:
        return name
    return f"{name}({','.join(f'{k}={v}' for k, v in args.items())})"


def shareable_config_json(cfg: RunConfig) -> str:
    """The run's settings for a file that gets shared: paths of the user's machine are cut to
    the last name (a dataset folder's name says what was trained, as kohya's ss_dataset_dirs
    does; the folders above it are nobody's business), folders the run wrote to are left out."""
    import os

    from .run_files import PATH_SETTINGS

    data = cfg.to_dict()
    for setting in PATH_SETTINGS:
        section, key = setting.split(".")
        value = data.get(section, {}).get(key)
        if value:
            written = setting in ("save.output_dir", "save.run_dir", "data.cache_dir")
            data[section][key] = "" if written else os.path.basename(os.path.normpath(value))
    return json.dumps(data, indent=2)

