"""One versioned dataclass tree for a run, with JSON / TOML load and save.

Every field has a default taken from the seed guides (kohya's LoRA guide, ComfyUI's node) so a
run can be described by only the fields a user changed. `validate()` checks ranges and names and
raises `UserError` naming the field (`section.field`) and what would be valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .fsio import atomic_write_text

CONFIG_VERSION = 1

ARCHES = ("sd1", "sd2", "sdxl")
PREDICTIONS = ("auto", "epsilon", "v")
ALGOS = ("lora", "locon", "loha", "lokr", "ia3", "dora", "full")
TARGETS = ("both", "unet", "te")
DTYPES = ("fp32", "bf16", "fp16")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
LOSSES = ("mse", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
)
RESIZE_MODES = ("crop", "stretch", "pad", "none")
CROP_MODES = ("center", "random")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


@dataclass
class ModelConfig:
    arch: str = "sd1"
    prediction: str = "auto"  # auto: from the model (parameterization)
    checkpoint: str = ""  # headless runs only; in the WebUI the resident model is used
    zero_terminal_snr: bool = False


@dataclass
class NetworkConfig:
    algo: str = "lora"
    rank: int = 8
    alpha: float = 1.0
    conv_rank: int = 0  # LoCon 3x3 conv rank; 0 = no conv layers
    conv_alpha: float = 1.0
    dropout: float = 0.0  # neuron dropout on the adapter's input
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    train_on: str = "both"  # both | unet | te
    block_filter: str = ""  # e.g. "IN,MID,OUT" or "OUT"; empty = all blocks
    block_ranks: str = ""  # per-block rank of the UNet's non-conv modules, e.g. "IN:4, OUT:16"
    block_lr_weights: str = ""  # per-block UNet LR multipliers, e.g. "IN:0.5, MID:1, OUT:1"
    loraplus_ratio: float = 1.0  # LR multiplier for up weights (LoRA+); 1 = off
    existing_lora: str = ""  # continue from this file
    init_seed: int | None = None  # None: the run's seed
    # LyCORIS options (networks/lokr.py, loha.py): LoKr's split factor (-1 = most balanced),
    # low-rank small factor too, no low-rank at all; CP/Tucker cores for kxk convs (LoHa, LoKr)
    lokr_factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    use_tucker: bool = False


@dataclass
class DataConfig:
    dataset_dir: str = ""
    reg_dir: str = ""
    prior_loss_weight: float = 1.0
    repeats: int = 1  # for a flat folder (N_name folders carry their own)
    caption_extension: str = ".txt"
    default_caption: str = ""  # used when an image has no caption file
    trigger_word: str = ""  # prepended to every caption when set
    caption_prefix: str = ""
    caption_suffix: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 0  # tags kept in place at the start when shuffling
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0
    max_token_length: int = 75  # 75 | 150 | 225
    resolution: str = "512"  # "512" or "768x512" (WxH)
    enable_buckets: bool = True
    min_bucket_side: int = 256
    max_bucket_side: int = 1024
    bucket_step: int = 64
    no_upscale: bool = False
    resize_mode: str = "crop"
    crop: str = "center"
    flip: bool = False
    color_aug: bool = False
    background: str = "#ffffff"  # transparent pixels are composited on this colour
    cache_latents: bool = True
    cache_to_disk: bool = False
    cache_dir: str = ""
    cache_text: bool = True  # when the text encoder is not trained
    masked_loss: bool = False  # batches carry a mask: mask_dir/<stem>.png, else the alpha channel
    mask_dir: str = ""  # grey masks named like the images (white = train, black = ignore)


@dataclass
class OptimConfig:
    optimizer: str = "AdamW"
    optimizer_args: str = ""  # kohya style: "weight_decay=0.01 betas=0.9,0.999"
    lr: float = 1e-4
    unet_lr: float | None = None  # None: lr
    te_lr: float | None = None  # None: lr
    scheduler: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    scheduler_cycles: int = 1
    scheduler_power: float = 1.0
    max_grad_norm: float = 1.0  # 0 = off
    scale_weight_norms: float = 0.0  # 0 = off


@dataclass
class LossConfig:
    loss: str = "mse"
    huber_delta: float = 0.1
    huber_schedule: str = "snr"
    min_snr_gamma: float = 0.0  # 0 = off
    debiased_estimation: bool = False
    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    input_perturbation: float = 0.0
    timestep_min: int = 0
    timestep_max: int = 1000
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 200
    epochs: int = 0  # > 0: train for this many epochs instead of max_steps
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    dtype: str = "bf16"  # compute dtype (autocast); adapter weights stay fp32
    adapter_dtype: str = "fp32"
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.999


@dataclass
class SaveConfig:
    output_dir: str = ""
    output_name: str = "my_lora"
    save_dtype: str = "fp16"
    save_every_steps: int = 0
    save_every_epochs: int = 0
    keep_last: int = 0  # 0 = keep all snapshots
    save_state: bool = False
    comment: str = ""


@dataclass
class RunConfig:
    version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    save: SaveConfig = field(default_factory=SaveConfig)

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Build from a (possibly partial) dict; unknown keys are an error naming the key."""
        if not isinstance(data, dict):
            raise UserError("config", "must be a JSON/TOML object of sections")
        data = migrate(dict(data))
        cfg = cls()
        for name, value in data.items():
            if name == "version":
                continue
            section = getattr(cfg, name, None)
            if section is None or not dataclasses.is_dataclass(section):
                valid = ", ".join(f.name for f in dataclasses.fields(cls) if f.name != "version")
                raise UserError(name, f"unknown config section; valid: {valid}")
            if not isinstance(value, dict):
                raise UserError(name, "must be an object of settings")
            _update_section(name, section, value)
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def write(self, path: str) -> None:
        """Write JSON (.json) or TOML (.toml) atomically."""
        text = to_toml(self.to_dict()) if path.endswith(".toml") else self.to_json() + "\n"
        atomic_write_text(path, text)

    @classmethod
    def read(cls, path: str) -> "RunConfig":
        if not os.path.isfile(path):
            raise UserError("config", f"file not found: {path}")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            if path.endswith(".toml"):
                data = _load_toml(raw.decode("utf-8"))
            else:
                data = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError("config", f"cannot parse {path}: {e}") from None
        return cls.from_dict(data)

    # -- derived values ----------------------------------------------------------------------
    @property
    def unet_lr(self) -> float:
        return self.optim.lr if self.optim.unet_lr is None else self.optim.unet_lr

    @property
    def te_lr(self) -> float:
        return self.optim.lr if self.optim.te_lr is None else self.optim.te_lr

    def validate(self) -> "RunConfig":
        """Raise UserError for the first bad field; return self for chaining."""
        m, n, d, o, l, t, s = (
            self.model, self.network, self.data, self.optim, self.loss, self.train, self.save)
        _choice("model.arch", m.arch, ARCHES)
        _choice("model.prediction", m.prediction, PREDICTIONS)
        _choice("network.algo", n.algo, ALGOS)
        _int_range("network.rank", n.rank, 1, 100000)
        _positive("network.alpha", n.alpha, allow_zero=True)
        _int_range("network.conv_rank", n.conv_rank, 0, 100000)
        _positive("network.conv_alpha", n.conv_alpha, allow_zero=True)
        for name in ("dropout", "rank_dropout", "module_dropout"):
            _fraction(f"network.{name}", getattr(n, name))
        _choice("network.train_on", n.train_on, TARGETS)
        _positive("network.loraplus_ratio", n.loraplus_ratio)
        if n.lokr_factor != -1:
            _int_range("network.lokr_factor", n.lokr_factor, 1, 100000)
        _positive("data.prior_loss_weight", d.prior_loss_weight, allow_zero=True)
        _int_range("data.repeats", d.repeats, 1, 100000)
        _int_range("data.keep_tokens", d.keep_tokens, 0, 1000)
        _fraction("data.caption_dropout", d.caption_dropout)
        _fraction("data.tag_dropout", d.tag_dropout)
        _choice("data.max_token_length", d.max_token_length, (75, 150, 225))
        parse_resolution(d.resolution)
        _int_range("data.bucket_step", d.bucket_step, 8, 1024)
        if d.bucket_step % 8:
            raise UserError("data.bucket_step", "must be a multiple of 8")
        _int_range("data.min_bucket_side", d.min_bucket_side, 64, 8192)
        _int_range("data.max_bucket_side", d.max_bucket_side, d.min_bucket_side, 8192)
        _choice("data.resize_mode", d.resize_mode, RESIZE_MODES)
        _choice("data.crop", d.crop, CROP_MODES)
        _positive("optim.lr", o.lr, allow_zero=True)
        if o.unet_lr is not None:
            _positive("optim.unet_lr", o.unet_lr, allow_zero=True)
        if o.te_lr is not None:
            _positive("optim.te_lr", o.te_lr, allow_zero=True)
        _choice("optim.scheduler", o.scheduler, SCHEDULERS)
        _int_range("optim.warmup_steps", o.warmup_steps, 0, 10**7)
        _fraction("optim.warmup_ratio", o.warmup_ratio)
        _int_range("optim.scheduler_cycles", o.scheduler_cycles, 1, 10000)
        _positive("optim.scheduler_power", o.scheduler_power)
        _positive("optim.max_grad_norm", o.max_grad_norm, allow_zero=True)
        _positive("optim.scale_weight_norms", o.scale_weight_norms, allow_zero=True)
        _choice("loss.loss", l.loss, LOSSES)
        _choice("loss.huber_schedule", l.huber_schedule, HUBER_SCHEDULES)
        _positive("loss.huber_delta", l.huber_delta)
        _positive("loss.min_snr_gamma", l.min_snr_gamma, allow_zero=True)
        _positive("loss.noise_offset", l.noise_offset, allow_zero=True)
        _int_range("loss.multires_noise_iterations", l.multires_noise_iterations, 0, 10)
        _positive("loss.input_perturbation", l.input_perturbation, allow_zero=True)
        _int_range("loss.timestep_min", l.timestep_min, 0, 999)
        _int_range("loss.timestep_max", l.timestep_max, l.timestep_min + 1, 1000)
        _choice("loss.timestep_sampling", l.timestep_sampling, TIMESTEP_SAMPLING)
        _int_range("train.max_steps", t.max_steps, 1, 10**7)
        _int_range("train.epochs", t.epochs, 0, 10**6)
        _int_range("train.batch_size", t.batch_size, 1, 10000)
        _int_range("train.grad_accum", t.grad_accum, 1, 1024)
        _int_range("train.seed", t.seed, 0, 2**64 - 1)
        _choice("train.dtype", t.dtype, DTYPES)
        _choice("train.adapter_dtype", t.adapter_dtype, ("fp32", "bf16"))
        _fraction("train.ema_decay", t.ema_decay)
        _choice("save.save_dtype", s.save_dtype, SAVE_DTYPES)
        if not s.output_name or any(c in s.output_name for c in '/\\:*?"<>|') or \
                s.output_name.strip(". ") == "":
            raise UserError("save.output_name",
                            "must be a plain file name without / \\ : * ? \" < > |")
        _int_range("save.save_every_steps", s.save_every_steps, 0, 10**7)
        _int_range("save.save_every_epochs", s.save_every_epochs, 0, 10**6)
        _int_range("save.keep_last", s.keep_last, 0, 10**6)
        return self


def parse_resolution(text: str | int) -> tuple[int, int]:
    """'512' -> (512, 512); '768x512' -> (768, 512) as (width, height)."""
    raw = str(text).lower().replace(" ", "").replace(",", "x")
    parts = raw.split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or any(v < 64 or v > 8192 or v % 8 for v in values):
        raise UserError("data.resolution",
                        f"{text!r} is not valid; give one side or WxH, multiples of 8 in 64..8192")
    return values[0], values[1]


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring an older config dict up to CONFIG_VERSION (version 1 is the first)."""
    version = data.get("version", CONFIG_VERSION)
    if not isinstance(version, int) or version < 1 or version > CONFIG_VERSION:
        raise UserError("version", f"unsupported config version {version!r}; this build reads 1..{CONFIG_VERSION}")
    return data


def _update_section(section_name: str, section: Any, values: dict[str, Any]) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{section_name}.{key}",
                            f"unknown setting; valid: {', '.join(fields)}")
        current = getattr(section, key)
        setattr(section, key, _coerce(f"{section_name}.{key}", value, current, fields[key]))


def _coerce(name: str, value: Any, current: Any, f: dataclasses.Field) -> Any:
    optional = "None" in str(f.type)
    if value is None:
        if optional:
            return None
        raise UserError(name, "must not be empty")
    kind = type(current) if current is not None else (float if "float" in str(f.type) else int)
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            out = float(value)
            if math.isnan(out):
                raise ValueError(value)
            return out
        return str(value)
    except (TypeError, ValueError):
        raise UserError(name, f"expected {kind.__name__}, got {value!r}") from None


def _choice(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise UserError(name, f"{value!r} is not valid; choose one of {', '.join(map(str, valid))}")


def _int_range(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise UserError(name, f"{value!r} is not valid; give a whole number in {low}..{high}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        raise UserError(name, f"{value!r} is not valid; give a number {'>= 0' if allow_zero else '> 0'}")


def _fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise UserError(name, f"{value!r} is not valid; give a number in 0..1")


def to_toml(data: dict[str, Any]) -> str:
    """Sections of scalars only, which is all a RunConfig holds."""
    lines = [f"version = {data.get('version', CONFIG_VERSION)}"]
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            if value is None:
                continue  # TOML has no null: absent means default (None)
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def _load_toml(text: str) -> dict[str, Any]:
    try:
        import tomllib  # Python 3.11+
        return tomllib.loads(text)
    except ImportError:
        pass
    try:
        import toml  # the WebUI (Python 3.10) ships it
    except ImportError:
        raise UserError("config", "reading TOML needs Python 3.11 or the 'toml' package; use JSON") from None
    return toml.loads(text)
