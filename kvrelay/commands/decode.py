"""``kvrelay decode``: run a decode worker (flags or KVRELAY_* variables configure it)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from decode_service.config import DecodeConfig
from kvrelay.serving import settings
from kvrelay.serving.logs import configure_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, DecodeConfig)


def main(args: argparse.Namespace) -> int:
    try:
        config = settings.from_args(DecodeConfig, args)
    except ValueError as exc:
        print(f"kvrelay decode: {exc}", file=sys.stderr)
        return 2
    configure_logging("decode", config.log_level)
    from decode_service.server import run  # torch loads only once the flags are good

    asyncio.run(run(config))
    return 0
