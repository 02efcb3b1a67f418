"""The dataset check's result: counts, bucket histogram, problems, notes; JSON and text forms."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .scan import Problem

# In order of severity: the report lists problems in this order.
PROBLEM_KINDS = ("unreadable", "bad_repeat_folder", "duplicate_stem", "empty_caption",
                 "missing_caption", "too_small", "long_caption", "missing_mask")

_KIND_TITLES = {
    "duplicate_stem": "same file name with different extensions",
    "unreadable": "unreadable images (skipped)",
    "missing_caption": "images without a caption file",
    "empty_caption": "empty caption files",
    "too_small": "images enlarged more than 2x to fill their bucket",
    "bad_repeat_folder": "folders not in N_name form (skipped)",
    "long_caption": "captions over the token limit (cut)",
    "missing_mask": "images without a mask (trained on every pixel)",
}


def _problem_order(p: Problem) -> tuple[int, str]:
    rank = PROBLEM_KINDS.index(p.kind) if p.kind in PROBLEM_KINDS else len(PROBLEM_KINDS)
    return rank, p.path


@dataclass
class DatasetReport:
    """`images`: readable training images; `repeats_total`: images x repeats (one epoch of
    training images); `buckets`: "WxH" -> number of training images in that bucket."""

    dataset_dir: str = ""
    images: int = 0
    repeats_total: int = 0
    buckets: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    steps_per_epoch: int = 0
    batch_size: int = 1
    folders: dict[str, dict[str, int]] = field(default_factory=dict)
    reg_dir: str = ""
    reg_images: int = 0
    reg_repeats_total: int = 0  # regularization samples per epoch, after balancing
    reg_buckets: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there is something to train on (problems may still be worth a look)."""
        return self.images > 0

    def problem_counts(self) -> dict[str, int]:
        """kind -> count, in PROBLEM_KINDS order."""
        counts: dict[str, int] = {}
        for p in sorted(self.problems, key=_problem_order):
            counts[p.kind] = counts.get(p.kind, 0) + 1
        return counts

    def sort_problems(self) -> None:
        self.problems.sort(key=_problem_order)

    def to_dict(self) -> dict:
        out = {
            "images": self.images,
            "repeats_total": self.repeats_total,
            "buckets": dict(self.buckets),
            "problems": [p.to_dict() for p in self.problems],
            "steps_per_epoch": self.steps_per_epoch,
            "batch_size": self.batch_size,
            "folders": {k: dict(v) for k, v in self.folders.items()},
            "notes": list(self.notes),
        }
        if self.reg_dir:
            out.update(reg_images=self.reg_images, reg_repeats_total=self.reg_repeats_total,
                       reg_buckets=dict(self.reg_buckets))
        return out

    def to_json(self, indent: int | None = None) -> str:
        """One JSON object: images, repeats_total, buckets, problems [{path, kind, detail}], and
        the extra keys steps_per_epoch, batch_size, folders, notes (reg_* with a reg folder)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def summary_text(self, max_paths: int = 5) -> str:
        lines = [f"Dataset {self.dataset_dir}: {self.images} readable image(s), "
                 f"{self.repeats_total} with repeats"]
        for key, meta in self.folders.items():
            lines.append(f"  {key}: {meta['img_count']} image(s) x {meta['n_repeats']} "
                         f"repeat(s)")
        if self.reg_dir:
            lines.append(f"Regularization {self.reg_dir}: {self.reg_images} image(s), "
                         f"{self.reg_repeats_total} sample(s) per epoch")
        if self.buckets:
            hist = ", ".join(f"{k}: {v}" for k, v in self.buckets.items())
            lines.append(f"Buckets ({len(self.buckets)}): {hist}")
        lines.append(f"Steps per epoch at batch size {self.batch_size}: {self.steps_per_epoch}")
        if self.problems:
            lines.append(f"Problems ({len(self.problems)}):")
            for kind, count in self.problem_counts().items():
                lines.append(f"  {kind} x{count} - {_KIND_TITLES.get(kind, kind)}")
                shown = [p for p in self.problems if p.kind == kind][:max_paths]
                for p in shown:
                    lines.append(f"    {p.path}: {p.detail}")
                if count > len(shown):
                    lines.append(f"    ... and {count - len(shown)} more")
        else:
            lines.append("Problems: none")
        for note in self.notes:
            lines.append(f"Note: {note}")
        if not self.ok:
            lines.append("Nothing to train on: no readable images were found.")
        return "\n".join(lines)
