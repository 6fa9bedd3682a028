"""Safetensors weights: find a directory's files, digest them, load them into a module.

Tensors are read with ``safetensors.safe_open`` straight onto the target device and copied
into the module's preallocated parameters, which casts to the module's dtype in the same
copy: at most one tensor is in flight besides the model itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some checkpoints carry that are derived state, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightsError(ValueError):
    """Weights that do not fit the model: names the file and tensor at fault."""


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of ``directory``: the shards its index names, or model.safetensors."""
    index = directory / INDEX_FILE
    if index.is_file():
        return _shards(index)
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    raise WeightsError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{index} is not a valid safetensors index: {e!r}") from e
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise WeightsError(f"{index.name} names shard {f.name}, which does not exist")
    return files


def weights_digest(files: Iterable[Path]) -> str:
    """Hex SHA-256 over the files' names and bytes, in name order."""
    outer = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        with f.open("rb") as fh:
            inner = hashlib.file_digest(fh, "sha256")
        outer.update(f.name.encode() + b"\0" + inner.digest())
    return outer.hexdigest()


def load_weights(model: nn.Module, files: list[Path], device: torch.device) -> None:
    """Copy every tensor of ``files`` into ``model``'s state of the same name.

    Parameters shared under several names (tied embeddings) need only one of them in the
    files. Raises ``WeightsError`` for a missing, unexpected or wrongly shaped tensor.
    """
    targets = model.state_dict(keep_vars=True)
    located = _locate(files)
    unexpected = sorted(n for n in located
                        if n not in targets and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise WeightsError(f"unexpected tensor(s) in the weights: {_names(unexpected)}")
    chosen: dict[int, str] = {}  # id of a target tensor -> the one name it is loaded from
    for name, tensor in targets.items():
        if name in located:
            chosen.setdefault(id(tensor), name)
    missing = [name for name, t in targets.items() if id(t) not in chosen]
    if missing:
        raise WeightsError(f"missing tensor(s) in the weights: {_names(missing)}")
    for f in files:
        names = [n for n in chosen.values() if located[n] == f]
        _copy_from(f, names, targets, device)


def _locate(files: list[Path]) -> dict[str, Path]:
    located: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                located.update((name, f) for name in st.keys())  # noqa: SIM118 (not iterable)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightsError(f"{f.name} is not a valid safetensors file: {e}") from e
    return located


@torch.no_grad()
def _copy_from(file: Path, names: list[str], targets: dict[str, torch.Tensor],
               device: torch.device) -> None:
    with safe_open(str(file), framework="pt", device=str(device)) as st:
        for name in names:
            shape = tuple(st.get_slice(name).get_shape())
            target = targets[name]
            if shape != tuple(target.shape):
                raise WeightsError(f"tensor {name!r} in {file.name} has shape {shape}; "
                                   f"the config implies {tuple(target.shape)}")
            target.copy_(st.get_tensor(name))


def _names(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
