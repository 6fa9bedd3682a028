"""``kvrelay kv-size``: KV-cache bytes per token and for N tokens of a model.

bytes per token = 2 (K and V) x layers x KV heads x head_dim x bytes per element.
Only the model's config.json is read; no weights are loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BYTES_PER_ELEMENT = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="model directory or .gguf file (default: the demo model)")
    parser.add_argument("--dtype", default="float32", choices=sorted(BYTES_PER_ELEMENT),
                        help="KV element type")
    parser.add_argument("--tokens", type=int, required=True, help="number of tokens N")


def _config_dir(model: str | None) -> Path:
    if model is not None and (Path(model) / "config.json").is_file():
        return Path(model)
    from engine.loader import default_model_path, model_directory  # needs torch: only here

    return model_directory(Path(model if model is not None else default_model_path()))


def _human(n: int) -> str:
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"


def main(args: argparse.Namespace) -> int:
    from engine.config import ModelConfig

    if args.tokens < 0:
        raise SystemExit("kvrelay kv-size: --tokens must be >= 0")
    directory = _config_dir(args.model)
    config = ModelConfig.from_hf(json.loads((directory / "config.json").read_text()))
    elem = BYTES_PER_ELEMENT[args.dtype]
    per_token = config.kv_bytes_per_token_per_element * elem
    print(f"model: {directory.name} ({config.num_layers} layers, {config.num_kv_heads} KV heads "
          f"x head_dim {config.head_dim}), KV dtype {args.dtype}")
    print(f"per token: 2 x {config.num_layers} x {config.num_kv_heads} x {config.head_dim} x "
          f"{elem} B = {per_token:,} B ({_human(per_token)})")
    print(f"{args.tokens:,} tokens: {per_token * args.tokens:,} B ({_human(per_token * args.tokens)})")
    return 0
