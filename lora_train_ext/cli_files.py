"""File tools on the command line: `merge`, `merge-loras`, `extract`, `resize`.

    python -m lora_train_ext merge --base CKPT --lora FILE[:STRENGTH[:TE:UNET]] ... --out FILE
           [--precision fp16|bf16|fp32] [--vae FILE] [--allow-ckpt]
    python -m lora_train_ext merge-loras --lora FILE[:STRENGTH] ... --out FILE [--rank R]
           [--conv-rank C] [--precision P]
    python -m lora_train_ext extract --base A --tuned B --rank R [--conv-rank C]
           [--clamp-quantile Q] [--min-diff D] --out FILE [--precision P] [--allow-ckpt]
    python -m lora_train_ext resize --lora FILE (--rank R | --dynamic sv_ratio:X |
           sv_cumulative:X | sv_fro:X) [--conv-rank C] --out FILE [--precision P]

As every command: progress and a text summary on stderr, the result as one JSON line last on
stdout, bad input exits 2 with one line naming the flag, and nothing is written on an error
(every file goes through a temp file renamed into place).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .core.errors import UserError

PRECISIONS = ("fp16", "bf16", "fp32")
MAX_RANK = 4096


def _rank(flag: str, low: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= MAX_RANK:
            raise argparse.ArgumentTypeError(f"{value} is out of range; give {low}..{MAX_RANK}")
        return value
    parse.__name__ = flag
    return parse


def _fraction(flag: str, low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(
                f"{value:g} is out of range; give {'>' if low_open else '>='} {low:g} and "
                f"<= {high:g}")
        return value
    parse.__name__ = flag
    return parse


def _precision(text: str) -> str:
    value = text.strip().lower()
    if value not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"{text!r}; choose one of {', '.join(PRECISIONS)}")
    return value


class ProgressLine:
    """One progress line on stderr (rewritten in place on a terminal, else at most one line a
    second, and always the last)."""

    def __init__(self, label: str, unit: str = "", stream=None):
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.time()
        self._last = 0.0

    def __call__(self, done: int, total: int, what: str = "") -> None:
        now = time.time()
        final = done >= total
        if not final and now - self._last < (0.2 if self.tty else 1.0):
            return
        self._last = now
        pct = 100.0 * done / max(1, total)
        if self.unit == "bytes":
            amount = f"{done / 2**20:,.0f}/{total / 2**20:,.0f} MiB"
        else:
            amount = f"{done}/{total}{' ' + self.unit if self.unit else ''}"
        line = f"{self.label}: {pct:5.1f}% {amount} {now - self.t0:6.1f}s"
        self.stream.write(("\r" if self.tty else "") + line + ("\n" if final or not self.tty else ""))
        self.stream.flush()


def add_file_commands(sub) -> dict:
    """Add the file tools' subparsers to `sub` (argparse subparsers); {name: handler}."""
    merge = sub.add_parser(
        "merge", help="merge LoRA / LyCORIS files into a checkpoint (streaming)",
        description="Merge LoRA / LyCORIS files into a single-file checkpoint (.safetensors), "
                    "streaming tensor by tensor. STRENGTH scales the whole file; TE and UNET "
                    "scale it further for the text encoders and the UNet.")
    merge.add_argument("--base", required=True, metavar="CKPT", help="the checkpoint")
    merge.add_argument("--lora", action="append", default=[],
                       metavar="FILE[:STRENGTH[:TE:UNET]]", help="repeat for several files")
    merge.add_argument("--out", required=True, metavar="FILE", help="the merged .safetensors")
    merge.add_argument("--precision", type=_precision, default=None,
                       help="fp16 | bf16 | fp32 (default: as the base)")
    merge.add_argument("--vae", metavar="FILE", help="bake this VAE's weights in")
    merge.add_argument("--allow-ckpt", action="store_true",
                       help="read pickled .ckpt files (this runs code from the file)")

    ml = sub.add_parser(
        "merge-loras", help="merge several LoRA files into one",
        description="Without --rank: exact (the ranks add up; LoRA / LoCon files). With --rank: "
                    "the SVD of each module's summed delta (any algorithm but IA3 / DoRA / OFT / "
                    "BOFT).")
    ml.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                    help="repeat for each file")
    ml.add_argument("--out", required=True, metavar="FILE")
    ml.add_argument("--rank", type=_rank("--rank"), default=None, metavar="R")
    ml.add_argument("--conv-rank", type=_rank("--conv-rank"), default=None, metavar="C",
                    help="rank of 3x3 conv modules (default: --rank)")
    ml.add_argument("--precision", type=_precision, default=None,
                    help="fp16 | bf16 | fp32 (default: the widest of the inputs)")

    ex = sub.add_parser(
        "extract", help="extract a LoRA from the difference of two checkpoints",
        description="A LoRA (LoCon with --conv-rank) of TUNED - BASE, by SVD per module.")
    ex.add_argument("--base", required=True, metavar="A")
    ex.add_argument("--tuned", required=True, metavar="B")
    ex.add_argument("--rank", required=True, type=_rank("--rank"), metavar="R")
    ex.add_argument("--conv-rank", type=_rank("--conv-rank", 0), default=0, metavar="C",
                    help="also extract the 3x3 convs at this rank (default 0: no)")
    ex.add_argument("--clamp-quantile", type=_fraction("--clamp-quantile", 0, 1, low_open=True),
                    default=1.0, metavar="Q",
                    help="clamp factor entries to this quantile of their magnitudes "
                         "(default 1: no clamping)")
    ex.add_argument("--min-diff", type=_fraction("--min-diff", 0, float("inf")), default=0.0,
                    metavar="D", help="skip modules whose max |difference| is at most D "
                                      "(default 0: identical ones)")
    ex.add_argument("--out", required=True, metavar="FILE")
    ex.add_argument("--precision", type=_precision, default="fp16", help="default fp16")
    ex.add_argument("--allow-ckpt", action="store_true",
                    help="read pickled .ckpt files (this runs code from the file)")

    rs = sub.add_parser(
        "resize", help="resize a LoRA file's rank by SVD",
        description="Per module, the SVD of its delta cut to --rank, or to a rank chosen from "
                    "the singular values with --dynamic (then --rank caps it).")
    rs.add_argument("--lora", required=True, metavar="FILE")
    rs.add_argument("--rank", type=_rank("--rank"), default=None, metavar="R")
    rs.add_argument("--dynamic", default=None, metavar="METHOD:X",
                    help="sv_ratio:X (keep s >= s_max / X), sv_cumulative:X (sum of kept s "
                         "reaches X of the total), sv_fro:X (their Frobenius norm reaches X)")
    rs.add_argument("--conv-rank", type=_rank("--conv-rank"), default=None, metavar="C",
                    help="rank of 3x3 conv modules (default: --rank)")
    rs.add_argument("--out", required=True, metavar="FILE")
    rs.add_argument("--precision", type=_precision, default=None,
                    help="fp16 | bf16 | fp32 (default: as the input)")
    return {"merge": cmd_merge, "merge-loras": cmd_merge_loras, "extract": cmd_extract,
            "resize": cmd_resize}


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_merge(args) -> int:
    from .core.merge import MergeMismatch, merge_checkpoint, parse_lora_spec

    specs = [parse_lora_spec(text, "--lora", per_part=True) for text in args.lora]
    try:
        report = merge_checkpoint(args.base, specs, args.out, precision=args.precision,
                                  vae=args.vae, allow_ckpt=args.allow_ckpt,
                                  progress=ProgressLine("merge", "bytes"))
    except MergeMismatch as e:
        print(json.dumps({"error": str(e), "unmatched": e.modules}))
        raise
    _say(f"merged {report.changed_modules} modules into {report.changed_tensors} tensors"
         + (f", baked {report.vae_tensors} VAE tensors" if report.vae_tensors else "")
         + f" ({report.arch}) -> {report.path} in {report.seconds:.1f}s")
    print(json.dumps(report.to_dict()))
    return 0


def cmd_merge_loras(args) -> int:
    from .core.merge import merge_loras, parse_lora_spec

    if not args.lora:
        raise UserError("--lora", "give the LoRA files to merge (--lora FILE[:STRENGTH], "
                                  "repeated)")
    specs = [parse_lora_spec(text, "--lora", per_part=False) for text in args.lora]
    report = merge_loras(specs, args.out, rank=args.rank, conv_rank=args.conv_rank,
                         save_dtype=args.precision, progress=ProgressLine("merge-loras", "modules"))
    energy = "" if report.kept_energy is None else f", kept energy {report.kept_energy:.6f}"
    _say(f"{report.mode}: {report.modules} modules, ranks {report.ranks}"
         + (f", conv ranks {report.conv_ranks}" if report.conv_ranks else "")
         + f"{energy} -> {report.path}")
    print(json.dumps(report.to_dict()))
    return 0


def cmd_extract(args) -> int:
    from .core.extract import extract_lora

    report = extract_lora(args.base, args.tuned, args.out, args.rank, conv_rank=args.conv_rank,
                          clamp_quantile=args.clamp_quantile, min_diff=args.min_diff,
                          save_dtype=args.precision, allow_ckpt=args.allow_ckpt,
                          progress=ProgressLine("extract", "tensors"))
    for note in report.notes():
        _say(note)
    _say(f"extracted {report.modules} modules ({report.parts}) at rank {report.rank}"
         + (f", conv rank {report.conv_rank}" if report.conv_rank else "")
         + f", kept energy {report.kept_energy:.6f} -> {report.path}")
    print(json.dumps(report.to_dict()))
    return 0


def cmd_resize(args) -> int:
    from .core.resize import parse_dynamic, resize_lora

    if args.rank is None and args.dynamic is None:
        raise UserError("--rank", "give --rank R or --dynamic METHOD:X")
    dynamic = parse_dynamic(args.dynamic) if args.dynamic else None
    report = resize_lora(args.lora, args.out, rank=args.rank, dynamic=dynamic,
                         conv_rank=args.conv_rank, save_dtype=args.precision,
                         progress=ProgressLine("resize", "modules"))
    _say(report.summary())
    print(json.dumps(report.to_dict()))
    return 0
