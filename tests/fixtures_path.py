"""Where the shared reference fixtures live, for any test: `from fixtures_path import ...`.

The fixtures (real models' key names and shapes, kohya module lists) sit in `shared/fixtures`
beside the repository checkout; tests that need them skip when they are absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixture_file(*parts: str) -> Path:
    """FIXTURES_DIR / parts; skips the calling test when the file is absent."""
    path = FIXTURES_DIR.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"fixture not found: {path}")
    return path


def parse_shape(text: str) -> tuple[int, ...]:
    """'320x320x1x1' -> (320, 320, 1, 1); '' (a scalar) -> ()."""
    return tuple(int(n) for n in text.split("x")) if text else ()


def read_tsv(*parts: str) -> list[list[str]]:
    """Rows of a fixture TSV, split on tabs (a trailing empty field is kept)."""
    text = fixture_file(*parts).read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines() if line.strip()]
