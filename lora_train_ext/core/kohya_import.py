"""Import a kohya_ss GUI config (JSON), an sd-scripts config (`--config_file` TOML) or an
sd-scripts dataset config (`--dataset_config` TOML: [general], [[datasets]],
[[datasets.subsets]]) as a RunConfig.

`import_kohya(path)` returns (config, mapped, unsupported): `mapped` names, for every key of
theirs that we read, the setting it went to; `unsupported` holds every key we have no setting
for, or whose value we cannot take, with its value as given. Nothing is dropped without being in
one of the two. The result also carries `notes`: how values were converted and which values
kohya itself would not have applied in that file (e.g. `noise_offset` while the GUI's noise type
is Multires), which are mapped but not set.

Keys are theirs: top-level names for the GUI and sd-scripts configs (sd-scripts reads one level
of tables as flat keys, so do we), `network_args.conv_dim` for an entry of network_args, and
`general.keep_tokens`, `datasets[0].resolution`, `datasets[0].subsets[1].image_dir` for a
dataset config. Where sd-scripts' default differs from ours and an sd-scripts config leaves the
key out, the config gets sd-scripts' default (a note says so), so the run is the one kohya would
have made.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .config import SETTINGS, RunConfig, _load_toml
from .errors import UserError

GUI = "kohya_ss GUI config"
SD_SCRIPTS = "sd-scripts config"
DATASET = "sd-scripts dataset config"

# the GUI's LoRA_type -> our algorithm (types not here have no counterpart)
LORA_TYPES = {
    "Standard": "lora", "Kohya LoCon": "locon", "LoCon": "locon", "LyCORIS/LoCon": "locon",
    "LyCORIS/LoHa": "loha", "Kohya LoHa": "loha", "LyCORIS/LoKr": "lokr", "Kohya LoKr": "lokr",
    "LyCORIS/iA3": "ia3", "LyCORIS/Native Fine-Tuning": "full",
}
LYCORIS_TYPES = {t for t in LORA_TYPES if t.startswith("LyCORIS/") or t == "LoCon"}
# LyCORIS's algo= -> ours
LYCORIS_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr", "ia3": "ia3",
                 "full": "full"}
NETWORK_MODULES = {"networks.lora": "lora", "lycoris.kohya": None, "networks.loha": "loha",
                   "networks.lokr": "lokr"}
SCHEDULERS = {"constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
              "polynomial"}
LOSSES = {"l2": "mse", "mse": "mse", "l1": "l1", "huber": "huber", "smooth_l1": "smooth_l1"}
MIXED_PRECISION = {"no": "fp32", "fp32": "fp32", "float": "fp32", "fp16": "fp16", "bf16": "bf16"}
SAVE_PRECISION = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
# sd-scripts' sample_sampler names -> the WebUI's sampler names
SAMPLERS = {"ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "k_lms": "LMS", "euler": "Euler",
            "k_euler": "Euler", "euler_a": "Euler a", "k_euler_a": "Euler a", "heun": "Heun",
            "dpm_2": "DPM2", "k_dpm_2": "DPM2", "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a",
            "dpmsolver++": "DPM++ 2M"}

# sd-scripts' defaults where they differ from ours: an sd-scripts config that leaves one of these
# out trains with kohya's value (train_util.py / train_network.py argument defaults)
SD_SCRIPTS_DEFAULTS: dict[str, tuple[str, Any]] = {
    "max_train_steps": ("train.max_steps", 1600),
    "learning_rate": ("optim.lr", 2e-6),
    "caption_extension": ("data.caption_extension", ".caption"),
    "enable_bucket": ("data.enable_buckets", False),
    "cache_latents": ("data.cache_latents", False),
    "mixed_precision": ("train.dtype", "fp32"),
    "save_precision": ("save.save_dtype", "fp32"),
}
# a dataset config's defaults (config_util.py) where they differ from ours
DATASET_DEFAULTS: dict[str, tuple[str, Any]] = {
    "caption_extension": ("data.caption_extension", ".caption"),
    "enable_bucket": ("data.enable_buckets", False),
}


@dataclass
class KohyaImport:
    """The import's result; unpacks as (config, mapped, unsupported)."""

    config: RunConfig
    mapped: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    kind: str = ""
    given: dict[str, Any] = field(default_factory=dict)  # their key -> their value, as read

    def __iter__(self) -> Iterator[Any]:
        return iter((self.config, self.mapped, self.unsupported))


def import_kohya(path: str) -> KohyaImport:
    """A kohya_ss GUI JSON, an sd-scripts config TOML or an sd-scripts dataset TOML as our
    settings. UserError when the file cannot be read or is none of these."""
    data = _read(path)
    imp = _Import(os.path.dirname(os.path.abspath(path)))
    if _is_dataset(data):
        imp.kind = DATASET
        imp.dataset(data, "")
        imp.absent_defaults(DATASET_DEFAULTS, data.get("general") or {}, data)
    else:
        flat = _flatten(data)
        imp.kind = GUI if _is_gui(flat, path) else SD_SCRIPTS
        imp.flat(flat)
        if imp.kind == SD_SCRIPTS:
            imp.absent_defaults(SD_SCRIPTS_DEFAULTS, flat, flat)
    return imp.result()


def is_inert(value: Any) -> bool:
    """A value that turns its option off or leaves it empty (so an unsupported key holding it
    changes nothing): None, "", false, 0, an empty list."""
    if value is None or value is False or value == [] or value == {}:
        return True
    if isinstance(value, str):
        return value.strip().lower() in ("", "none", "false", "0", "0.0")
    return isinstance(value, (int, float)) and value == 0


# -- reading ------------------------------------------------------------------------------------
def _read(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError("file", f"file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError("file", f"cannot read {path}: {e}") from None
    stripped = text.lstrip()
    try:
        data = json.loads(text) if path.lower().endswith(".json") or stripped.startswith("{") \
            else _load_toml(text)
    except ValueError as e:
        raise UserError("file", f"cannot parse {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError("file", f"{path} does not hold a kohya config (an object of settings)")
    return data


def _is_dataset(data: dict[str, Any]) -> bool:
    return isinstance(data.get("datasets"), list) or (
        isinstance(data.get("general"), dict) and "datasets" in data)


def _is_gui(flat: dict[str, Any], path: str) -> bool:
    gui_only = ("LoRA_type", "max_resolution", "lr_warmup", "noise_offset_type",
                "sdxl_no_half_vae", "lora_network_weights", "additional_parameters")
    return any(k in flat for k in gui_only) or (path.lower().endswith(".json")
                                                 and "optimizer" in flat)


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    """sd-scripts reads a config's tables as flat keys ([model] pretrained_model_name_or_path =
    ... is pretrained_model_name_or_path)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for k, v in value.items():
                flat[k] = v
        else:
            flat[key] = value
    return flat


# -- values ---------------------------------------------------------------------------------------
class _Bad(Exception):
    """A value we cannot take; the key goes to `unsupported` with this reason."""


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise _Bad(f"{v!r} is not a number")
    try:
        return float(str(v).strip().strip("\"'")) if isinstance(v, str) else float(v)
    except (TypeError, ValueError):
        raise _Bad(f"{v!r} is not a number") from None


def _int(v: Any) -> int:
    x = _float(v)
    if not x.is_integer():
        raise _Bad(f"{v!r} is not a whole number")
    return int(x)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no", ""):
        return v.strip().lower() in ("true", "1", "yes")
    raise _Bad(f"{v!r} is not true or false")


def _str(v: Any) -> str:
    if isinstance(v, (dict, list)):
        raise _Bad(f"{v!r} is not text")
    return "" if v is None else str(v)


def _resolution(v: Any) -> str:
    """'512,512' / [768, 512] / 512 -> '512' or '768x512' (width x height)."""
    if isinstance(v, (list, tuple)):
        parts = [_int(x) for x in v]
    else:
        parts = [_int(x) for x in re.split(r"[,x\s]+", str(v).strip()) if x]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise _Bad(f"{v!r} is not a resolution")
    return str(parts[0]) if parts[0] == parts[1] else f"{parts[0]}x{parts[1]}"


def _args_list(v: Any) -> list[str]:
    """network_args / optimizer_args as sd-scripts takes them: a list of "key=value" strings
    (the GUI keeps one string)."""
    if _blank(v):
        return []
    if isinstance(v, str):
        return [t.strip("\"'") for t in re.findall(r"""(?:"[^"]*"|'[^']*'|\S)+""", v)]
    if isinstance(v, list):
        return [str(x) for x in v]
    raise _Bad(f"{v!r} is not a list of key=value")


def _pairs(v: Any) -> dict[str, str]:
    out = {}
    for item in _args_list(v):
        key, sep, value = item.partition("=")
        if not sep:
            raise _Bad(f"{item!r} is not key=value")
        out[key.strip()] = value.strip().strip("\"'")
    return out


def _choice(table: dict[str, str], what: str) -> Callable[[Any], str]:
    def convert(v: Any) -> str:
        key = str(v).strip().lower() if not _blank(v) else ""
        if key not in table:
            valid = ", ".join(sorted(set(table.values())))
            raise _Bad(f"no {what} {v!r} here; choose one of {valid}")
        return table[key]
    return convert


# -- the import -----------------------------------------------------------------------------------
class _Import:
    def __init__(self, folder: str):
        self.folder = folder
        self.kind = ""
        self.values: dict[str, Any] = {}  # our path -> value
        self.origin: dict[str, str] = {}  # our path -> their key that set it
        self.mapped: dict[str, str] = {}
        self.unsupported: dict[str, Any] = {}
        self.given: dict[str, Any] = {}  # their key -> value, for the unsupported list
        self.raw: dict[str, Any] = {}  # every key of theirs read -> its value
        self.notes: list[str] = []

    # recording
    def set(self, key: str, path: str, value: Any, given: Any = None) -> None:
        self.map(key, path)
        self.given[key] = given
        self.values[path] = value
        self.origin[path] = key

    def map(self, key: str, path: str) -> None:
        old = self.mapped.get(key)
        self.mapped[key] = path if not old or path in old.split(", ") else f"{old}, {path}"

    def skip(self, key: str, path: str, value: Any, why: str) -> None:
        """Mapped, not applied: kohya itself would not use the value in this file."""
        self.map(key, path)
        self.notes.append(f"{key} = {value!r} not applied: {why}")

    def bad(self, key: str, value: Any, why: str = "") -> None:
        self.raw.setdefault(key, value)
        self.mapped.pop(key, None)
        self.unsupported[key] = value
        if why:
            self.notes.append(f"{key} = {value!r} not imported: {why}")

    def convert(self, key: str, path: str, value: Any, conv: Callable[[Any], Any]) -> None:
        try:
            self.set(key, path, conv(value), value)
        except _Bad as e:
            self.bad(key, value, str(e))

    # sd-scripts / GUI keys
    def flat(self, src: dict[str, Any]) -> None:
        self.src = src
        self.raw.update(src)
        gui = self.kind == GUI
        for key, value in src.items():
            handler = _FLAT.get(key)
            if handler is None:
                self.bad(key, value)
                continue
            try:
                handler(self, key, value)
            except _Bad as e:
                self.bad(key, value, str(e))
        if gui:
            self.gui_network()
        else:
            self.sd_network()
        self.steps_and_epochs()
        self.learning_rates()
        self.keep_last()
        dataset_config = src.get("dataset_config")
        if not _blank(dataset_config):
            self.dataset_file(str(dataset_config))
        elif "dataset_config" in src:
            self.map("dataset_config", "data.dataset_dir")
        for key, value in src.items():  # nothing without a place in one of the two lists
            if key not in self.mapped and key not in self.unsupported:
                self.bad(key, value, "" if is_inert(value) else
                         f"not an option of a {self.kind} for a LoRA here")

    def absent_defaults(self, table: dict[str, tuple[str, Any]], *sources: dict) -> None:
        for key, (path, value) in table.items():
            if any(key in s for s in sources) or path in self.values:
                continue
            if key == "max_train_steps" and ("train.epochs" in self.values
                                            or "max_train_epochs" in self.src_keys()):
                continue
            self.values[path] = value
            self.notes.append(f"{key} not given: {path} = {value!r}, kohya's default")

    def src_keys(self) -> set[str]:
        return set(getattr(self, "src", {}))

    # network: algorithm and its arguments
    def gui_network(self) -> None:
        src = self.src
        kind = src.get("LoRA_type", "Standard")
        algo = LORA_TYPES.get(str(kind))
        if "LoRA_type" in src:
            if algo is None:
                self.bad("LoRA_type", kind, f"no network type {kind!r} here; types: "
                                            f"{', '.join(LORA_TYPES)}")
            else:
                self.set("LoRA_type", "network.algo", algo, kind)
        lycoris = kind in LYCORIS_TYPES
        convs = lycoris or kind in ("Kohya LoCon", "Kohya LoHa", "Kohya LoKr")
        for key, path in (("conv_dim", "network.conv_rank"), ("conv_alpha", "network.conv_alpha")):
            if key in src:
                if convs:
                    self.convert(key, path, src[key], _int if key == "conv_dim" else _float)
                else:
                    self.skip(key, path, src[key], f"LoRA_type {kind} has no conv layers")
        for key, path, conv, kinds in (
                ("factor", "network.lokr_factor", _int, ("LyCORIS/LoKr", "Kohya LoKr")),
                ("decompose_both", "network.decompose_both", _bool, ("LyCORIS/LoKr",)),
                ("use_cp", "network.use_tucker", _bool, ("LyCORIS/LoKr",)),
                ("use_tucker", "network.use_tucker", _bool, tuple(LYCORIS_TYPES)),
                ("dora_wd", "network.algo", _bool, ("LoCon", "LyCORIS/LoCon"))):
            if key not in src:
                continue
            if kind not in kinds:
                self.skip(key, path, src[key], f"LoRA_type {kind} does not use it")
                continue
            try:
                value = conv(src[key])
            except _Bad as e:
                self.bad(key, src[key], str(e))
                continue
            if key == "dora_wd":
                self.map(key, path)
                if value:
                    self.values[path] = "dora"
                    self.notes.append("dora_wd = true: network.algo = 'dora'")
            elif key == "use_tucker" and self.values.get(path) and not value:
                self.map(key, path)  # use_cp already asked for it
            else:
                self.set(key, path, value, src[key])
        for key in ("rank_dropout", "module_dropout"):
            if key in src:
                self.convert(key, f"network.{key}", src[key], _float0)
        for key, used_by in (("LyCORIS_preset", LYCORIS_TYPES), ("unit", ()),
                             ("train_on_input", ())):
            if key not in src:
                continue
            if kind not in used_by and kind not in ("LyCORIS/DyLoRA", "Kohya DyLoRA",
                                                    "LyCORIS/iA3"):
                self.skip(key, "network.algo", src[key], f"LoRA_type {kind} does not use it")
            elif key == "LyCORIS_preset" and str(src[key]).lower() == "full":
                self.map(key, "network.algo")  # every layer kind: what our kinds train
            else:
                self.bad(key, src[key], f"no such option for LoRA_type {kind} here")
        self.block_settings({k: src[k] for k in _BLOCK_KEYS if k in src}, "", kind in (
            "Standard", "Kohya LoCon"))

    def sd_network(self) -> None:
        src = self.src
        module = src.get("network_module")
        try:
            args = _pairs(src.get("network_args"))
        except _Bad as e:
            self.bad("network_args", src.get("network_args"), str(e))
            args = {}
        if module is not None and module not in NETWORK_MODULES:
            self.bad("network_module", module, f"no network module {module!r} here; modules: "
                                               f"{', '.join(NETWORK_MODULES)}")
        algo = NETWORK_MODULES.get(module, "lora") if module is not None else "lora"
        conv = _int(args["conv_dim"]) if "conv_dim" in args and _num_ok(args["conv_dim"]) else 0
        if module == "lycoris.kohya":
            name = args.get("algo", "lora").strip().lower()
            algo = LYCORIS_ALGOS.get(name)
            if algo is None:
                self.bad("network_args.algo", args.get("algo"),
                         f"no LyCORIS algo {name!r} here; algos: {', '.join(LYCORIS_ALGOS)}")
                algo = "locon"
            elif "algo" in args:
                self.map("network_args.algo", "network.algo")
            if algo == "locon" and _truthy(args.get("dora_wd")):
                algo = "dora"
                self.notes.append("network_args dora_wd=True: network.algo = 'dora'")
        elif module == "networks.lora" and conv > 0:
            algo = "locon"
            self.notes.append("networks.lora with conv_dim: network.algo = 'locon'")
        if module in NETWORK_MODULES:
            self.set("network_module", "network.algo", algo, module)
        elif module is None and args:
            self.values.setdefault("network.algo", algo)
        for key, value in args.items():
            name = f"network_args.{key}"
            self.raw[name] = value
            target = _NETWORK_ARGS.get(key)
            if key == "algo":
                continue
            if key == "dora_wd" and module == "lycoris.kohya":
                self.map(name, "network.algo")
                continue
            if key in _BLOCK_KEYS:
                continue
            if target is None:
                if key == "preset" and value.lower() == "full":
                    self.map(name, "network.algo")  # LyCORIS's default: every layer kind
                    continue
                self.bad(name, value, "" if is_inert(value) else "no such network option here")
                continue
            path, conv_fn = target
            self.convert(name, path, value, conv_fn)
        blocks = {k: args[k] for k in _BLOCK_KEYS if k in args}
        self.block_settings(blocks, "network_args.", module in (None, "networks.lora"))
        if "network_args" in src and "network_args" not in self.unsupported:
            paths = sorted({p for k, v in self.mapped.items() if k.startswith("network_args.")
                            for p in v.split(", ")})
            self.mapped["network_args"] = ", ".join(paths) or "network.algo"

    def block_settings(self, given: dict[str, Any], prefix: str, kohya_lora: bool) -> None:
        """block_dims / down_lr_weight, ... (SD1/SD2's 25 blocks: IN00..IN11, MID, OUT00..OUT11)
        -> network.block_ranks / network.block_lr_weights."""
        sdxl = self.values.get("model.arch") == "sdxl"
        live = {k: v for k, v in given.items() if not _blank(v)}
        for key in given:
            if key not in live:
                self.map(prefix + key, "network.block_ranks" if "dims" in key or "alphas" in key
                         else "network.block_lr_weights")
        if not live:
            return
        why = ("per-block values of an SDXL network are not read here" if sdxl else
               "" if kohya_lora else "per-block values are kohya LoRA / LoCon options")
        if why:
            for key, value in live.items():
                self.bad(prefix + key, value, why)
            return
        try:
            if "block_dims" in live:
                dims = _block_list(live["block_dims"], 25, _int)
                alphas = live.get("block_alphas")
                if alphas is not None:
                    a = _block_list(alphas, 25, _float)
                    alpha = self.values.get("network.alpha", 1.0)
                    if any(x != alpha for x in a):
                        raise _Bad("per-block alphas other than network_alpha are not supported")
                    self.map(prefix + "block_alphas", "network.alpha")
                self.set(prefix + "block_dims", "network.block_ranks",
                         _block_text(dims, skip_zero=True), live["block_dims"])
                if any(d == 0 for d in dims[1:]):  # kohya makes no adapter in a block of dim 0
                    kept = [n for n, d in zip(BLOCK_NAMES[1:], dims[1:]) if d]
                    self.values["network.block_filter"] = " ".join(kept)
                    self.origin["network.block_filter"] = prefix + "block_dims"
                    self.map(prefix + "block_dims", "network.block_filter")
            elif "block_alphas" in live:
                raise _Bad("block_alphas without block_dims")
            for key in ("conv_block_dims", "conv_block_alphas", "block_lr_zero_threshold"):
                if key in live:
                    self.bad(prefix + key, live[key], "no per-block conv rank or LR threshold here")
            lr = {}
            for key, n, offset in (("down_lr_weight", 12, 0), ("mid_lr_weight", 1, 12),
                                   ("up_lr_weight", 12, 13)):
                if key in live:
                    values = _block_list(live[key], n, _float, fill=1.0)
                    lr.update({i + offset: v for i, v in enumerate(values)})
                    self.map(prefix + key, "network.block_lr_weights")
            if lr:
                full = [lr.get(i, 1.0) for i in range(25)]
                self.values["network.block_lr_weights"] = _block_text(full)
                self.origin["network.block_lr_weights"] = prefix + next(
                    k for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight") if k in live)
        except _Bad as e:
            for key, value in live.items():
                if prefix + key not in self.unsupported:
                    self.bad(prefix + key, value, str(e))
            self.values.pop("network.block_ranks", None)
            self.values.pop("network.block_lr_weights", None)

    # steps, epochs, learning rates, snapshots
    def steps_and_epochs(self) -> None:
        src, gui = self.src, self.kind == GUI
        steps = _pos_int(src.get("max_train_steps"))
        epochs = _pos_int(src.get("max_train_epochs"))
        if "max_train_steps" in src:
            if steps:
                self.set("max_train_steps", "train.max_steps", steps, src["max_train_steps"])
            else:
                self.map("max_train_steps", "train.max_steps")
        if "max_train_epochs" in src:
            if epochs:
                self.set("max_train_epochs", "train.epochs", epochs, src["max_train_epochs"])
                if steps:
                    self.notes.append("max_train_epochs overrides max_train_steps (as in kohya)")
            else:
                self.map("max_train_epochs", "train.epochs")
        if "epoch" in src:
            epoch = _pos_int(src["epoch"])
            if gui and not steps and not epochs and epoch:
                self.set("epoch", "train.epochs", epoch, src["epoch"])
            else:
                self.skip("epoch", "train.epochs", src["epoch"],
                          "max_train_steps / max_train_epochs decide the length" if gui else
                          "sd-scripts reads max_train_epochs")
        if gui and not steps and not epochs and not _pos_int(src.get("epoch")):
            self.values["train.max_steps"] = 1600
            self.notes.append("no length given: train.max_steps = 1600, kohya's default")

    def learning_rates(self) -> None:
        """GUI: an LR of 0 means 'not given'; only the UNet or only the text encoder is trained
        when the other's LR is 0 and its own is not. sd-scripts: an absent LR is the base LR, 0
        trains nothing there (as ours)."""
        src, gui = self.src, self.kind == GUI
        te_key = "text_encoder_lr"
        te = src.get(te_key)
        try:
            if isinstance(te, list):
                values = [_float(x) for x in te]
                if len(set(values)) > 1:
                    raise _Bad("one text encoder LR here; the values differ")
                te = values[0] if values else None
            te = None if _blank(te) else _float(te)
        except _Bad as e:
            self.bad(te_key, src.get(te_key), str(e))
            te = None
        try:
            unet = None if _blank(src.get("unet_lr")) else _float(src.get("unet_lr"))
        except _Bad as e:
            self.bad("unet_lr", src.get("unet_lr"), str(e))
            unet = None
        if gui:
            te_on, unet_on = bool(te), bool(unet)
            if "unet_lr" in src and "unet_lr" not in self.unsupported:
                if unet_on:
                    self.set("unet_lr", "optim.unet_lr", unet, src["unet_lr"])
                else:
                    self.map("unet_lr", "optim.unet_lr")
            if te_key in src and te_key not in self.unsupported:
                if te_on:
                    self.set(te_key, "optim.te_lr", te, src[te_key])
                else:
                    self.map(te_key, "optim.te_lr")
            if te_on != unet_on:
                part = "te" if te_on else "unet"
                self.values["network.train_on"] = part
                self.origin["network.train_on"] = te_key if te_on else "unet_lr"
                self.notes.append(f"only the {'text encoder' if te_on else 'UNet'} has an LR: "
                                  f"network.train_on = {part!r} (as kohya_ss does)")
            return
        for key, value in (("unet_lr", unet), (te_key, te)):
            if key in src and key not in self.unsupported:
                path = "optim.unet_lr" if key == "unet_lr" else "optim.te_lr"
                if value is None:
                    self.map(key, path)
                else:
                    self.set(key, path, value, src[key])

    def keep_last(self) -> None:
        """kohya keeps the snapshots of the last N steps / epochs; ours keeps the last N files."""
        src = self.src
        counts = []
        for key, every_key, per in (("save_last_n_steps", "save_every_n_steps", "steps"),
                                    ("save_last_n_epochs", "save_every_n_epochs", "epochs")):
            if key not in src:
                continue
            try:
                n = 0 if _blank(src[key]) else _int(src[key])
                every = 0 if _blank(src.get(every_key)) else _int(src.get(every_key))
            except _Bad as e:
                self.bad(key, src[key], str(e))
                continue
            if not n:
                self.map(key, "save.keep_last")
            elif not every:
                self.skip(key, "save.keep_last", src[key], f"no {every_key}")
            else:
                files = n // every + 1 if per == "steps" else n
                counts.append(files)
                self.set(key, "save.keep_last", files, src[key])
                self.notes.append(f"{key} = {n} with {every_key} = {every}: save.keep_last = "
                                  f"{files} snapshots")
        if len(counts) == 2:
            self.values["save.keep_last"] = max(counts)
            self.notes.append(f"one keep count for step and epoch snapshots here: {max(counts)}")

    # dataset configs
    def dataset_file(self, given: str) -> None:
        candidates = [given, os.path.join(self.folder, given)]
        path = next((p for p in candidates if os.path.isfile(p)), "")
        if not path:
            self.map("dataset_config", "data.dataset_dir")
            self.notes.append(f"dataset_config {given!r} not found: import it on its own "
                              "(import-config FILE)")
            return
        self.map("dataset_config", "data.dataset_dir")
        try:
            data = _read(path)
        except UserError as e:
            self.bad("dataset_config", given, e.message)
            return
        for key in ("train_data_dir", "reg_data_dir"):
            if key in self.mapped and not _blank(self.src.get(key)):
                self.values.pop(self.mapped[key], None)
                self.notes.append(f"{key} not applied: dataset_config gives the folders "
                                  "(as in kohya)")
        before = dict(self.origin)
        self.dataset(data, "dataset_config:")
        for path, key in before.items():
            if self.origin.get(path) != key:
                self.notes.append(f"{key} overridden by the dataset config's "
                                  f"{self.origin[path].split(':', 1)[-1]}")
        self.absent_defaults({k: v for k, v in DATASET_DEFAULTS.items() if k not in self.src},
                             data.get("general") or {}, data)

    def dataset(self, data: dict[str, Any], prefix: str) -> None:
        general = data.get("general") or {}
        datasets = data.get("datasets") or []
        for key, value in data.items():
            if key not in ("general", "datasets"):
                self.bad(prefix + key, value, "not a dataset config table")
        if not isinstance(general, dict):
            self.bad(prefix + "general", general, "not a table")
            general = {}
        if not isinstance(datasets, list) or not datasets:
            self.notes.append("the dataset config has no [[datasets]]")
            datasets = []
        for i, extra in enumerate(datasets[1:], start=1):
            self.bad(f"{prefix}datasets[{i}]", extra, "one dataset per run here")
        ds = datasets[0] if datasets and isinstance(datasets[0], dict) else {}
        subsets = [s for s in ds.get("subsets") or [] if isinstance(s, dict)]
        train = [i for i, s in enumerate(subsets) if not _truthy(s.get("is_reg"))]
        reg = [i for i, s in enumerate(subsets) if _truthy(s.get("is_reg"))]
        main = train[0] if train else None
        for i in train[1:] + reg[1:]:
            self.bad(f"{prefix}datasets[0].subsets[{i}]", subsets[i],
                     "one image folder (and one regularization folder) per run here")
        # dataset-level options: [[datasets]] over [general]
        levels = [(f"{prefix}general.", general), (f"{prefix}datasets[0].", ds)]
        for name in _DATASET_KEYS:
            self.layered(name, levels)
        for where, table in levels:
            for key, value in table.items():
                if key not in _DATASET_KEYS and key not in _SUBSET_KEYS and key != "subsets":
                    self.bad(where + key, value, "" if is_inert(value) else "no such option here")
        # subset options: the image subset over [[datasets]] over [general]
        own = []
        if main is not None:
            own = [(f"{prefix}datasets[0].subsets[{main}].", subsets[main])]
        for name in _SUBSET_KEYS:
            self.layered(name, levels + own)
        for where, sub in own:
            self.subset_own(sub, where, reg=False)
        for i in reg[:1]:
            sub = subsets[i]
            where = f"{prefix}datasets[0].subsets[{i}]."
            for key, value in sub.items():
                self.raw[where + key] = value
                if key in _SUBSET_KEYS:
                    path = _SUBSET_KEYS[key][0]
                    mine = self.values.get(path, SETTINGS[path].default)
                    try:
                        same = _SUBSET_KEYS[key][1](value) == mine
                    except _Bad:
                        same = False
                    if same:
                        self.map(where + key, _SUBSET_KEYS[key][0])
                    else:
                        self.bad(where + key, value, "the regularization images take the "
                                                     "image folder's caption options here")
            self.subset_own(sub, where, reg=True)

    def layered(self, name: str, levels: list[tuple[str, dict]]) -> None:
        """The option from the most specific level that has it; the others are overridden."""
        table = _DATASET_KEYS if name in _DATASET_KEYS else _SUBSET_KEYS
        path, conv = table[name]
        present = [(where, t[name]) for where, t in levels if name in t]
        for where, value in present:
            self.raw[where + name] = value
        if not present:
            return
        for where, value in present[:-1]:
            self.skip(where + name, path, value, f"overridden by {present[-1][0]}{name}")
        where, value = present[-1]
        self.convert(where + name, path, value, conv)

    def subset_own(self, sub: dict[str, Any], where: str, reg: bool) -> None:
        for key, value in sub.items():
            self.raw[where + key] = value
            if key in _SUBSET_KEYS:
                continue
            if key == "image_dir":
                self.convert(where + key, "data.reg_dir" if reg else "data.dataset_dir", value,
                             _str)
                self.notes.append(f"{where}image_dir: read as our dataset layout (a flat folder,"
                                  " or N_name sub-folders)")
            elif key == "num_repeats":
                if reg:
                    self.bad(where + key, value, "regularization repeats come from the "
                                                 "regularization folder's N_name sub-folders here")
                else:
                    self.convert(where + key, "data.repeats", value, _int)
            elif key == "is_reg":
                self.map(where + key, "data.reg_dir" if reg else "data.dataset_dir")
            elif key == "class_tokens" and not reg:
                self.convert(where + key, "data.default_caption", value, _str)
            else:
                self.bad(where + key, value, "" if is_inert(value) else "no such option here")

    def result(self) -> KohyaImport:
        cfg = RunConfig()
        problems: list[UserError] = []
        for path, value in self.values.items():
            try:
                cfg.set(path, value)
            except UserError as e:
                problems.append(e)
        problems += cfg.problems()
        for p in problems:
            path = p.field
            key = self.origin.get(path)
            if path not in SETTINGS:
                continue
            setattr(getattr(cfg, path.split(".")[0]), path.split(".")[1], SETTINGS[path].default)
            if key is not None:
                self.bad(key, self.given.get(key), f"{path}: {p.message}")
            else:
                self.notes.append(f"{path}: {p.message}; left at {SETTINGS[path].default!r}")
        remaining = cfg.problems()
        if remaining:  # only rules between settings can be left: give them back too
            for p in remaining:
                if p.field in SETTINGS:
                    cfg.set(p.field, SETTINGS[p.field].default)
                    key = self.origin.get(p.field)
                    if key is not None:
                        self.bad(key, self.given.get(key), f"{p.field}: {p.message}")
        cfg.validate()
        mapped = {k: v for k, v in self.mapped.items() if k not in self.unsupported}
        given = {k: self.raw.get(k) for k in [*mapped, *self.unsupported]}
        return KohyaImport(cfg, mapped, dict(self.unsupported), list(self.notes), self.kind,
                           given)


# -- helpers for the tables ------------------------------------------------------------------------
def _float0(v: Any) -> float:
    return 0.0 if _blank(v) else _float(v)


def _int0(v: Any) -> int:
    return 0 if _blank(v) else _int(v)


def _pos_int(v: Any) -> int:
    try:
        return 0 if _blank(v) else max(0, _int(v))
    except _Bad:
        return 0


def _num_ok(v: Any) -> bool:
    try:
        _int(v)
        return True
    except _Bad:
        return False


def _truthy(v: Any) -> bool:
    try:
        return _bool(v)
    except _Bad:
        return False


def _block_list(v: Any, n: int, conv: Callable[[Any], Any], fill: Any = None) -> list:
    """kohya's comma-separated per-block values; LR weights shorter than n are filled with 1
    (as kohya does), named curves ('sine', 'linear+0.5') are refused."""
    if isinstance(v, str) and n > 1 and "," not in v:
        raise _Bad(f"{v!r}: named weight curves are not read here; give the numbers")
    items = v if isinstance(v, list) else [x for x in str(v).split(",")]
    values = [conv(x) if str(x).strip() else 0 for x in items]
    if fill is not None and len(values) < n:
        values += [fill] * (n - len(values))
    if len(values) != n:
        raise _Bad(f"{n} values expected (SD1/SD2 blocks), got {len(values)}")
    return values


BLOCK_NAMES = [f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)]


def _block_text(values: list, skip_zero: bool = False) -> str:
    """IN00 (kohya's index 0) holds no adapter and is left out."""
    return ", ".join(f"{n}:{_num_text(x)}" for n, x in zip(BLOCK_NAMES, values)
                     if n != "IN00" and not (skip_zero and x == 0))


def _num_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _direct(path: str, conv: Callable[[Any], Any]):
    def handle(imp: _Import, key: str, value: Any) -> None:
        imp.convert(key, path, value, conv)
    return handle


def _gui_noise(path: str, conv: Callable[[Any], Any], noise_type: str):
    """The GUI passes noise_offset (and its random strength) only with noise type Original, the
    multires options only with Multires."""
    def handle(imp: _Import, key: str, value: Any) -> None:
        selected = imp.src.get("noise_offset_type", noise_type) if imp.kind == GUI else noise_type
        if selected != noise_type:
            imp.skip(key, path, value, f"noise_offset_type is {selected}")
        else:
            imp.convert(key, path, value, conv)
    return handle


def _mapped_only(path: str):
    def handle(imp: _Import, key: str, value: Any) -> None:
        imp.map(key, path)
    return handle


def _handled_later(path: str):
    """Keys read by a later step (network, steps, LRs, keep_last) from the whole file; `path`
    names where they go, for the reader."""
    def handle(imp: _Import, key: str, value: Any) -> None:
        pass
    return handle


def _optimizer(imp: _Import, key: str, value: Any) -> None:
    from .optim import canonical_name

    if _blank(value):
        imp.map(key, "optim.optimizer")  # sd-scripts: AdamW, as ours
        return
    name = str(value).strip()
    if "." in name:
        raise _Bad(f"optimizer classes by module path ({name}) are not supported here")
    try:
        imp.set(key, "optim.optimizer", canonical_name(name), value)
    except UserError as e:
        raise _Bad(e.message) from None


def _legacy_optimizer(name: str):
    def handle(imp: _Import, key: str, value: Any) -> None:
        if _bool(value):
            if not _blank(imp.src.get("optimizer_type")):
                imp.skip(key, "optim.optimizer", value, "optimizer_type is given")
            else:
                imp.set(key, "optim.optimizer", name, value)
        else:
            imp.map(key, "optim.optimizer")
    return handle


def _optimizer_args(imp: _Import, key: str, value: Any) -> None:
    from .optim import parse_optimizer_args

    text = " ".join(_args_list(value))
    try:
        parse_optimizer_args(text)
    except UserError as e:
        raise _Bad(e.message) from None
    imp.set(key, "optim.optimizer_args", text, value)


def _scheduler(imp: _Import, key: str, value: Any) -> None:
    name = "constant" if _blank(value) else str(value).strip().lower()
    if name not in SCHEDULERS:
        raise _Bad(f"no scheduler {value!r} here; choose one of {', '.join(sorted(SCHEDULERS))}")
    imp.set(key, "optim.scheduler", name, value)


def _warmup_steps(imp: _Import, key: str, value: Any) -> None:
    """sd-scripts: whole steps, or a float < 1 as a ratio of the run. The GUI's lr_warmup_steps
    overrides its percentage lr_warmup when > 0."""
    if _blank(value):
        imp.map(key, "optim.warmup_steps")
        return
    x = _float(value)
    if 0 < x < 1:
        imp.set(key, "optim.warmup_ratio", x, value)
        imp.values["optim.warmup_steps"] = 0
    elif x.is_integer() and x >= 0:
        if x == 0 and imp.kind == GUI:
            imp.map(key, "optim.warmup_steps")  # the percentage decides
            return
        imp.set(key, "optim.warmup_steps", int(x), value)
        imp.values.pop("optim.warmup_ratio", None)
    else:
        raise _Bad(f"{value!r}: give whole steps or a ratio below 1")


def _gui_warmup_percent(imp: _Import, key: str, value: Any) -> None:
    pct = _float0(value)
    override = imp.src.get("lr_warmup_steps")
    if not _blank(override) and _float(override) > 0:
        imp.skip(key, "optim.warmup_ratio", value, "lr_warmup_steps is given")
        return
    if not 0 <= pct <= 100:
        raise _Bad(f"{value!r} is not a percentage")
    imp.set(key, "optim.warmup_ratio", pct / 100, value)
    if pct:
        imp.notes.append(f"lr_warmup = {value!r} (% of the run): "
                         f"optim.warmup_ratio = {pct / 100!r}")


def _cycles(imp: _Import, key: str, value: Any) -> None:
    if _blank(value):
        epoch = _pos_int(imp.src.get("epoch")) if imp.kind == GUI else 0
        if epoch:  # the GUI passes its epoch count when the field is empty
            imp.set(key, "optim.scheduler_cycles", epoch, value)
        else:
            imp.map(key, "optim.scheduler_cycles")
        return
    imp.set(key, "optim.scheduler_cycles", max(1, _int(value)), value)


def _seed(imp: _Import, key: str, value: Any) -> None:
    seed = 0 if _blank(value) else _int(value)
    if imp.kind == GUI and seed == 0 or seed < 0:
        imp.map(key, "train.seed")
        imp.notes.append(f"seed = {value!r}: kohya picks a random seed; here train.seed = 0 "
                         "(a run here is always reproducible)")
        return
    imp.set(key, "train.seed", seed, value)


def _max_token_length(imp: _Import, key: str, value: Any) -> None:
    n = 0 if _blank(value) or str(value).strip().lower() == "none" else _int(value)
    imp.set(key, "data.max_token_length", n or 75, value)


def _max_timestep(imp: _Import, key: str, value: Any) -> None:
    n = 0 if _blank(value) else _int(value)
    imp.set(key, "loss.timestep_max", n or 1000, value)


def _save_precision(imp: _Import, key: str, value: Any) -> None:
    if _blank(value) or str(value).strip().lower() == "none":
        full_bf16 = _truthy(imp.src.get("full_bf16"))
        imp.set(key, "save.save_dtype", "bf16" if full_bf16 else "fp32", value)
        return
    imp.set(key, "save.save_dtype", _choice(SAVE_PRECISION, "save precision")(value), value)


def _cache_to_disk(imp: _Import, key: str, value: Any) -> None:
    on = _bool(value)
    imp.set(key, "data.cache_to_disk", on, value)
    if on:  # kohya caches latents when either option is on
        imp.map(key, "data.cache_latents")
        imp.values["data.cache_latents"] = True


def _cache_text(imp: _Import, key: str, value: Any) -> None:
    """Caching the text conditioning changes no result here (it is exact, and only while the
    text encoder is not trained): on is taken, off leaves ours on. The GUI passes its box only
    for SDXL."""
    on = _bool(value)
    if key.startswith("sdxl_") and not _truthy(imp.src.get("sdxl")):
        imp.skip(key, "data.cache_text", value, "sdxl is false")
    elif on:
        imp.set(key, "data.cache_text", True, value)
    else:
        imp.map(key, "data.cache_text")


def _or_bool(path: str):
    """Options that switch the same setting on (masked_loss / alpha_mask, save_state / ...)."""
    def handle(imp: _Import, key: str, value: Any) -> None:
        on = _bool(value)
        imp.map(key, path)
        if on or path not in imp.values:
            imp.values[path] = on or imp.values.get(path, False)
            imp.origin[path] = key
            imp.given[key] = value
    return handle


def _arch(arch: str):
    def handle(imp: _Import, key: str, value: Any) -> None:
        on = _bool(value)
        imp.map(key, "model.arch")
        if on and not (arch == "sd2" and _truthy(imp.src.get("sdxl"))):
            imp.values["model.arch"] = arch
            imp.origin["model.arch"] = key
            imp.given[key] = value
            imp.notes.append(f"{key} = true: model.arch = {arch!r} (in the WebUI the loaded "
                             "model decides)")
    return handle


def _prediction(imp: _Import, key: str, value: Any) -> None:
    on = _bool(value)
    imp.set(key, "model.prediction", "v" if on else "auto", value)
    if not on:
        imp.notes.append("v_parameterization = false: model.prediction = 'auto' (the loaded "
                         "model's own; kohya would train epsilon)")


def _full_bf16(imp: _Import, key: str, value: Any) -> None:
    imp.set(key, "train.adapter_dtype", "bf16" if _bool(value) else "fp32", value)


def _huber_scale(imp: _Import, key: str, value: Any) -> None:
    if _blank(value) or _float(value) == 1.0:
        imp.map(key, "loss.huber_delta")
    else:
        raise _Bad("only huber_scale 1 here")


def _save_model_as(imp: _Import, key: str, value: Any) -> None:
    if _blank(value) or str(value).strip().lower() == "safetensors":
        imp.map(key, "save.output_name")
    else:
        raise _Bad("files are always written as .safetensors here")


def _noise_type(imp: _Import, key: str, value: Any) -> None:
    if str(value) not in ("Original", "Multires"):
        raise _Bad(f"no noise type {value!r} here")
    imp.map(key, "loss.noise_offset, loss.multires_noise_iterations")


def _sample_prompts(imp: _Import, key: str, value: Any) -> None:
    """The GUI keeps the prompt lines themselves; sd-scripts a file of them (.txt: one prompt a
    line, kohya's --n --w --h --d --l --s options as ours; '#' lines are comments)."""
    if _blank(value):
        imp.map(key, "sample.prompts")
        return
    text = str(value)
    if imp.kind != GUI:
        path = next((p for p in (text, os.path.join(imp.folder, text)) if os.path.isfile(p)), "")
        if not path:
            raise _Bad(f"the prompt file {text!r} is not found; give the prompts as "
                       "sample.prompts")
        if not path.lower().endswith(".txt"):
            raise _Bad("only .txt prompt files are read here")
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        text = "\n".join(lines)
        imp.notes.append(f"{key}: {len(lines)} prompts read from {path}")
    imp.set(key, "sample.prompts", text, value)


def _sampler(imp: _Import, key: str, value: Any) -> None:
    name = str(value).strip().lower()
    if name not in SAMPLERS:
        raise _Bad(f"no sampler {value!r} here; samplers: {', '.join(SAMPLERS)}")
    imp.set(key, "sample.sampler", SAMPLERS[name], value)


def _train_only(part: str):
    def handle(imp: _Import, key: str, value: Any) -> None:
        if _bool(value):
            imp.set(key, "network.train_on", part, value)
        else:
            imp.map(key, "network.train_on")
    return handle


_NETWORK_ARGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "conv_dim": ("network.conv_rank", _int), "conv_rank": ("network.conv_rank", _int),
    "conv_alpha": ("network.conv_alpha", _float),
    "dropout": ("network.dropout", _float0),
    "rank_dropout": ("network.rank_dropout", _float0),
    "module_dropout": ("network.module_dropout", _float0),
    "factor": ("network.lokr_factor", _int), "decompose_both": ("network.decompose_both", _bool),
    "full_matrix": ("network.full_matrix", _bool), "use_tucker": ("network.use_tucker", _bool),
    "use_cp": ("network.use_tucker", _bool),
    "loraplus_lr_ratio": ("network.loraplus_ratio", lambda v: _float0(v) or 1.0),
}
_BLOCK_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
               "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")

# dataset-level and subset-level options of a dataset config
_DATASET_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "resolution": ("data.resolution", _resolution),
    "batch_size": ("train.batch_size", _int),
    "enable_bucket": ("data.enable_buckets", _bool),
    "min_bucket_reso": ("data.min_bucket_side", _int),
    "max_bucket_reso": ("data.max_bucket_side", _int),
    "bucket_reso_steps": ("data.bucket_step", _int),
    "bucket_no_upscale": ("data.no_upscale", _bool),
}
_SUBSET_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "caption_extension": ("data.caption_extension", _str),
    "shuffle_caption": ("data.shuffle_tags", _bool),
    "keep_tokens": ("data.keep_tokens", _int0),
    "flip_aug": ("data.flip", _bool),
    "color_aug": ("data.color_aug", _bool),
    "random_crop": ("data.crop", lambda v: "random" if _bool(v) else "center"),
    "caption_prefix": ("data.caption_prefix", _str),
    "caption_suffix": ("data.caption_suffix", _str),
    "caption_dropout_rate": ("data.caption_dropout", _float0),
    "caption_tag_dropout_rate": ("data.tag_dropout", _float0),
    "alpha_mask": ("data.masked_loss", _bool),
}

# the flat keys of the GUI's JSON and of sd-scripts' arguments
_FLAT: dict[str, Callable[[_Import, str, Any], None]] = {
    # network
    "network_dim": _direct("network.rank", _int),
    "network_alpha": _direct("network.alpha", _float),
    "network_dropout": _direct("network.dropout", _float0),
    "scale_weight_norms": _direct("optim.scale_weight_norms", _float0),
    "network_weights": _direct("network.existing_lora", _str),
    "lora_network_weights": _direct("network.existing_lora", _str),
    "network_train_unet_only": _train_only("unet"),
    "network_train_text_encoder_only": _train_only("te"),
    "LoRA_type": _handled_later("network.algo"),
    "network_module": _handled_later("network.algo"),
    "network_args": _handled_later("network"),
    **{k: _handled_later("network") for k in (
        "conv_dim", "conv_alpha", "factor", "decompose_both", "use_cp", "use_tucker", "dora_wd",
        "rank_dropout", "module_dropout", "LyCORIS_preset", "unit", "train_on_input",
        *_BLOCK_KEYS)},
    "loraplus_lr_ratio": _direct("network.loraplus_ratio", lambda v: _float0(v) or 1.0),
    # optimizer and LR
    "optimizer": _optimizer, "optimizer_type": _optimizer,
    "use_8bit_adam": _legacy_optimizer("AdamW8bit"),
    "use_lion_optimizer": _legacy_optimizer("Lion"),
    "optimizer_args": _optimizer_args,
    "learning_rate": _direct("optim.lr", _float),
    "unet_lr": _handled_later("optim.unet_lr"),
    "text_encoder_lr": _handled_later("optim.te_lr"),
    "lr_scheduler": _scheduler,
    "lr_warmup_steps": _warmup_steps,
    "lr_warmup": _gui_warmup_percent,
    "lr_scheduler_num_cycles": _cycles,
    "lr_scheduler_power": _direct("optim.scheduler_power",
                                  lambda v: 1.0 if _blank(v) else _float(v)),
    "max_grad_norm": _direct("optim.max_grad_norm", _float0),
    # training
    "max_train_steps": _handled_later("train.max_steps"),
    "max_train_epochs": _handled_later("train.epochs"),
    "epoch": _handled_later("train.epochs"),
    "train_batch_size": _direct("train.batch_size", _int),
    "gradient_accumulation_steps": _direct("train.grad_accum", _int),
    "seed": _seed,
    "mixed_precision": _direct("train.dtype", _choice(MIXED_PRECISION, "mixed precision")),
    "full_bf16": _full_bf16,
    "gradient_checkpointing": _direct("train.gradient_checkpointing", _bool),
    # saving
    "output_dir": _direct("save.output_dir", _str),
    "output_name": _direct("save.output_name", _str),
    "training_comment": _direct("save.comment", _str),
    "save_precision": _save_precision,
    "save_every_n_steps": _direct("save.save_every_steps", _int0),
    "save_every_n_epochs": _direct("save.save_every_epochs", _int0),
    "save_last_n_steps": _handled_later("save.keep_last"),
    "save_last_n_epochs": _handled_later("save.keep_last"),
    "save_state": _or_bool("save.save_state"),
    "save_state_on_train_end": _or_bool("save.save_state"),
    "save_model_as": _save_model_as,
    # dataset
    "train_data_dir": _direct("data.dataset_dir", _str),
    "reg_data_dir": _direct("data.reg_dir", _str),
    "dataset_config": _handled_later("data"),
    "resolution": _direct("data.resolution", _resolution),
    "max_resolution": _direct("data.resolution", _resolution),
    "enable_bucket": _direct("data.enable_buckets", _bool),
    "min_bucket_reso": _direct("data.min_bucket_side", _int),
    "max_bucket_reso": _direct("data.max_bucket_side", _int),
    "bucket_reso_steps": _direct("data.bucket_step", _int),
    "bucket_no_upscale": _direct("data.no_upscale", _bool),
    "caption_extension": _direct("data.caption_extension", _str),
    "caption_extention": _direct("data.caption_extension", _str),  # sd-scripts' old spelling
    "shuffle_caption": _direct("data.shuffle_tags", _bool),
    "keep_tokens": _direct("data.keep_tokens", _int0),
    "caption_dropout_rate": _direct("data.caption_dropout", _float0),
    "caption_tag_dropout_rate": _direct("data.tag_dropout", _float0),
    "caption_prefix": _direct("data.caption_prefix", _str),
    "caption_suffix": _direct("data.caption_suffix", _str),
    "max_token_length": _max_token_length,
    "flip_aug": _direct("data.flip", _bool),
    "color_aug": _direct("data.color_aug", _bool),
    "random_crop": _direct("data.crop", lambda v: "random" if _bool(v) else "center"),
    "cache_latents": _direct("data.cache_latents", _bool),
    "cache_latents_to_disk": _cache_to_disk,
    "cache_text_encoder_outputs": _cache_text,
    "sdxl_cache_text_encoder_outputs": _cache_text,
    "prior_loss_weight": _direct("data.prior_loss_weight", _float),
    "masked_loss": _or_bool("data.masked_loss"),
    "alpha_mask": _or_bool("data.masked_loss"),
    # loss and noise
    "noise_offset_type": _noise_type,
    "noise_offset": _gui_noise("loss.noise_offset", _float0, "Original"),
    "noise_offset_random_strength": _gui_noise("loss.noise_offset_random_strength", _bool,
                                               "Original"),
    "multires_noise_iterations": _gui_noise("loss.multires_noise_iterations", _int0, "Multires"),
    "multires_noise_discount": _gui_noise("loss.multires_noise_discount", _float0, "Multires"),
    "ip_noise_gamma": _direct("loss.input_perturbation", _float0),
    "min_snr_gamma": _direct("loss.min_snr_gamma", _float0),
    "debiased_estimation_loss": _direct("loss.debiased_estimation", _bool),
    "loss_type": _direct("loss.loss", _choice(LOSSES, "loss")),
    "huber_c": _direct("loss.huber_delta", _float),
    "huber_schedule": _direct("loss.huber_schedule", lambda v: str(v).strip().lower()),
    "huber_scale": _huber_scale,
    "min_timestep": _direct("loss.timestep_min", _int0),
    "max_timestep": _max_timestep,
    # samples
    "sample_prompts": _sample_prompts,
    "sample_every_n_steps": _direct("sample.every_steps", _int0),
    "sample_every_n_epochs": _direct("sample.every_epochs", _int0),
    "sample_at_first": _direct("sample.at_start", _bool),
    "sample_sampler": _sampler,
    # model
    "v2": _arch("sd2"),
    "sdxl": _arch("sdxl"),
    "v_parameterization": _prediction,
    "zero_terminal_snr": _direct("model.zero_terminal_snr", _bool),
}
