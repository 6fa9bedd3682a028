"""``kvrelay prefill``: run a prefill worker (flags or KVRELAY_* variables configure it)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from kvrelay.serving import settings
from kvrelay.serving.logs import configure_logging
from prefill_service.config import PrefillConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, PrefillConfig)


def main(args: argparse.Namespace) -> int:
    try:
        config = settings.from_args(PrefillConfig, args)
    except ValueError as exc:
        print(f"kvrelay prefill: {exc}", file=sys.stderr)
        return 2
    configure_logging("prefill", config.log_level)
    from prefill_service.server import run  # torch loads only once the flags are good

    asyncio.run(run(config))
    return 0
