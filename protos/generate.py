"""Generate the Python stubs of ``protos/kvrelay/v1/*.proto``: ``python -m protos.generate``.

The include root is the repository root, so the stubs import each other as
``protos.kvrelay.v1.<name>_pb2`` and land next to their ``.proto`` files. ``--out DIR``
writes the tree under another root instead (the drift test compares the two).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("protos") / "kvrelay" / "v1"


def proto_files() -> list[str]:
    """The .proto files, as paths relative to the repository root."""
    return sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / PROTO_DIR).glob("*.proto"))


def generate(out_root: Path) -> None:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out_root``."""
    (out_root / PROTO_DIR).mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *proto_files(),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its output above")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repo)")
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
