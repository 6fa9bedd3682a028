"""The checked-in stubs are exactly what ``python -m protos.generate`` produces, apart from
the generator's own version stamps.

A newer grpcio-tools (or the protoc inside it) writes its version into every stub: the
grpc stubs' ``GRPC_GENERATED_VERSION`` and the message stubs' ``Protobuf Python Version``
comment and runtime check. The checked-in stamps are the lowest versions the stubs accept
at run time (``pyproject.toml``), so a patch release of the generator is not drift of the
.proto files; anything else that differs is.
"""

from __future__ import annotations

import re
from pathlib import Path

from protos.generate import PROTO_DIR, REPO_ROOT, generate

_STAMPS = (
    re.compile(rb"^GRPC_GENERATED_VERSION = '[^']*'$", re.MULTILINE),
    re.compile(rb"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(rb"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,[^)]*\)"),
)


def _without_stamps(text: bytes) -> bytes:
    for stamp in _STAMPS:
        text = stamp.sub(b"<generator version>", text)
    return text


def _stub_files(root: Path) -> dict[str, bytes]:
    return {p.name: _without_stamps(p.read_bytes())
            for p in sorted((root / PROTO_DIR).glob("*_pb2*.py*"))}


def test_version_stamps_are_all_that_is_left_out() -> None:
    stub = (REPO_ROOT / PROTO_DIR / "generation_pb2_grpc.py").read_bytes()
    assert _without_stamps(stub).count(b"<generator version>") == 1
    message_stub = _without_stamps((REPO_ROOT / PROTO_DIR / "generation_pb2.py").read_bytes())
    assert message_stub.count(b"<generator version>") == 2
    assert b"GenerateRequest" in message_stub  # the rest is compared as it is


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
