"""The checked-in stubs are exactly what ``python -m protos.generate`` produces."""

from __future__ import annotations

from pathlib import Path

from protos.generate import PROTO_DIR, REPO_ROOT, generate


def _stub_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / PROTO_DIR).glob("*_pb2*.py*"))}


def test_checked_in_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = _stub_files(tmp_path)
    assert fresh, "protoc produced no stubs"
    checked_in = _stub_files(REPO_ROOT)
    stale = sorted(name for name in fresh.keys() | checked_in.keys()
                   if fresh.get(name) != checked_in.get(name))
    assert not stale, f"stubs drifted from the .proto files; run python -m protos.generate: {stale}"


def test_every_proto_field_and_message_is_documented() -> None:
    for proto in (REPO_ROOT / PROTO_DIR).glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            text = line.strip()
            declares = (text.startswith(("message ", "service ", "enum ", "rpc "))
                        or (text.endswith(";") and "=" in text and not text.startswith("//")))
            if declares and not text.startswith(("syntax", "package", "option")):
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} undocumented: {text}"
