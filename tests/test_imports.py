"""Imports point one way: services -> engine, cachestore, stubs.

``engine`` imports neither grpc nor redis nor the stubs; ``cachestore`` imports neither
grpc nor the stubs nor engine's model code. Checked on the source (static imports) and
in a fresh interpreter (what importing every module actually loads).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "engine": ("grpc", "redis", "protos", "cachestore", "prefill_service", "decode_service", "kvrelay"),
    "cachestore": ("grpc", "protos", "engine.model", "engine.runner", "engine.engine",
                   "engine.loader", "prefill_service", "decode_service", "kvrelay"),
    # the gRPC plumbing both services share sits below them
    "kvrelay/serving": ("prefill_service", "decode_service", "kvrelay.commands", "kvrelay.cli"),
}


def _modules(package: str) -> list[str]:
    root = REPO_ROOT / package
    return sorted(".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in root.rglob("*.py"))


def _imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _violations(names: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names for b in banned if n == b or n.startswith(b + "."))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_source_imports_point_one_way(package: str) -> None:
    files = list((REPO_ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = {str(p.relative_to(REPO_ROOT)): v for p in files
           if (v := _violations(_imported_names(p), FORBIDDEN[package]))}
    assert not bad, f"forbidden imports: {bad}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_a_package_loads_nothing_forbidden(package: str) -> None:
    script = (
        "import importlib, json, sys\n"
        f"for m in {_modules(package)!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert not _violations(loaded, FORBIDDEN[package])


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import grpc.aio\nfrom redis import Redis\n")
    assert _violations(_imported_names(module), FORBIDDEN["engine"]) == ["grpc.aio", "redis", "redis.Redis"]
