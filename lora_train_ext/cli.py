"""Command line: `python -m lora_train_ext {train,demo,inspect,...}`.

User errors exit with code 2 and one line naming the field and what is valid; no traceback.
Progress goes to stderr; a command's result is the last stdout line (JSON) where it has one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

from .core.errors import TrainingError, UserError

EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a one-line user error (exit 2)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        m = re.match(r"argument ([^:]+): (.*)", message, re.S)
        if m:  # "argument --stop-after/-x: what" -> the flag as the field
            raise UserError(m.group(1).split("/")[0], m.group(2))
        raise UserError("arguments", message)


def positive_int(name: str, low: int = 1, high: int = 10**7):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UserError(name, f"{text!r} is not a whole number; give {low}..{high}") from None
        if not low <= value <= high:
            raise UserError(name, f"{value} is out of range; give {low}..{high}")
        return value
    return parse


def setting_type(path: str):
    """An argparse type for one setting: the config's own coercion and range check."""
    from .core.config import SETTINGS, coerce

    spec = SETTINGS[path]

    def parse(text: str):
        value = coerce(spec, text)
        problem = spec.problem(value)
        if problem is not None:
            raise problem
        return value
    return _typed(parse)


class StderrProgress:
    """A one-line progress bar on stderr: step/total, loss, rate, ETA."""

    def __init__(self, stream=None, width: int = 24):
        self.stream = sys.stderr if stream is None else stream  # the one of now, not of import
        self.width = width
        self.is_tty = self.stream.isatty()
        self._last = 0.0

    def __call__(self, event) -> None:
        if event.kind == "step":
            now = time.time()
            if self.is_tty or event.step == event.total or now - self._last > 2.0:
                self._last = now
                frac = event.step / max(1, event.total)
                bar = "#" * int(frac * self.width)
                eta = f"{event.eta:5.1f}s" if event.eta is not None else "  ?  "
                lr = " ".join(f"{k}={v:.2e}" for k, v in event.lr.items())
                line = (f"[{bar:<{self.width}}] {event.step}/{event.total} "
                        f"loss {event.loss:.4f} (avg {event.loss_avg:.4f}) {lr} eta {eta}")
                self.stream.write(("\r" if self.is_tty else "") + line + ("" if self.is_tty else "\n"))
                if self.is_tty and event.step == event.total:
                    self.stream.write("\n")
                self.stream.flush()
        elif event.kind == "validation" and event.loss is not None:
            lead = "\n" if self.is_tty and 0 < event.step < event.total else ""
            self.stream.write(f"{lead}validation loss at step {event.step}: {event.loss:.5f}\n")
            self.stream.flush()
        elif event.kind in ("log", "snapshot") and (event.message or event.path):
            self.stream.write(f"{event.message or 'snapshot: ' + event.path}\n")
            self.stream.flush()


# -- run settings as flags -------------------------------------------------------------------------
# Every setting of the settings table (core/config.py SETTINGS) is a flag: `--rank`, `--lr`,
# `--no-cache-latents`, ... (the table names each flag). Values are kept as text here and checked
# by the config, so a flag accepts exactly what the config file, the tab and the API accept, and
# an error names the flag and the setting: `--rank (network.rank): 0 is not valid; ...`.
RUN_FLAGS = ("config", "stop_after", "resume", "warmup")  # the run flags that are not settings
# flags that do not change what a resumed run computes
RESUME_FREE = ("resume", "stop_after", "save.save_state")


_used_flags: dict[str, str] = {}  # setting path -> the flag (or alias) the user typed


class _StoreSetting(argparse.Action):
    """store, remembering which of a setting's flags was typed (`--steps` or `--max-steps`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _used_flags[self.dest] = option_string or ""


class _BoolSetting(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _used_flags[self.dest] = (option_string or "").replace("--no-", "--", 1)


def _flag(dest: str) -> str:
    from .core.config import SETTINGS

    if dest in SETTINGS:
        return _used_flags.get(dest) or SETTINGS[dest].cli_flag
    return "--" + dest.replace("_", "-")


def warmup(text: str) -> tuple[str, float]:
    """'100' -> ("steps", 100); '0.1' -> ("ratio", 0.1), a tenth of the run."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value >= 1 and value.is_integer():
        return ("steps", int(value))
    if 0 <= value < 1:
        return ("ratio", value) if value else ("steps", 0)
    raise UserError("--warmup", f"{text!r} is not valid; give steps (e.g. 100) or a ratio "
                                "of the run in 0..1 (e.g. 0.1)")


def _typed(parse):
    """argparse reports a type function's ValueError (UserError is one) without its text; an
    ArgumentTypeError keeps it: `error: arguments: argument --flag: what is wrong`."""
    def wrapped(text: str):
        try:
            return parse(text)
        except UserError as e:
            raise argparse.ArgumentTypeError(e.message) from None
    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def add_setting_flags(parser: argparse.ArgumentParser, defaults) -> None:
    """One flag per setting (dest = the setting's path, default None so a flag given can be
    told apart from one left out); help shows the setting's help, valid values and the
    command's default."""
    from .core.config import SETTINGS, _fmt

    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in SETTINGS.values():
        group = groups.setdefault(spec.section, parser.add_argument_group(
            f"{spec.section} settings"))
        default = defaults.get(spec.path)
        shown = "empty" if default in ("", None) else _fmt(default)
        help_text = f"{spec.help} [{spec.range_text()}; default: {shown}]"
        if spec.not_built:
            help_text += " (not available yet)"
        help_text = help_text.replace("%", "%%")
        flags = [spec.cli_flag, *spec.aliases]
        if spec.kind is bool:
            group.add_argument(*flags, dest=spec.path, default=None, action=_BoolSetting,
                               help=help_text)
        else:
            metavar = "{" + ",".join(map(str, spec.choices)) + "}" if spec.choices else \
                {int: "N", float: "X", str: "TEXT"}[spec.kind]
            group.add_argument(*flags, dest=spec.path, default=None, metavar=metavar,
                               action=_StoreSetting, help=help_text)


def add_run_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """The flags of a training command (`demo`, `train`): --config, --warmup, --stop-after,
    --resume and one flag per setting."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="a run config (JSON or TOML, sections as in the settings table; "
                             "NAME.config.toml of an earlier run); flags override it")
    parser.add_argument("--warmup", type=_typed(warmup), default=None, metavar="N|RATIO",
                        help="LR warmup in steps, or as a ratio of the run when below 1")
    parser.add_argument("--stop-after", type=_typed(positive_int("--stop-after")), default=None,
                        metavar="N",
                        help="stop after step N as an interrupt would, saving the state to "
                             "resume from")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue the run saved in DIR (a NAME-state folder) to its end")
    add_setting_flags(parser, defaults)


def add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    from .demo import demo_defaults

    add_run_arguments(demo, demo_defaults())


def add_train_arguments(train: argparse.ArgumentParser) -> None:
    from .core.config import RunConfig

    train.add_argument("--allow-ckpt", action="store_true",
                       help="allow a pickled .ckpt / .pt checkpoint or VAE (unpickling runs any "
                            "code the file holds: only for files you trust)")
    train.add_argument("--device", default="auto", metavar="DEVICE",
                       help="auto (the first CUDA GPU, else the CPU), cpu, cuda or cuda:N")
    train.add_argument("--threads", type=_typed(positive_int("--threads", 1, 1024)), default=None,
                       metavar="N", help="CPU threads torch uses (default: torch's own)")
    add_run_arguments(train, RunConfig())


def given_settings(args) -> dict[str, str]:
    """{setting path: value as given} for the setting flags on the command line."""
    from .core.config import SETTINGS

    return {path: getattr(args, path) for path in SETTINGS if getattr(args, path, None) is not None}


def demo_run_config(args) -> tuple[Any, set[str], bool]:
    """(RunConfig, settings and flags given, whether settings came from a file) for `demo`.

    Order: the demo's defaults, then --config FILE, then the flags given. With --resume the
    saved run's config.json is used as it is."""
    from .demo import demo_defaults

    if getattr(args, "model.checkpoint", None) is not None and not args.resume:
        raise UserError("--checkpoint (model.checkpoint)", "the demo trains its own tiny model; "
                                                           "train on a checkpoint file with "
                                                           "`python -m lora_train_ext train "
                                                           "--checkpoint FILE`")
    return run_config(args, demo_defaults(), demo=True)


def train_run_config(args) -> tuple[Any, set[str], bool]:
    """(RunConfig, settings and flags given, whether settings came from a file) for `train`:
    the settings' defaults, then --config FILE, then the flags given; model.arch is the
    checkpoint's unless --arch is given (then the preflight checks that they agree). With
    --resume the saved run's config.json as it is."""
    from .core.config import RunConfig

    cfg, given, from_file = run_config(args, RunConfig(), demo=False)
    if args.resume or not cfg.model.checkpoint:
        return cfg, given, from_file
    arch = _checkpoint_arch(cfg.model.checkpoint, args.allow_ckpt)
    if arch and "model.arch" not in given:
        cfg.model.arch = arch
    return cfg, given, from_file


def _checkpoint_arch(path: str, allow_pickle: bool) -> str:
    """The checkpoint's arch from its tensor table, or '' (the preflight names the problem)."""
    from .core.models.checkpoint_file import CheckpointFile, detect_arch

    try:
        return detect_arch(CheckpointFile.open(path, allow_pickle).shapes)
    except UserError:
        return ""


def run_config(args, base, demo: bool) -> tuple[Any, set[str], bool]:
    """Settings over `base`: --config FILE, then the flags; with --resume the saved config.
    demo: the demo's rule that alpha follows a given rank."""
    from .core.config import RunConfig, read_config_file

    flags = given_settings(args)
    given = set(flags) | {d for d in RUN_FLAGS if getattr(args, d, None) is not None}
    if args.resume:
        extra = sorted(_flag(d) for d in given if d not in RESUME_FREE)
        if extra:
            raise UserError("--resume", "the run goes on with the settings saved in "
                                        f"{os.path.join(args.resume, 'config.json')}; "
                                        f"drop {', '.join(extra)}")
        from .core.trainer import STATE_FILE

        config_path = os.path.join(args.resume, "config.json")
        state_path = os.path.join(args.resume, STATE_FILE)
        if not (os.path.isfile(config_path) and os.path.isfile(state_path)):
            raise UserError("--resume", f"{args.resume} holds no saved run (expected config.json "
                                        f"and {STATE_FILE}, written by --save-state or --stop-after)")
        cfg = _named(lambda: RunConfig.read(config_path), "--resume")
        parent = os.path.dirname(os.path.abspath(args.resume))  # the run folder, wherever it is now
        if cfg.save.run_dir:
            cfg.save.run_dir = parent
        else:
            cfg.save.output_dir = parent
        if flags.get("save.save_state"):
            cfg.save.save_state = True
        return cfg, given, True

    cfg = base
    file_keys: set[str] = set()
    if args.config:
        if not os.path.isfile(args.config):
            raise UserError("--config", f"file not found: {args.config}")
        raw = _named(lambda: read_config_file(args.config), "--config")
        cfg = _named(lambda: RunConfig.from_dict(raw, base=cfg), "--config")
        file_keys = {f"{section}.{key}" for section, entries in raw.items()
                     if isinstance(entries, dict) for key in entries}
    sections: dict[str, dict[str, Any]] = {}
    for path, value in flags.items():
        section, key = path.split(".")
        sections.setdefault(section, {})[key] = value
    if args.warmup is not None:
        kind, amount = args.warmup
        sections.setdefault("optim", {}).update(
            warmup_steps=amount if kind == "steps" else 0,
            warmup_ratio=amount if kind == "ratio" else 0.0)
    try:
        cfg = RunConfig.from_dict(sections, base=cfg, validate=True)
        set_here = set(flags) | file_keys
        if "optim.lr" not in set_here and _adaptive(cfg.optim.optimizer):
            cfg.optim.lr = 1.0  # DAdapt* / Prodigy: the LR multiplies their own estimate
        if demo and "network.alpha" not in set_here and "network.rank" in set_here:
            cfg.network.alpha = float(cfg.network.rank)  # the demo's alpha = rank
        cfg.validate()
    except UserError as e:
        raise named_by_flag(e, given, bool(args.config)) from None
    return cfg, given, bool(args.config)


def _adaptive(name: str) -> bool:
    from .core.optim import get_spec

    try:
        return get_spec(name).adaptive
    except UserError:
        return False


def _named(make, flag: str):
    try:
        return make()
    except UserError as e:
        message = e.message if e.field == "config" else f"{e.field}: {e.message}"
        raise UserError(flag, message) from None


def named_by_flag(e: UserError, given: set[str], from_file: bool) -> UserError:
    """Config errors under the flag that set them: `--rank (network.rank): ...` (always, when
    no file gave settings; a setting from --config keeps its config name)."""
    from .core.errors import UserErrors

    def one(p: UserError) -> UserError:
        field = p.field
        if field in ("optim.warmup_steps", "optim.warmup_ratio") and "warmup" in given:
            return UserError(f"--warmup ({field})", p.message)
        if field == "resume" and "resume" in given:
            return UserError("--resume", p.message)
        from .core.config import SETTINGS

        if field in SETTINGS and (field in given or not from_file):
            return UserError(f"{_flag(field)} ({field})", p.message)
        return p

    problems = e.problems if isinstance(e, UserErrors) else [e]
    return UserErrors([one(p) for p in problems])


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m lora_train_ext",
                            description="Train, inspect and merge LoRA files (lora-train-ext).")
    sub = parser.add_subparsers(dest="command", parser_class=ArgumentParser)

    demo = sub.add_parser("demo",
                          help="train on a tiny SD1/SD2/SDXL-shaped model and the demo images",
                          description="Train on the tiny model: the demo, and a headless trainer "
                                      "for every training option. Flags override --config.")
    add_demo_arguments(demo)

    train = sub.add_parser(
        "train", help="train on a checkpoint file (SD1.x, SD2.x, SDXL), without the WebUI",
        description="Train a LoRA / LyCORIS on a checkpoint file (.safetensors as the WebUI loads "
                    "it): --checkpoint FILE --dataset DIR --out DIR, any setting as a flag. "
                    "Writes the same files as the tab, and NAME.config.toml (give it to --config "
                    "to run the same training again). Ctrl-C stops and saves the state (continue "
                    "with --resume OUT/NAME-state).")
    add_train_arguments(train)

    prev = sub.add_parser("preview", help="serve the Train LoRA tab with the tiny model (no WebUI)")
    prev.add_argument("--port", type=positive_int("--port", 1024, 65535), default=7861)
    prev.add_argument("--out", default="preview_out", help="folder for LoRA files and grids")

    chk = sub.add_parser("check-dataset", help="check a dataset folder before training")
    chk.add_argument("dir")
    chk.add_argument("--json", action="store_true", help="print one JSON object")
    chk.add_argument("--resolution", type=setting_type("data.resolution"), default="512",
                     help="512 or WxH (default 512)")
    chk.add_argument("--reg", default="", help="regularization images folder")
    chk.add_argument("--batch-size", type=setting_type("train.batch_size"), default=1)
    chk.add_argument("--repeats", type=setting_type("data.repeats"), default=1,
                     help="repeats for a flat folder (N_name folders carry their own)")

    sets = sub.add_parser("settings", help="list every run setting: default, valid values, help")
    sets.add_argument("--json", action="store_true", help="print one JSON list")

    insp = sub.add_parser("inspect", help="describe a LoRA / LyCORIS file")
    insp.add_argument("file")
    insp.add_argument("--json", action="store_true", help="print one JSON object")

    from .cli_files import add_file_commands  # merge, merge-loras, extract, resize
    COMMANDS.update(add_file_commands(sub))
    from .cli_configs import add_config_commands  # presets, import-config
    COMMANDS.update(add_config_commands(sub))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _used_flags.clear()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USER_ERROR
        handler = COMMANDS[args.command]
        return handler(args)
    except UserError as e:
        problems = getattr(e, "problems", [e])
        for p in problems:  # one line per problem
            print(f"error: {p}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingError as e:
        print(f"training failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # out of memory: what to lower, not a traceback
        if "out of memory" not in str(e).lower() and type(e).__name__ != "OutOfMemoryError":
            raise
        from .runs import describe_failure

        print(f"training failed: {describe_failure(e)}", file=sys.stderr)
        return 1


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_demo(args) -> int:
    from .core.distributed import env_world_size
    from .demo import run_demo

    if env_world_size() > 1:
        raise UserError("torchrun", "the demo runs in one process; under torchrun train on a "
                                    "checkpoint: torchrun --nproc_per_node N -m lora_train_ext "
                                    "train --checkpoint FILE ...")
    cfg, given, from_file = demo_run_config(args)
    try:
        result = run_demo(cfg=cfg, progress=StderrProgress(), stop_after=args.stop_after or 0,
                          resume_dir=args.resume or "", log=_log)
    except UserError as e:
        raise named_by_flag(e, given, from_file) from None
    print(json.dumps(result))
    return 0


EXIT_INTERRUPTED = 130


def cmd_train(args) -> int:
    """Exit 0 when the run finished (or stopped by --stop-after), 130 when Ctrl-C stopped it
    (its state saved), 2 on bad input (every problem, one line each).

    Under torchrun (WORLD_SIZE > 1) every process runs this: they join one process group
    (core/distributed.py), rank 0 prints and writes, the others print only their own failure."""
    from .core.distributed import launched

    with launched(args.device) as dist:
        if dist is None or dist.writes:
            return _train(args, dist)
        try:
            return _train(args, dist)
        except UserError:
            return EXIT_USER_ERROR  # the same inputs: rank 0 names the problems
        except TrainingError as e:
            if str(e).startswith("process "):
                raise
            raise TrainingError(f"process {dist.rank} of {dist.world}: {e}") from None


def _quiet(line: str) -> None:
    pass


def _train(args, dist) -> int:
    import torch

    from .core.errors import UserErrors
    from .core.preflight import preflight
    from .headless import pick_device, train_on_checkpoint

    writes = dist is None or dist.writes
    cfg, given, from_file = train_run_config(args)
    device = pick_device(args.device) if dist is None else dist.device
    if args.threads:
        torch.set_num_threads(args.threads)
    problems: list[UserError] = []
    if not cfg.model.checkpoint:
        problems.append(UserError("model.checkpoint", "give the checkpoint file to train on "
                                                      "(--checkpoint FILE)"))
    if not cfg.save.output_dir:
        problems.append(UserError("save.output_dir", "give the folder for the files (--out DIR)"))
    problems += preflight(cfg, device=device, dataset=not args.resume,
                          allow_pickle=args.allow_ckpt).problems
    if args.resume:  # before the checkpoint is loaded: resumed with as many processes
        from .core.distributed import check_resume, saved_world_size, world_size

        saved = saved_world_size(args.resume)
        if saved is not None:
            try:
                check_resume(saved, world_size(dist), args.resume)
            except UserError as e:
                problems.append(e)
    if problems:
        raise named_by_flag(UserErrors(problems), given, from_file)
    t0 = time.time()
    try:
        run = train_on_checkpoint(cfg, progress=StderrProgress() if writes else None,
                                  stop_after=args.stop_after or 0,
                                  resume_dir=args.resume or "", allow_ckpt=args.allow_ckpt,
                                  device=device, log=_log if writes else _quiet, checked=True,
                                  interruptible=True, dist=dist)
    except UserError as e:
        raise named_by_flag(e, given, from_file) from None
    if not writes:
        return EXIT_INTERRUPTED if run.interrupted else 0
    r, info = run.result, run.load
    print(json.dumps({
        "lora_path": os.path.abspath(r.path),
        "config_path": os.path.abspath(run.config_path),
        "checkpoint": info.path, "arch": info.arch, "prediction": info.prediction,
        "prediction_from": info.how, "model_hash": info.sha256[:10],
        "base_dtype": info.base_dtype, "device": str(device), "load_seconds": info.seconds,
        "steps": r.steps, "total_steps": r.total_steps, "stopped": r.stopped,
        "state_dir": os.path.abspath(r.state_dir) if r.state_dir else "",
        "first_loss": round(r.first_loss, 6), "final_loss": round(r.final_loss, 6),
        "warnings": r.warnings, "snapshots": [os.path.abspath(p) for p in r.snapshots],
        "history_path": os.path.abspath(r.history_path) if r.history_path else "",
        "modules": r.modules, "seconds": round(time.time() - t0, 2),
    }))
    if run.interrupted:
        how = "python -m" if dist is None else f"torchrun --nproc_per_node {dist.world} -m"
        _log(f"stopped at step {r.steps} of {r.total_steps}; continue with: {how} "
             f"lora_train_ext train --resume {r.state_dir}")
        return EXIT_INTERRUPTED
    return 0


def cmd_inspect(args) -> int:
    from .core.inspect import describe, format_report

    report = describe(args.file)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def cmd_preview(args) -> int:
    from .preview import serve

    serve(port=args.port, out_dir=args.out)
    return 0


def cmd_check_dataset(args) -> int:
    """Exit 0 when the dataset can be trained on, 1 when it has no usable image."""
    from .core.config import DataConfig, parse_resolution
    from .core.data import check_dataset

    if not os.path.isdir(args.dir):
        raise UserError("dir", f"folder not found: {args.dir}")
    if args.reg and not os.path.isdir(args.reg):
        raise UserError("--reg", f"folder not found: {args.reg}")
    parse_resolution(args.resolution)
    cfg = DataConfig(dataset_dir=args.dir, reg_dir=args.reg, resolution=args.resolution,
                     repeats=args.repeats)
    report = check_dataset(cfg, args.batch_size)
    print(report.to_json() if args.json else report.summary_text())
    return 0 if report.ok else 1


def cmd_settings(args) -> int:
    from .core.config import settings_json, settings_markdown

    print(json.dumps(settings_json()) if args.json else settings_markdown(), end="" if not args.json else "\n")
    return 0


COMMANDS = {"settings": cmd_settings, "demo": cmd_demo, "train": cmd_train, "inspect": cmd_inspect,
            "preview": cmd_preview, "check-dataset": cmd_check_dataset}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
