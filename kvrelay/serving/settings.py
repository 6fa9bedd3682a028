"""Frozen settings dataclasses filled from CLI flags, then ``KVRELAY_*`` variables, then defaults.

Only entry points call ``add_arguments`` and ``from_args``: nothing reads the environment
at import time. Each dataclass field becomes ``--field-name`` and ``KVRELAY_FIELD_NAME``;
its ``metadata["help"]`` is the flag's help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, Union, cast, get_args, get_origin, get_type_hints

T = TypeVar("T")
ENV_PREFIX = "KVRELAY_"


def _base_type(hint: Any) -> type:
    if get_origin(hint) in (Union, types.UnionType):
        return next(a for a in get_args(hint) if a is not type(None))
    return hint


def _parse(kind: type, raw: str) -> Any:
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    return kind(raw)


def _parser(kind: type) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        return _parse(kind, raw)
    return parse


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of the settings dataclass ``cls`` (default: unset)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        env = ENV_PREFIX + f.name.upper()
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            type=_parser(kind),
                            help=f"{f.metadata.get('help', '')} [env {env}; default {default!r}]")


def from_args(cls: type[T], args: argparse.Namespace, env: Mapping[str, str] | None = None) -> T:
    """Build ``cls``: a flag wins over ``KVRELAY_<NAME>``, which wins over the field default."""
    env = os.environ if env is None else env
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cast(Any, cls)):
        flag = getattr(args, f.name, None)
        raw = env.get(ENV_PREFIX + f.name.upper())
        if flag is not None:
            values[f.name] = flag
        elif raw is not None and raw != "":
            values[f.name] = _parse(_base_type(hints[f.name]), raw)
    return cls(**values)


def setting(default: Any, help: str) -> Any:
    """A settings field with its help text."""
    return dataclasses.field(default=default, metadata={"help": help})
