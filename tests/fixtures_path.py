"""Where the reference data lives, for any test: `from fixtures_path import ...`.

`tests/reference/` holds facts about the public models (every checkpoint tensor's name and shape
for SD1.5, SD2.1-v and SDXL; the module names a standard kohya LoRA / LoCon file carries), kept
in the repository so a fresh clone runs every test with nothing beside it. A missing file is a
failure, never a skip. `tests/reference/README.md` says how they were made.
"""

from __future__ import annotations

from pathlib import Path

FIXTURES_DIR = Path(__file__).resolve().parent / "reference"


def fixture_file(*parts: str) -> Path:
    """FIXTURES_DIR / parts; a missing file fails the test that asked for it."""
    path = FIXTURES_DIR.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"reference file missing from the repository: {path}")
    return path


def parse_shape(text: str) -> tuple[int, ...]:
    """'320x320x1x1' -> (320, 320, 1, 1); '' (a scalar) -> ()."""
    return tuple(int(n) for n in text.split("x")) if text else ()


def read_tsv(*parts: str) -> list[list[str]]:
    """Rows of a reference TSV, split on tabs (a trailing empty field is kept)."""
    text = fixture_file(*parts).read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines() if line.strip()]
