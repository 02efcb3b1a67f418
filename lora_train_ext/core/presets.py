"""Presets: named sets of settings a run starts from.

Built-in presets (`PRESETS`, also importable from core/config.py) are dicts of sections, like a
config file holds; they cannot be overwritten or deleted. A user's own presets are TOML files in a
presets folder, `NAME.toml`, holding only the settings that differ from the defaults (and the
config version), without the settings that belong to one run (dataset and output folders, output
name, run folder, a file to continue): a preset chosen for a new run keeps that run's own.

The folder is `--dir` on the command line, else $LORA_TRAIN_PRESETS_DIR, else `presets/` in the
extension's folder (`default_presets_dir()`).
"""

from __future__ import annotations

import os
from typing import Any

from .config import CONFIG_VERSION, RunConfig, check_output_name, read_config_file, to_toml
from .errors import UserError, UserErrors
from .optim import available_optimizers

PRESET_FIELD = "preset"
PRESETS_DIR_ENV = "LORA_TRAIN_PRESETS_DIR"
PRESET_EXT = ".toml"
# Settings of one run, not of a way to train: never saved into a preset.
PER_RUN = ("data.dataset_dir", "data.reg_dir", "data.mask_dir", "data.cache_dir",
           "save.output_dir", "save.run_dir", "save.output_name", "network.existing_lora",
           "model.checkpoint")


# -- built-in presets ------------------------------------------------------------------------------
_EASY_COMMON: dict[str, dict[str, Any]] = {
    "network": {"algo": "lora", "rank": 64, "alpha": 1.0},
    "data": {"resolution": "512", "min_bucket_side": 320, "max_bucket_side": 1024,
             "max_token_length": 225},
    "loss": {"min_snr_gamma": 5.0},
    "train": {"max_steps": 1000},
}


def _easy(optimizer: str, args: str) -> dict[str, dict[str, Any]]:
    preset = {section: dict(values) for section, values in _EASY_COMMON.items()}
    preset["optim"] = {"optimizer": optimizer, "optimizer_args": args, "lr": 1.0,
                       "unet_lr": 1.0, "te_lr": 1.0, "scheduler": "constant",
                       "warmup_steps": 0, "warmup_ratio": 0.0}
    return preset


def low_vram_optimizer() -> str:
    """AdamW8bit (optimizer state in 8 bits) where bitsandbytes is installed, else AdamW."""
    return "AdamW8bit" if available_optimizers()["AdamW8bit"][0] else "AdamW"


def _low_vram(optimizer: str) -> dict[str, dict[str, dict[str, Any]]]:
    """kohya's advice for little VRAM (sd-scripts docs, "Tips for SDXL training" and
    train_network_advanced "VRAM Usage"): gradient checkpointing, cached latents, batch 1 (a
    larger batch through gradient accumulation), an 8-bit optimizer, a modest rank; for SDXL
    train the UNet only ("highly recommended for SDXL LoRA"), which also lets the text
    conditioning be cached. The training precision (bf16 / fp16) is the device's, chosen by the
    host."""
    common_optim = {"optimizer": optimizer, "optimizer_args": "", "lr": 1e-4,
                    "scheduler": "constant_with_warmup", "warmup_steps": 100}
    common_train = {"max_steps": 1000, "batch_size": 1, "grad_accum": 1,
                    "gradient_checkpointing": True}
    return {
        "lowvram-sd15": {
            "network": {"algo": "lora", "rank": 16, "alpha": 8.0, "train_on": "both"},
            "optim": {**common_optim, "te_lr": 5e-5},
            "data": {"resolution": "512", "enable_buckets": True, "min_bucket_side": 256,
                     "max_bucket_side": 1024, "max_token_length": 75, "cache_latents": True},
            "train": dict(common_train),
            "save": {"save_dtype": "fp16"},
        },
        "sdxl-12gb": {
            "network": {"algo": "lora", "rank": 32, "alpha": 16.0, "train_on": "unet"},
            "optim": dict(common_optim),
            "data": {"resolution": "1024", "enable_buckets": True, "min_bucket_side": 512,
                     "max_bucket_side": 2048, "max_token_length": 75, "cache_latents": True,
                     "cache_text": True},
            "train": dict(common_train),
            "save": {"save_dtype": "bf16"},
        },
    }


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The guide's table: DAdaptAdam, LR 1.0 for both, constant, alpha 1, dim 64, ~1000 steps,
    # buckets 320..768-1024, min_snr_gamma 5, 225 tokens.
    "easy-dadaptadam": _easy("DAdaptAdam", "decouple=True weight_decay=0.01 betas=0.9,0.999"),
    # "The same settings with Prodigy (only the optimizer args changed)", args from its section.
    "easy-prodigy": _easy("Prodigy", "decouple=True weight_decay=0.01 d_coef=2 "
                                     "use_bias_correction=True safeguard_warmup=False "
                                     "betas=0.9,0.999"),
    **_low_vram(low_vram_optimizer()),
    # A concept slider (LECO): prompts only, the UNet, a small rank, ~500 steps at a low LR;
    # the prompts are the user's to fill in (the target, and the two ends of the slider).
    "concept-slider": {
        "mode": {"kind": "slider", "target": "a photo of a person",
                 "positive": "a photo of a smiling person",
                 "negative": "a photo of a frowning person", "action": "slider",
                 "guidance": 1.0, "denoise_steps": 3},
        "network": {"algo": "lora", "rank": 4, "alpha": 1.0, "train_on": "unet"},
        "optim": {"optimizer": "AdamW", "lr": 1e-4, "scheduler": "constant"},
        "train": {"max_steps": 500, "batch_size": 1},
    },
    # Difference training (ADDifT-style): image pairs NAME + NAME_after in the dataset folder
    # (or mode.after_dir), the UNet with LoCon (the ResNet blocks too: on the tiny model LoCon
    # learned a change faster than attention-only LoRA), a small rank, ~600 steps, the middle
    # timesteps. A starting point: measured on the tiny model only (README, difference training).
    "difference": {
        "mode": {"kind": "difference", "pair_suffix": "_after", "after_dir": ""},
        "network": {"algo": "locon", "rank": 8, "alpha": 4.0, "train_on": "unet"},
        "optim": {"optimizer": "AdamW", "lr": 1e-4, "scheduler": "constant"},
        "loss": {"timestep_min": 200, "timestep_max": 800},
        "train": {"max_steps": 600, "batch_size": 1},
    },
}


def is_builtin(name: str) -> bool:
    """A built-in preset's name, in any case (`Easy-Prodigy` is taken too)."""
    return name.strip().lower() in {n.lower() for n in PRESETS}


def builtin_preset(name: str) -> RunConfig:
    """A built-in preset's settings over the defaults; UserError for an unknown name."""
    if name not in PRESETS:
        raise UserError(PRESET_FIELD, f"{name!r} is not a preset; choose one of "
                                      f"{', '.join(PRESETS)}")
    return RunConfig.from_dict(PRESETS[name])


# -- the user's presets ----------------------------------------------------------------------------
def default_presets_dir() -> str:
    """$LORA_TRAIN_PRESETS_DIR, else `presets/` in the extension's folder."""
    env = os.environ.get(PRESETS_DIR_ENV, "").strip()
    if env:
        return env
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # lora_train_ext/
    return os.path.join(os.path.dirname(package), "presets")


def check_preset_name(name: str) -> None:
    """A preset's name follows the output names' rules (a plain file name on every system)."""
    try:
        check_output_name(name)
    except UserError as e:
        raise UserError(PRESET_FIELD, f"{name!r}: {e.message}") from None


def preset_path(name: str, folder: str = "") -> str:
    check_preset_name(name)
    return os.path.join(folder or default_presets_dir(), name + PRESET_EXT)


def user_presets(folder: str = "") -> list[str]:
    """Names of the presets saved in `folder`, sorted (case-insensitively)."""
    folder = folder or default_presets_dir()
    if not os.path.isdir(folder):
        return []
    names = [f[:-len(PRESET_EXT)] for f in os.listdir(folder)
             if f.endswith(PRESET_EXT) and not f.startswith(".")
             and os.path.isfile(os.path.join(folder, f))]
    return sorted((n for n in names if not is_builtin(n)), key=lambda n: (n.lower(), n))


def list_presets(folder: str = "") -> list[str]:
    """The built-in presets, then the user's."""
    return [*PRESETS, *user_presets(folder)]


def preset_settings(cfg: RunConfig) -> dict[str, Any]:
    """What a preset holds: the config version and the sections of the settings that differ
    from the defaults, without the settings of one run (PER_RUN)."""
    sections: dict[str, Any] = {"version": CONFIG_VERSION}
    for path, value in cfg.changed().items():
        if path in PER_RUN:
            continue
        section, key = path.split(".")
        sections.setdefault(section, {})[key] = value
    return sections


def save_preset(name: str, cfg: RunConfig, folder: str = "") -> str:
    """Write the user preset NAME (replacing one of that name); return its path. A built-in
    preset's name and a config with problems are refused (UserError)."""
    check_preset_name(name)
    if is_builtin(name):
        raise UserError(PRESET_FIELD, f"{name!r} is a built-in preset and cannot be overwritten; "
                                      "choose another name")
    cfg.validate()
    data = preset_settings(cfg)
    path = preset_path(name, folder)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from .fsio import atomic_write_text

    atomic_write_text(path, to_toml(data))
    return path


def load_preset(name: str, folder: str = "") -> RunConfig:
    """A built-in or user preset's settings over the defaults, checked (UserErrors naming the
    preset's file and its settings)."""
    if name in PRESETS:
        return builtin_preset(name)
    path = preset_path(name, folder)
    if not os.path.isfile(path):
        raise UserError(PRESET_FIELD, f"no preset {name!r}; presets: "
                                      f"{', '.join(list_presets(folder))}")
    try:
        return RunConfig.from_dict(read_config_file(path), validate=True)
    except UserErrors as e:
        raise UserErrors([UserError(f"{PRESET_FIELD} {name} ({p.field})", p.message)
                          for p in e.problems]) from None
    except UserError as e:
        raise UserError(f"{PRESET_FIELD} {name} ({e.field})", e.message) from None


def show_preset(name: str, folder: str = "") -> str:
    """A preset as the TOML a user preset file holds (built-ins too)."""
    if name in PRESETS:
        return to_toml({"version": CONFIG_VERSION, **PRESETS[name]})
    return to_toml(preset_settings(load_preset(name, folder)))


def delete_preset(name: str, folder: str = "") -> str:
    """Delete the user preset NAME; return the path it had. Built-ins cannot be deleted."""
    check_preset_name(name)
    if is_builtin(name):
        raise UserError(PRESET_FIELD, f"{name!r} is a built-in preset and cannot be deleted")
    path = preset_path(name, folder)
    if not os.path.isfile(path):
        raise UserError(PRESET_FIELD, f"no saved preset {name!r} in {os.path.dirname(path)}")
    os.remove(path)
    return path
