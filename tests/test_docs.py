"""docs/reliability.md names a test for every row: each one it names must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = {"R/": "tests/reliability/", "S/": "tests/services/", "C/": "tests/cachestore/"}
REFERENCE = re.compile(r"`((?:R/|S/|C/|tests/)[\w/]+\.py)::(\w+)")


def _path(ref: str) -> Path:
    for short, long in PREFIXES.items():
        if ref.startswith(short):
            return ROOT / (long + ref[len(short):])
    return ROOT / ref


def test_every_test_the_reliability_doc_names_exists() -> None:
    refs = REFERENCE.findall((ROOT / "docs" / "reliability.md").read_text(encoding="utf-8"))
    assert len(refs) > 50
    missing = [f"{f}::{name}" for f, name in refs
               if not _path(f).is_file()
               or not re.search(rf"^\s*(async )?def {name}\(", _path(f).read_text(), re.MULTILINE)]
    assert missing == []
