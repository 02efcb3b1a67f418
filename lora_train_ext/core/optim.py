"""Optimizers by kohya's names: registry, argument text, construction, live LR, guardrails.

Optional optimizers (DAdaptation, Prodigy, Lion, schedule-free, 8-bit AdamW, AdaFactor) come
from their own packages. Nothing here imports them at module import: `available_optimizers()`
only looks for the package, `build_optimizer()` imports it and turns a missing or broken
package into a `UserError` carrying the pip command.

Adaptive optimizers (DAdapt*, Prodigy) estimate a step size `d` themselves; the LR a user gives
is a multiplier of it, so the value to show in the progress view is `d * lr`
(`effective_lrs`), and the LR should stay 1.0 (`adaptive_warnings`).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import UserError

ARGS_FIELD = "optim.optimizer_args"
NAME_FIELD = "optim.optimizer"


# -- registry -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer as kohya names it.

    `sources` are (module, class) pairs tried in order (Lion: lion-pytorch, then
    pytorch-optimizer); `pip` is what to install when none imports. `adaptive`: the LR is a
    multiplier of an estimated step size `d`. `schedule_free`: the optimizer has train/eval
    modes and wants a constant LR. `same_lr`: every param group must have the same LR (or 0);
    the package raises in `step()` otherwise. `defaults`: kwargs kohya sets for this name,
    which the user's argument text may override.
    """

    name: str
    sources: tuple[tuple[str, str], ...]
    pip: str = ""
    adaptive: bool = False
    schedule_free: bool = False
    same_lr: bool = False
    defaults: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def package(self) -> str:
        """Top-level import name of the first source ("torch", "prodigyopt", ...)."""
        return self.sources[0][0].split(".")[0]

    @property
    def hint(self) -> str:
        return f"pip install {self.pip}" if self.pip else ""


def _spec(name: str, *sources: tuple[str, str], **kw: Any) -> OptimizerSpec:
    return OptimizerSpec(name, tuple(sources), **kw)


OPTIMIZERS: dict[str, OptimizerSpec] = {s.name: s for s in (
    _spec("AdamW", ("torch.optim", "AdamW")),
    _spec("AdamW8bit", ("bitsandbytes.optim", "AdamW8bit"), pip="bitsandbytes"),
    _spec("Adam", ("torch.optim", "Adam")),
    _spec("SGD", ("torch.optim", "SGD")),
    _spec("SGDNesterov", ("torch.optim", "SGD"),
          defaults=(("nesterov", True), ("momentum", 0.9))),
    _spec("RMSprop", ("torch.optim", "RMSprop")),
    _spec("Lion", ("lion_pytorch", "Lion"), ("pytorch_optimizer", "Lion"), pip="lion-pytorch"),
    _spec("AdaFactor", ("transformers.optimization", "Adafactor"), pip="transformers"),
    _spec("DAdaptAdam", ("dadaptation", "DAdaptAdam"), pip="dadaptation",
          adaptive=True, same_lr=True),
    _spec("DAdaptLion", ("dadaptation", "DAdaptLion"), pip="dadaptation",
          adaptive=True, same_lr=True),
    _spec("DAdaptAdaGrad", ("dadaptation", "DAdaptAdaGrad"), pip="dadaptation", adaptive=True),
    _spec("Prodigy", ("prodigyopt", "Prodigy"), pip="prodigyopt", adaptive=True, same_lr=True),
    _spec("AdamWScheduleFree", ("schedulefree", "AdamWScheduleFree"), pip="schedulefree",
          schedule_free=True),
    _spec("SGDScheduleFree", ("schedulefree", "SGDScheduleFree"), pip="schedulefree",
          schedule_free=True),
)}

# Older names users paste from guides (seed 003: "DAdaptation was renamed DAdaptAdam").
ALIASES = {"dadaptation": "DAdaptAdam", "dadaptadamw": "DAdaptAdam", "adafactoroptimizer": "AdaFactor"}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", str(name)).lower()


def canonical_name(name: str) -> str:
    """Registry name for `name`, case-insensitive ("prodigy" -> "Prodigy"); UserError if unknown."""
    key = _norm(name)
    for spec_name in OPTIMIZERS:
        if _norm(spec_name) == key:
            return spec_name
    if key in ALIASES:
        return ALIASES[key]
    raise UserError(NAME_FIELD, f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def get_spec(name: str) -> OptimizerSpec:
    return OPTIMIZERS[canonical_name(name)]


def _package_present(module: str) -> bool:
    top = module.split(".")[0]
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # a None or spec-less entry in sys.modules
        return False


def available_optimizers() -> dict[str, tuple[bool, str]]:
    """name -> (ok, hint). Looks for the packages without importing them (cheap, never raises);
    a package that is present but broken is reported by `build_optimizer`."""
    out: dict[str, tuple[bool, str]] = {}
    for name, spec in OPTIMIZERS.items():
        ok = any(_package_present(module) for module, _ in spec.sources)
        out[name] = (ok, "" if ok else spec.hint)
    return out


def optimizer_class(name: str) -> type:
    """Import the class for `name`; UserError with the install hint when no source imports."""
    spec = get_spec(name)
    errors = []
    for module, attr in spec.sources:
        try:
            return getattr(importlib.import_module(module), attr)
        except Exception as e:  # ImportError, or a package that fails on import (no CUDA, ...)
            errors.append(f"{module}: {type(e).__name__}: {e}")
    raise UserError(NAME_FIELD, f"{spec.name} needs the package '{spec.pip}', which is missing "
                                f"or broken; install it with: {spec.hint} ({'; '.join(errors)})")


# -- argument text --------------------------------------------------------------------------------
_KEY = re.compile(r"""(?:^|(?<=[\s,;"']))([A-Za-z_][A-Za-z0-9_]*)\s*=""")
_SEPARATORS = " \t\r\n,;"


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """kohya-style `key=value` text -> kwargs.

    Pairs are separated by whitespace, commas, semicolons or newlines; the guides' form
    `--optimizer_args "decouple=True" "weight_decay=0.01"` is accepted as pasted. Values:
    True/False, None, int, float, a tuple when the value has commas (`betas=0.9,0.999`, also
    `(0.9, 0.999)`), a quoted string, or a bare word as a string.
    """
    if text is None:
        return {}
    if not isinstance(text, str):
        raise UserError(ARGS_FIELD, f"expected text like 'weight_decay=0.01', got {text!r}")
    body = re.sub(r"^\s*--optimizer_args\b\s*=?", "", text.strip())
    if not body.strip():
        return {}
    matches = list(_KEY.finditer(body))
    if not matches:
        raise UserError(ARGS_FIELD, f"cannot read {text!r}; write pairs like "
                                    "'weight_decay=0.01 betas=0.9,0.999 decouple=True'")
    head = body[:matches[0].start()].strip(_SEPARATORS + "\"'")
    if head:
        raise UserError(ARGS_FIELD, f"{head!r} is not a key=value pair")
    out: dict[str, Any] = {}
    for i, m in enumerate(matches):
        key = m.group(1)
        end = matches[i + 1].start() if i + 1 < len(matches) else len(body)
        raw = body[m.end():end]
        if i + 1 < len(matches) and body[end - 1] in "\"'":
            raw = raw[:-1]  # the opening quote of the next quoted "key=value"
        raw = raw.strip(_SEPARATORS)
        opener = body[m.start() - 1] if m.start() > 0 else ""
        if opener in "\"'" and raw.endswith(opener) and not raw.startswith(opener):
            raw = raw[:-1].rstrip(_SEPARATORS)  # the closing quote of a quoted "key=value"
        if key in out:
            raise UserError(ARGS_FIELD, f"{key} is given twice")
        out[key] = _parse_value(key, raw)
    return out


def _parse_value(key: str, raw: str) -> Any:
    if raw == "":
        raise UserError(ARGS_FIELD, f"{key} has no value")
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return raw[1:-1]
    if raw[0] in "([" and raw[-1] in ")]":
        raw = raw[1:-1].strip()
        return tuple(_parse_scalar(key, part.strip()) for part in raw.split(",") if part.strip())
    if "," in raw:
        parts = [part.strip() for part in raw.split(",")]
        if any(not part for part in parts):
            raise UserError(ARGS_FIELD, f"{key}={raw!r} has an empty list item")
        return tuple(_parse_scalar(key, part) for part in parts)
    return _parse_scalar(key, raw)


def _parse_scalar(key: str, raw: str) -> Any:
    low = raw.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low in ("none", "null"):
        return None
    if re.fullmatch(r"[+-]?\d+", raw):
        return int(raw)
    try:
        value = float(raw)
    except ValueError:
        value = None
    if value is not None and not math.isnan(value):
        return value
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", raw):
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise UserError(ARGS_FIELD, f"cannot read the value of {key}: {raw!r} "
                                    "(quote text values, separate pairs with spaces)") from None


# -- construction -------------------------------------------------------------------------------
def build_optimizer(name: str, param_groups: list[dict], args_text: str = "") -> torch.optim.Optimizer:
    """Build the optimizer `name` for `param_groups`, each dict with "params" and its own "lr"
    (extra keys such as "name": "unet" are kept in the group and used in messages).

    Schedule-free optimizers are returned in train mode (see `set_train_mode`). AdaFactor with
    relative_step (its default) computes its own step size: the groups keep their LR numbers
    so a scheduler can run, but AdaFactor ignores them.
    """
    spec = get_spec(name)
    kwargs = dict(spec.defaults)
    kwargs.update(parse_optimizer_args(args_text))
    for reserved in ("params", "lr"):
        if reserved in kwargs:
            where = "optim.lr / unet_lr / te_lr" if reserved == "lr" else "the trainer"
            raise UserError(ARGS_FIELD, f"{reserved} is set by {where}, not in the optimizer args")
    groups = [dict(g) for g in param_groups]
    if not groups:
        raise UserError(NAME_FIELD, "nothing to train: no parameter groups")
    cls = optimizer_class(spec.name)
    _check_kwargs(spec, cls, kwargs)

    lrs = [g.get("lr") for g in groups]
    if spec.same_lr:
        nonzero = {float(lr) for lr in lrs if lr}
        if len(nonzero) > 1:
            raise UserError("optim.te_lr", f"{spec.name} needs one LR for every trained part "
                            f"(got {_describe_lrs(groups)}); set UNet and TE LR both to 1.0 and "
                            "the LoRA+ ratio to 1")
    first_lr = next((lr for lr in lrs if lr is not None), None)
    if spec.name == "AdaFactor" and kwargs.get("relative_step", True):
        ctor_lr = None  # transformers refuses an explicit lr together with relative_step
    else:
        ctor_lr = first_lr
    optimizer = _fused_if_supported(spec, cls, groups, ctor_lr, kwargs)
    if optimizer is None:
        try:
            if ctor_lr is None and spec.name != "AdaFactor":
                optimizer = cls(groups, **kwargs)
            else:
                optimizer = cls(groups, lr=ctor_lr, **kwargs)
        except (TypeError, ValueError) as e:
            raise UserError(ARGS_FIELD, f"{spec.name} rejected its settings: {e}") from None
    if spec.schedule_free:
        set_train_mode(optimizer, True)
    return optimizer


# torch's Adam / AdamW step every tensor in one fused kernel where the device has one (CUDA since
# torch 2.0, the CPU since 2.4): on a CPU about 5x faster than its default per-tensor loop, the
# same update up to float rounding. Off (the plain path) for the benchmark's comparisons.
FUSED_ADAM = True
_FUSABLE = ("AdamW", "Adam")


def _fused_if_supported(spec: OptimizerSpec, cls: type, groups: list[dict], lr,
                        kwargs: dict[str, Any]) -> torch.optim.Optimizer | None:
    """The optimizer with fused=True, or None where that does not apply: another optimizer, the
    user chose an implementation (fused / foreach / differentiable in the args), or this torch
    has no fused kernel for the parameters' device or dtype (it says so when built)."""
    if not FUSED_ADAM or spec.name not in _FUSABLE or cls.__module__.split(".")[0] != "torch":
        return None
    if {"fused", "foreach", "differentiable"} & set(kwargs):
        return None
    try:
        return cls([dict(g) for g in groups], lr=lr, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return None


def uses_fused(optimizer: torch.optim.Optimizer) -> list[bool]:
    """Whether each param group steps with a fused kernel."""
    return [bool(g.get("fused")) for g in optimizer.param_groups]


def _describe_lrs(groups: list[dict]) -> str:
    return ", ".join(f"{g.get('name', f'group {i}')}={g.get('lr')}" for i, g in enumerate(groups))


def _check_kwargs(spec: OptimizerSpec, cls: type, kwargs: dict[str, Any]) -> None:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # accepts anything; the constructor's own TypeError is caught by the caller
    valid = [n for n, p in params.items() if n not in ("self", "params", "lr")
             and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in valid:
            raise UserError(ARGS_FIELD, f"{spec.name} has no argument {key!r}; "
                                        f"it takes: {', '.join(valid)}")


# -- live values ---------------------------------------------------------------------------------
def effective_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The step size each param group really uses now.

    DAdapt* / Prodigy: d * lr, with d read from the group (or, for packages that keep it there,
    the state); DAdaptAdaGrad uses the first group's lr for every group. AdaFactor with
    relative_step: its own computed step size for the group's first parameter (before the
    first step: the value it will use at step 1). Schedule-free: the LR after its built-in
    warmup. Others: the group's lr.
    """
    out: list[float] = []
    is_adafactor = type(optimizer).__name__ == "Adafactor"
    first_lr_only = type(optimizer).__name__ == "DAdaptAdaGrad"  # steps every group with group 0's lr
    for group in optimizer.param_groups:
        lr = (optimizer.param_groups[0] if first_lr_only else group).get("lr")
        lr = 0.0 if lr is None else float(lr)
        d = group.get("d")
        if d is None:
            d = _state_d(optimizer, group)
        if d is not None:
            out.append(float(d) * lr)
        elif is_adafactor and group.get("relative_step"):
            out.append(_adafactor_lr(optimizer, group))
        elif "scheduled_lr" in group and group.get("k", 0) > 0:
            out.append(float(group["scheduled_lr"]))  # 0 until the first step
        else:
            out.append(lr)
    return out


def _state_d(optimizer: torch.optim.Optimizer, group: dict) -> float | None:
    for p in group["params"]:
        state = optimizer.state.get(p)
        if state and "d" in state:
            d = state["d"]
            return float(d.item() if torch.is_tensor(d) else d)
    return None


def _adafactor_lr(optimizer: torch.optim.Optimizer, group: dict) -> float:
    state: dict = {}
    for p in group["params"]:
        if optimizer.state.get(p):
            state = optimizer.state[p]
            break
    if not state and group["params"]:  # before the first step: the parameter's RMS now
        first = group["params"][0].detach().float()
        state = {"step": 1, "RMS": float(first.norm(2) / max(1, first.numel()) ** 0.5)}
    step = int(state.get("step", 0)) or 1
    rms = float(state.get("RMS", 0.0))
    get_lr = getattr(optimizer, "_get_lr", None)
    if callable(get_lr):
        try:
            return float(get_lr(group, {"step": step, "RMS": rms}))
        except Exception:
            pass
    min_step = 1e-6 * step if group.get("warmup_init") else 1e-2
    rel_step = min(min_step, 1.0 / math.sqrt(step))
    scale = max(group["eps"][1], rms) if group.get("scale_parameter") else 1.0
    return scale * rel_step


def set_train_mode(optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Schedule-free optimizers keep two points: train mode steps one, eval mode holds the
    averaged weights to save or sample from. Switch to eval before saving/sampling and back to
    train before the next step. A no-op for every other optimizer."""
    if not _is_schedule_free(optimizer):
        return
    method = getattr(optimizer, "train" if training else "eval")
    method()


def is_schedule_free(optimizer: Any) -> bool:
    """Whether `optimizer` keeps a train and an eval point (`set_train_mode` switches them)."""
    return _is_schedule_free(optimizer)


def _is_schedule_free(optimizer: Any) -> bool:
    groups = getattr(optimizer, "param_groups", None) or []
    return (callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))
            and any("train_mode" in g for g in groups))


# -- guardrails (seed 003) -----------------------------------------------------------------------
# Optimizers whose usual LoRA LR is around 1e-4: an LR >= 0.1 is an adaptive preset left over.
_SMALL_LR = ("AdamW", "AdamW8bit", "Adam", "RMSprop", "Lion", "AdaFactor", "AdamWScheduleFree")
_WARMUP_SCHEDULERS = ("constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                      "polynomial")


def adaptive_warnings(name: str, unet_lr: float | None, te_lr: float | None, scheduler: str, *,
                      args_text: str = "", warmup_steps: int = 0, warmup_ratio: float = 0.0,
                      loraplus_ratio: float = 1.0) -> list[str]:
    """Warnings for settings the seed guide says break or weaken this optimizer.

    `unet_lr` / `te_lr` are None (or 0) for a part that is not trained. The keyword arguments
    are optional extra context; the checks that need them are skipped when they are left out.
    Unparsable args text is not reported here (`build_optimizer` does).
    """
    try:
        spec = get_spec(name)
    except UserError:
        return []
    try:
        args = parse_optimizer_args(args_text)
    except UserError:
        args = {}
    lrs = [lr for lr in (unet_lr, te_lr) if lr]
    warnings: list[str] = []
    has_warmup = scheduler in _WARMUP_SCHEDULERS and (warmup_steps > 0 or warmup_ratio > 0)
    relative_adafactor = spec.name == "AdaFactor" and args.get("relative_step", True)

    if spec.adaptive:
        if any(lr != 1.0 for lr in lrs):
            warnings.append(
                f"{spec.name} finds the step size itself; the LR multiplies it and should be 1.0 "
                f"(the guide allows 0.1-1.0), got {_lr_text(unet_lr, te_lr)}.")
        if len(set(lrs)) > 1:
            if spec.same_lr:
                warnings.append(
                    f"{spec.name} cannot use different UNet and TE LRs (it stops with an error); "
                    "set both to 1.0 and let it adapt.")
            else:
                warnings.append(
                    f"{spec.name} estimates one step size from the first LR only and handles "
                    "separate UNet/TE LRs badly; set both to 1.0.")
        if loraplus_ratio != 1.0 and spec.same_lr:
            warnings.append(f"LoRA+ (ratio {loraplus_ratio}) gives the up weights another LR, "
                            f"which {spec.name} refuses; set the LoRA+ ratio to 1.")
    if spec.name.startswith("DAdapt"):
        if scheduler != "constant":
            warnings.append(f"{spec.name} should run with the constant scheduler "
                            f"(got {scheduler}).")
        if spec.name == "DAdaptAdam" and args.get("decouple") is not True:
            warnings.append("DAdaptAdam needs decouple=True (the guide's args: "
                            "decouple=True weight_decay=0.01 betas=0.9,0.999).")
    if spec.name == "Prodigy" and has_warmup and not args.get("safeguard_warmup", False):
        warnings.append("Prodigy with LR warmup should have safeguard_warmup=True in its args.")
    if spec.schedule_free and (scheduler != "constant" or has_warmup):
        warnings.append(f"{spec.name} replaces the LR schedule; use the constant scheduler and "
                        "its own warmup_steps argument.")
    if relative_adafactor:
        warnings.append("AdaFactor with relative_step computes its own LR: the UNet/TE LRs and "
                        "the scheduler are ignored.")
    if spec.name in _SMALL_LR and not relative_adafactor and any(lr >= 0.1 for lr in lrs):
        warnings.append(f"LR {_lr_text(unet_lr, te_lr)} is a value for adaptive optimizers "
                        f"(DAdaptation, Prodigy); {spec.name} usually wants about 1e-4.")
    return warnings


def _lr_text(unet_lr: float | None, te_lr: float | None) -> str:
    parts = []
    if unet_lr:
        parts.append(f"UNet {unet_lr:g}")
    if te_lr:
        parts.append(f"TE {te_lr:g}")
    return ", ".join(parts) or "none"
