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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m lora_train_ext",
                            description="Train, inspect and merge LoRA files (lora-train-ext).")
    sub = parser.add_subparsers(dest="command", parser_class=ArgumentParser)

    demo = sub.add_parser("demo", help="train a LoRA on a tiny SD1-shaped model and the demo images")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--steps", type=positive_int("--steps"), default=120)
    demo.add_argument("--seed", type=positive_int("--seed", 0, 2**63 - 1), default=0)
    demo.add_argument("--rank", type=positive_int("--rank", 1, 1024), default=8)
    demo.add_argument("--alpha", type=number("--alpha"), default=None,
                      help="LoRA alpha (default: rank)")
    demo.add_argument("--lr", type=number("--lr", allow_zero=False), default=1e-3)
    demo.add_argument("--batch-size", type=positive_int("--batch-size", 1, 10000), default=4)
    demo.add_argument("--grad-accum", type=positive_int("--grad-accum", 1, 1024), default=1)
    demo.add_argument("--dataset", default="", help="dataset folder (default: the shipped demo images)")

    insp = sub.add_parser("inspect", help="describe a LoRA / LyCORIS file")
    insp.add_argument("file")
    insp.add_argument("--json", action="store_true", help="print one JSON object")
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

    result = run_demo(out_dir=args.out, steps=args.steps, seed=args.seed, rank=args.rank,
                      alpha=args.alpha, lr=args.lr, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, dataset=args.dataset,
                      progress=StderrProgress())
    print(json.dumps(result))
    return 0


def cmd_inspect(args) -> int:
    from .core.inspect import describe, format_report

    report = describe(args.file)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


COMMANDS = {"demo": cmd_demo, "inspect": cmd_inspect}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
