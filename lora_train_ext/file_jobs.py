"""Merge, extract and resize on files, as runs: what the API's POST /merge-file, /merge-loras,
/extract and /resize queue through the RunManager (the same core functions as the command
line's `merge`, `merge-loras`, `extract` and `resize`, so the same inputs give the same file).

A body is checked whole before anything is queued: every problem is reported at once, each
naming its field (`UserErrors`, answered 422 like POST /runs). Files are named, not given as
paths, and stay inside the host's folders:

- checkpoints (`base`, `tuned`): a name in the checkpoint folder (a path below it works too,
  without `..`), `.safetensors` added when missing; a pickled `.ckpt` only with
  `"allow_ckpt": true` (reading one runs code from the file, as the CLI's --allow-ckpt);
- LoRA files (`loras`, `lora`): names of files in the Lora output folder, as the in-memory
  merge takes them (`NAME[:STRENGTH[:TE:UNET]]`, one per line or a list);
- `vae`: a name in the host's VAE folder;
- the output (`name`): a plain file name; a merged checkpoint goes to the checkpoint folder, a
  LoRA to the Lora output folder. An existing file is never overwritten (refused when asked,
  and again when the job starts, as another job may have written it meanwhile).

What only reading the files can tell (a LoRA that does not fit the checkpoint, mixed archs)
ends the run "failed" with the error and its field; `result.unmatched` lists the modules that
do not fit. Nothing is written then: the output goes through a temp file renamed into place
(core/fsio.py), which a failure or a stop removes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from .core.config import check_output_name
from .core.errors import UserError, UserErrors

JOB_KINDS = ("merge-file", "merge-loras", "extract", "resize")
PRECISIONS = ("fp16", "bf16", "fp32")
PICKLED = (".ckpt",)
MAX_RANK = 4096
# the core's errors name the command line's flags; the API's bodies have these fields
FLAG_FIELDS = {"--base": "base", "--tuned": "tuned", "--lora": "loras", "--out": "name",
               "--rank": "rank", "--conv-rank": "conv_rank", "--precision": "precision",
               "--vae": "vae", "--dynamic": "dynamic", "--clamp-quantile": "clamp_quantile",
               "--min-diff": "min_diff", "disk": "name"}

Progress = Callable[[int, int, str], None]


class JobStopped(Exception):
    """Raised from a job's progress callback when the run was asked to stop."""


@dataclass
class FileJob:
    kind: str
    name: str  # the output's name (no extension)
    out: str  # the output file
    unit: str  # what the progress counts: "tensors" or "modules"
    work: Callable[[Progress, Callable[[int], None]], dict]  # -> the report (to_dict)
    after: Callable[[str], None]  # make the new file usable (list / hot-load it)
    inputs: dict[str, Any] = field(default_factory=dict)  # what was asked, for the record

    def field_of(self, error: UserError) -> str:
        """The body's field a core error (naming a CLI flag) is about."""
        if error.field == "--lora" and self.kind == "resize":
            return "lora"
        return FLAG_FIELDS.get(error.field, error.field)


class _Body:
    """One request body's fields, read with every problem collected (none raised until
    `check`)."""

    def __init__(self, body: dict[str, Any], fields: tuple[str, ...]):
        self.body = body
        self.problems: list[UserError] = []
        for key in body:
            if key not in fields:
                self.problem(key, f"unknown field; valid: {', '.join(fields)}")

    def problem(self, key: str, message: str) -> None:
        self.problems.append(UserError(key, message))

    def check(self) -> None:
        if self.problems:
            raise UserErrors(self.problems)

    def text(self, key: str, required: bool = False) -> str:
        value = self.body.get(key)
        if value is None or value == "":
            if required:
                self.problem(key, "required")
            return ""
        if not isinstance(value, str):
            self.problem(key, "give a string")
            return ""
        return value.strip()

    def lines(self, key: str) -> str:
        """A string of lines or a list of strings, as one text."""
        value = self.body.get(key)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return "\n".join(value)
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        self.problem(key, "give a string (one LoRA per line) or a list of strings")
        return ""

    def integer(self, key: str, low: int, high: int, default: int | None = None,
                required: bool = False) -> int | None:
        value = self.body.get(key)
        if value is None:
            if required:
                self.problem(key, f"required; give a whole number {low}..{high}")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                self.problem(key, f"{value!r} is not a whole number; give {low}..{high}")
                return default
        if not low <= value <= high:
            self.problem(key, f"{value} is out of range; give {low}..{high}")
            return default
        return value

    def number(self, key: str, low: float, high: float, default: float,
               low_open: bool = False) -> float:
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(key, f"{value!r} is not a number")
            return default
        value = float(value)
        if not (low < value if low_open else low <= value) or not value <= high:
            self.problem(key, f"{value:g} is out of range; give {'>' if low_open else '>='} "
                              f"{low:g} and <= {high:g}")
            return default
        return value

    def flag(self, key: str) -> bool:
        value = self.body.get(key, False)
        if not isinstance(value, bool):
            self.problem(key, "give true or false")
            return False
        return value

    def precision(self, default: str | None) -> str | None:
        value = self.body.get("precision")
        if value is None:
            return default
        if value not in PRECISIONS:
            self.problem("precision", f"{value!r}; choose one of {', '.join(PRECISIONS)}")
            return default
        return value


def resolve_in(folder: str, name: str, key: str, what: str, allow_ckpt: bool = False,
               exts: tuple[str, ...] = (".safetensors",)) -> str:
    """The file `name` in `folder` (or a path below it; each of `exts`, then .ckpt, tried when
    it has none of them). Symlinks the user put in the folder are followed. UserError naming
    `key` when it is outside the folder, missing, or a .ckpt without `allow_ckpt`."""
    if os.path.isabs(name) or os.path.splitdrive(name)[0]:
        raise UserError(key, f"give the name of a {what} in {folder}, not a path")
    rel = os.path.normpath(name)
    if rel == os.curdir or rel.split(os.sep)[0] == os.pardir:
        raise UserError(key, f"{name!r} is outside the {what} folder {folder}")
    root = os.path.abspath(folder)
    full = os.path.join(root, rel)
    if os.path.commonpath([root, full]) != root:
        raise UserError(key, f"{name!r} is outside the {what} folder {folder}")
    known = exts + PICKLED
    candidates = [full] if full.lower().endswith(known) else [full + e for e in known]
    for path in candidates:
        if os.path.isfile(path):
            if path.lower().endswith(PICKLED) and not allow_ckpt:
                raise UserError(key, f"{os.path.basename(path)} is a pickled .ckpt: reading it "
                                     "runs code from the file; send \"allow_ckpt\": true to "
                                     "read it anyway")
            return path
    raise UserError(key, f"no {what} {name!r} in {folder}")


def _output(folder: str, name: str, b: _Body) -> str:
    if not name:
        return ""
    try:
        check_output_name(name)
    except UserError as e:
        b.problem("name", e.message)
        return ""
    path = os.path.join(os.path.abspath(folder), name + ".safetensors")
    if os.path.exists(path):
        b.problem("name", f"{name}.safetensors exists in {folder}; choose another name "
                          "(nothing is overwritten)")
        return ""
    return path


def _try(b: _Body, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except UserError as e:
        b.problems.extend(getattr(e, "problems", [e]))
        return None


def _loras(host, b: _Body, key: str = "loras", blocks: bool = True):
    from .merging import parse_merge_lines

    before = len(b.problems)
    text = b.lines(key)
    if len(b.problems) > before:
        return None
    if not text.strip():
        b.problem(key, "give at least one LoRA: NAME[:STRENGTH[:TE:UNET]], one per line "
                       "(names of files in the Lora folder)")
        return None
    specs = _try(b, lambda: parse_merge_lines(text, host.find_lora, key))
    if specs and not blocks and any(s.blocks for s in specs):
        b.problem(key, "block weights (blocks=...) apply when merging into a checkpoint, not "
                       "when merging LoRAs into one")
    return specs


def build_job(kind: str, host, body: dict[str, Any]) -> FileJob:
    """Check `body` for the job `kind` (every problem at once: UserErrors) and return the
    job, nothing done yet."""
    if kind not in JOB_KINDS:
        raise UserError("kind", f"{kind!r}; one of {', '.join(JOB_KINDS)}")
    return {"merge-file": _merge_file, "merge-loras": _merge_loras, "extract": _extract,
            "resize": _resize}[kind](host, body)


def _merge_file(host, body: dict[str, Any]) -> FileJob:
    from .core.merge import merge_checkpoint

    b = _Body(body, ("base", "loras", "name", "precision", "vae", "allow_ckpt"))
    allow = b.flag("allow_ckpt")
    ckpt_dir = host.checkpoint_dir()
    base_name = b.text("base", required=True)
    base = base_name and _try(b, lambda: resolve_in(ckpt_dir, base_name, "base", "checkpoint",
                                                     allow))
    specs = _loras(host, b)
    vae_name = b.text("vae")
    vae = vae_name and _try(b, lambda: resolve_in(host.vae_dir(), vae_name, "vae", "VAE",
                                                   allow))
    precision = b.precision(None)
    name = b.text("name", required=True)
    out = _output(ckpt_dir, name, b)
    b.check()

    def work(progress: Progress, on_start: Callable[[int], None]) -> dict:
        return merge_checkpoint(base, specs, out, precision=precision, vae=vae or None,
                                allow_ckpt=allow, progress=progress,
                                on_start=on_start).to_dict()

    return FileJob("merge-file", name, out, "tensors", work, lambda path: host.refresh_checkpoints(),
                   {"base": base, "loras": [s.to_dict() for s in specs], "vae": vae or None,
                    "precision": precision or "as base"})


def _merge_loras(host, body: dict[str, Any]) -> FileJob:
    from .core.merge import merge_loras

    b = _Body(body, ("loras", "name", "rank", "conv_rank", "precision"))
    specs = _loras(host, b, blocks=False)
    rank = b.integer("rank", 1, MAX_RANK)
    conv_rank = b.integer("conv_rank", 1, MAX_RANK)
    precision = b.precision(None)
    name = b.text("name", required=True)
    out = _output(host.output_dir(), name, b)
    b.check()

    def work(progress: Progress, on_start: Callable[[int], None]) -> dict:
        return merge_loras(specs, out, rank=rank, conv_rank=conv_rank, save_dtype=precision,
                           progress=progress).to_dict()

    return FileJob("merge-loras", name, out, "modules", work, lambda path: host.hot_load([path]),
                   {"loras": [s.to_dict() for s in specs], "rank": rank, "conv_rank": conv_rank})


def _extract(host, body: dict[str, Any]) -> FileJob:
    from .core.extract import extract_lora

    b = _Body(body, ("base", "tuned", "rank", "conv_rank", "clamp_quantile", "min_diff",
                     "name", "precision", "allow_ckpt"))
    allow = b.flag("allow_ckpt")
    ckpt_dir = host.checkpoint_dir()
    found = {}
    for key in ("base", "tuned"):
        given = b.text(key, required=True)
        found[key] = given and _try(b, lambda k=key, g=given: resolve_in(ckpt_dir, g, k,
                                                                         "checkpoint", allow))
    if found["base"] and found["tuned"] and os.path.samefile(found["base"], found["tuned"]):
        b.problem("tuned", "is the same file as base; nothing to extract")
    rank = b.integer("rank", 1, MAX_RANK, required=True)
    conv_rank = b.integer("conv_rank", 0, MAX_RANK, default=0)
    clamp = b.number("clamp_quantile", 0.0, 1.0, 1.0, low_open=True)
    min_diff = b.number("min_diff", 0.0, float("inf"), 0.0)
    precision = b.precision("fp16")
    name = b.text("name", required=True)
    out = _output(host.output_dir(), name, b)
    b.check()

    def work(progress: Progress, on_start: Callable[[int], None]) -> dict:
        return extract_lora(found["base"], found["tuned"], out, rank, conv_rank=conv_rank,
                            clamp_quantile=clamp, min_diff=min_diff, save_dtype=precision,
                            allow_ckpt=allow, progress=progress).to_dict()

    return FileJob("extract", name, out, "tensors", work, lambda path: host.hot_load([path]),
                   {"base": found["base"], "tuned": found["tuned"], "rank": rank,
                    "conv_rank": conv_rank})


def _resize(host, body: dict[str, Any]) -> FileJob:
    from .core.resize import parse_dynamic, resize_lora

    b = _Body(body, ("lora", "rank", "dynamic", "conv_rank", "name", "precision"))
    lora_name = b.text("lora", required=True)
    path = None
    if lora_name:
        try:
            path = host.find_lora(lora_name)
        except (FileNotFoundError, KeyError):
            b.problem("lora", f"no LoRA named {lora_name!r} in {host.output_dir()}")
    rank = b.integer("rank", 1, MAX_RANK)
    dynamic_text = b.text("dynamic")
    dynamic = None
    if dynamic_text:
        try:
            dynamic = parse_dynamic(dynamic_text)
        except UserError as e:
            b.problem("dynamic", e.message)
    elif rank is None and "rank" not in body:
        b.problem("rank", "give rank R or dynamic METHOD:X (sv_ratio:X, sv_cumulative:X, "
                          "sv_fro:X)")
    conv_rank = b.integer("conv_rank", 1, MAX_RANK)
    precision = b.precision(None)
    name = b.text("name", required=True)
    out = _output(host.output_dir(), name, b)
    b.check()

    def work(progress: Progress, on_start: Callable[[int], None]) -> dict:
        return resize_lora(path, out, rank=rank, dynamic=dynamic, conv_rank=conv_rank,
                           save_dtype=precision, progress=progress).to_dict()

    return FileJob("resize", name, out, "modules", work, lambda p: host.hot_load([p]),
                   {"lora": path, "rank": rank, "dynamic": dynamic_text or None})
