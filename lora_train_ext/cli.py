"""Command line: `python -m lora_train_ext {demo,inspect,...}`.

User errors exit with code 2 and one line naming the field and what is valid; no traceback.
Progress goes to stderr; a command's result is the last stdout line (JSON) where it has one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from .core.errors import TrainingError, UserError

EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a one-line user error (exit 2)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
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


def number(name: str, low: float = 0.0, allow_zero: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise UserError(name, f"{text!r} is not a number") from None
        if not (value > low or (allow_zero and value == low)):
            raise UserError(name, f"{value} is out of range; give a number "
                                  f"{'>=' if allow_zero else '>'} {low}")
        return value
    return parse


class StderrProgress:
    """A one-line progress bar on stderr: step/total, loss, rate, ETA."""

    def __init__(self, stream=sys.stderr, width: int = 24):
        self.stream = stream
        self.width = width
        self.is_tty = stream.isatty()
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
        elif event.kind in ("log", "snapshot") and (event.message or event.path):
            self.stream.write(f"{event.message or 'snapshot: ' + event.path}\n")
            self.stream.flush()


# -- demo: the headless trainer's flags -----------------------------------------------------------
# flag (argparse dest) -> the RunConfig field it sets; --warmup sets steps or a ratio
DEMO_FIELDS = {
    "out": "save.output_dir", "steps": "train.max_steps", "epochs": "train.epochs",
    "seed": "train.seed", "rank": "network.rank", "alpha": "network.alpha", "lr": "optim.lr",
    "unet_lr": "optim.unet_lr", "te_lr": "optim.te_lr", "train_on": "network.train_on",
    "batch_size": "train.batch_size", "grad_accum": "train.grad_accum",
    "dataset": "data.dataset_dir", "optimizer": "optim.optimizer",
    "optimizer_args": "optim.optimizer_args", "scheduler": "optim.scheduler",
    "warmup": "optim.warmup_steps", "loss": "loss.loss", "min_snr_gamma": "loss.min_snr_gamma",
    "noise_offset": "loss.noise_offset", "save_every": "save.save_every_steps",
    "save_every_epochs": "save.save_every_epochs", "keep_last": "save.keep_last",
    "save_dtype": "save.save_dtype", "save_state": "save.save_state",
    "arch": "model.arch", "prediction": "model.prediction", "algo": "network.algo",
}
# flags that do not change what a resumed run computes
RESUME_FLAGS = ("resume", "stop_after", "save_state")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def choice(valid: tuple[str, ...]):
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in valid:
            raise UserError("value", f"{text!r} is not valid; choose one of {', '.join(valid)}")
        return value
    return parse


def optimizer_name(text: str) -> str:
    from .core.optim import canonical_name

    return canonical_name(text)


def optimizer_args(text: str) -> str:
    from .core.optim import parse_optimizer_args

    parse_optimizer_args(text)
    return text


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


def add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    """Every default is None (the demo's own defaults apply), so a flag given can be told apart
    from one left out: given flags override --config, and errors name the flag."""
    from .core.config import ALGOS, ARCHES, LOSSES, SAVE_DTYPES, SCHEDULERS, TARGETS

    def add(flag: str, parse=None, help: str = "", **kw) -> None:
        if parse is not None:
            kw["type"] = _typed(parse)
        demo.add_argument(flag, default=None, help=help or None, **kw)

    def count(flag: str, low: int = 1, high: int = 10**7):
        return positive_int(flag, low, high)

    add("--out", help="output folder (default: demo_out)")
    add("--config", metavar="FILE",
        help="a run config (JSON or TOML, sections as RunConfig); flags override it")
    add("--dataset", help="dataset folder (default: the shipped demo images)")
    add("--steps", count("--steps"), "optimizer steps (default: 120)")
    add("--epochs", count("--epochs", 1, 10**6), "train this many epochs instead of --steps")
    add("--seed", count("--seed", 0, 2**63 - 1))
    add("--rank", count("--rank", 1, 1024), "LoRA rank (default: 8)")
    add("--alpha", number("--alpha"), "LoRA alpha (default: rank)")
    add("--batch-size", count("--batch-size", 1, 10000), "default: 4")
    add("--grad-accum", count("--grad-accum", 1, 1024))
    add("--train-on", choice(TARGETS), f"{' | '.join(TARGETS)} (default: both)")
    add("--arch", choice(ARCHES), f"the tiny model's architecture: {' | '.join(ARCHES)} "
                                  "(default: sd1)")
    add("--prediction", choice(("epsilon", "v")),
        "epsilon | v (default: the arch's own, v for sd2 (SD2.1-768), epsilon otherwise)")
    add("--algo", choice(ALGOS), f"{' | '.join(ALGOS)} (default: lora)")
    add("--optimizer", optimizer_name,
        "AdamW (default), AdamW8bit, Adam, SGD, SGDNesterov, RMSprop, Lion, AdaFactor, "
        "DAdaptAdam, DAdaptLion, DAdaptAdaGrad, Prodigy, AdamWScheduleFree, SGDScheduleFree")
    add("--optimizer-args", optimizer_args, 'e.g. "weight_decay=0.01 betas=0.9,0.999 d_coef=2"',
        metavar='"K=V ..."')
    add("--lr", number("--lr", allow_zero=False),
        "learning rate (default: 1e-3; 1.0 for DAdapt*/Prodigy)")
    add("--unet-lr", number("--unet-lr"), "UNet LR (0: do not train it)")
    add("--te-lr", number("--te-lr"), "text encoder LR (0: do not train it)")
    add("--scheduler", choice(SCHEDULERS), f"{' | '.join(SCHEDULERS)} (default: constant)")
    add("--warmup", warmup, "LR warmup in steps, or as a ratio of the run when below 1",
        metavar="N|RATIO")
    add("--loss", choice(LOSSES), f"{' | '.join(LOSSES)} (default: mse)")
    add("--min-snr-gamma", number("--min-snr-gamma"), "min-SNR weighting gamma, e.g. 5 (0: off)")
    add("--noise-offset", number("--noise-offset"), "e.g. 0.05 (0: off)")
    add("--save-every", count("--save-every"), "write a snapshot every N steps", metavar="N")
    add("--save-every-epochs", count("--save-every-epochs", 1, 10**6),
        "write a snapshot every N epochs", metavar="N")
    add("--keep-last", count("--keep-last", 0), "keep only the last K snapshots (0: all)",
        metavar="K")
    add("--save-dtype", choice(SAVE_DTYPES), f"{' | '.join(SAVE_DTYPES)} (default: fp32)")
    add("--save-state", help="also save the full training state (NAME-state/) to resume from",
        action="store_true")
    add("--stop-after", count("--stop-after"),
        "stop after step N as an interrupt would, saving the state to resume from", metavar="N")
    add("--resume", help="continue the run saved in DIR (a NAME-state folder) to its end",
        metavar="DIR")


def demo_run_config(args) -> tuple[Any, set[str], bool]:
    """(RunConfig, flags given, whether the settings came from a file) for `demo`.

    Order: the demo's defaults, then --config FILE, then the flags given. With --resume the
    saved run's config.json is used as it is."""
    from .core.config import RunConfig, _load_toml
    from .demo import demo_defaults

    given = {dest for dest in DEMO_FIELDS.keys() | {"config", "stop_after", "resume"}
             if getattr(args, dest, None) is not None}
    if args.resume:
        extra = sorted(_flag(d) for d in given if d not in RESUME_FLAGS)
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
        cfg.save.output_dir = os.path.dirname(os.path.abspath(args.resume))
        if args.save_state:
            cfg.save.save_state = True
        return cfg, given, True

    values = demo_defaults().to_dict()
    file_keys: set[str] = set()
    if args.config:
        path = args.config
        if not os.path.isfile(path):
            raise UserError("--config", f"file not found: {path}")
        full = _named(lambda: RunConfig.read(path), "--config").to_dict()  # checks every key
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        raw = _load_toml(text) if path.endswith(".toml") else json.loads(text)
        for section, entries in raw.items():  # only what the file sets overrides the demo
            if isinstance(entries, dict):
                for key in entries:
                    values[section][key] = full[section][key]
                    file_keys.add(f"{section}.{key}")
    for dest in given & DEMO_FIELDS.keys():
        section, key = DEMO_FIELDS[dest].split(".")
        value = getattr(args, dest)
        if dest == "warmup":
            kind, amount = value
            values["optim"]["warmup_steps"] = amount if kind == "steps" else 0
            values["optim"]["warmup_ratio"] = amount if kind == "ratio" else 0.0
            continue
        values[section][key] = value
    if "lr" not in given and "optim.lr" not in file_keys and \
            _adaptive(values["optim"]["optimizer"]):
        values["optim"]["lr"] = 1.0  # DAdapt* / Prodigy: the LR multiplies their own estimate
    if "alpha" not in given and "network.alpha" not in file_keys and \
            ("rank" in given or "network.rank" in file_keys):
        values["network"]["alpha"] = float(values["network"]["rank"])  # the demo's alpha = rank
    try:
        cfg = RunConfig.from_dict(values).validate()
    except UserError as e:
        raise _named_by_flag(e, given, bool(args.config)) from None
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


def _named_by_flag(e: UserError, given: set[str], from_file: bool) -> UserError:
    """A config field's error under the flag that set it (always, when no file gave settings)."""
    for dest, field_name in DEMO_FIELDS.items():
        if e.field == field_name or (dest == "warmup" and e.field == "optim.warmup_ratio"):
            if dest in given or not from_file:
                return UserError(_flag(dest), e.message)
    if e.field == "resume" and "resume" in given:
        return UserError("--resume", e.message)
    return e


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m lora_train_ext",
                            description="Train, inspect and merge LoRA files (lora-train-ext).")
    sub = parser.add_subparsers(dest="command", parser_class=ArgumentParser)

    demo = sub.add_parser("demo",
                          help="train on a tiny SD1/SD2/SDXL-shaped model and the demo images",
                          description="Train on the tiny model: the demo, and a headless trainer "
                                      "for every training option. Flags override --config.")
    add_demo_arguments(demo)

    prev = sub.add_parser("preview", help="serve the Train LoRA tab with the tiny model (no WebUI)")
    prev.add_argument("--port", type=positive_int("--port", 1024, 65535), default=7861)
    prev.add_argument("--out", default="preview_out", help="folder for LoRA files and grids")

    chk = sub.add_parser("check-dataset", help="check a dataset folder before training")
    chk.add_argument("dir")
    chk.add_argument("--json", action="store_true", help="print one JSON object")
    chk.add_argument("--resolution", default="512", help="512 or WxH (default 512)")
    chk.add_argument("--reg", default="", help="regularization images folder")
    chk.add_argument("--batch-size", type=positive_int("--batch-size", 1, 10000), default=1)
    chk.add_argument("--repeats", type=positive_int("--repeats", 1, 100000), default=1,
                     help="repeats for a flat folder (N_name folders carry their own)")

    insp = sub.add_parser("inspect", help="describe a LoRA / LyCORIS file")
    insp.add_argument("file")
    insp.add_argument("--json", action="store_true", help="print one JSON object")

    from .cli_files import add_file_commands  # merge, merge-loras, extract, resize
    COMMANDS.update(add_file_commands(sub))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USER_ERROR
        handler = COMMANDS[args.command]
        return handler(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingError as e:
        print(f"training failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_demo(args) -> int:
    from .demo import run_demo

    cfg, given, from_file = demo_run_config(args)
    try:
        result = run_demo(cfg=cfg, progress=StderrProgress(), stop_after=args.stop_after or 0,
                          resume_dir=args.resume or "")
    except UserError as e:
        raise _named_by_flag(e, given, from_file) from None
    print(json.dumps(result))
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


COMMANDS = {"demo": cmd_demo, "inspect": cmd_inspect, "preview": cmd_preview,
            "check-dataset": cmd_check_dataset}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
