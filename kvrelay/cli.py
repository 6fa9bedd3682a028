"""The ``kvrelay`` command: one subcommand per module in ``kvrelay/commands``.

Each command module exposes ``add_arguments(parser)`` and ``main(args) -> int`` and is
listed in ``COMMANDS`` (name -> module path, help). Modules are imported only when their
command runs, so ``kvrelay kv-size`` never pays for grpc and ``kvrelay generate`` never
pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("kvrelay.commands.run", "generate in-process with no services (the monolithic reference)"),
    "kv-size": ("kvrelay.commands.kv_size", "print the KV-cache bytes per token and for N tokens"),
    "up": ("kvrelay.commands.up", "start a local cluster: redis-server, a prefill and a decode worker"),
    "generate": ("kvrelay.commands.generate", "send a Generate request to a decode worker"),
    "prefill": ("kvrelay.commands.prefill", "run a prefill worker"),
    "decode": ("kvrelay.commands.decode", "run a decode worker (the Generate front door)"),
    "demo": ("kvrelay.commands.demo", "start a local cluster and send shared-prefix requests"),
}


def _build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="kvrelay", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (path, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(path)
            module.add_arguments(p)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, module = _build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(module.main(args) or 0)  # type: ignore[union-attr]
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
