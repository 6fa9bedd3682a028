"""Untrusted bytes (from the store or the network) are never unpickled or torch.load-ed.

The rule covers every Python file outside tests/: such loaders execute code embedded in
the bytes they read, and kvrelay reads its KV blocks from a shared store.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(
    r"\b(pickle|cPickle|dill|cloudpickle|joblib|marshal|shelve)\.(loads?|Unpickler|open)\b"
    r"|\btorch\.load\s*\(|\bnumpy\.load\s*\(|\bnp\.load\s*\(.*allow_pickle\s*=\s*True"
    r"|^\s*import\s+(pickle|dill|cloudpickle|marshal|shelve)\b"
    r"|^\s*from\s+(pickle|dill|cloudpickle|marshal|shelve)\s+import\b"
)


def _source_files() -> list[Path]:
    skip = {"tests", ".git", "build", ".venv"}
    return [p for p in ROOT.rglob("*.py")
            if not skip.intersection(p.relative_to(ROOT).parts) and not p.name.endswith("_pb2.py")]


def unsafe_lines(files: list[Path], root: Path = ROOT) -> list[str]:
    hits = []
    for path in files:
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(root)}:{no}: {line.strip()}")
    return hits


def test_no_pickle_or_torch_load_outside_tests() -> None:
    files = _source_files()
    assert files, "found no source files to check"
    assert unsafe_lines(files) == []


def test_the_check_catches_each_forbidden_loader(tmp_path: Path) -> None:
    samples = ["pickle.loads(b)", "obj = torch.load(f)", "import pickle", "dill.load(f)",
               "from marshal import loads", "np.load(p, allow_pickle=True)"]
    for i, text in enumerate(samples):
        (tmp_path / f"m{i}.py").write_text(text + "\n")
    assert len(unsafe_lines(sorted(tmp_path.glob("*.py")), tmp_path)) == len(samples)
