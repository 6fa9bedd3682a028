"""Moving whole KV blocks between a ``ModelRunner`` and the prefix cache.

Runs on the compute thread (it touches the runner). Exported payloads are copies, so a
block can be freed or reused while its bytes are still on their way to the store; block
views are not, for a caller that keeps the blocks until their bytes are sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.runner import ModelRunner, RunnerSequence


@dataclass
class _LeadingBlocks:
    """A runner view of a sequence's first full blocks; shares its block table."""

    token_ids: list[int]
    num_computed: int
    block_table: list[int]


def prefill_full_blocks(runner: ModelRunner, seq: RunnerSequence, num_blocks: int) -> int:
    """Compute K/V of ``seq``'s first ``num_blocks`` full blocks on top of what it holds.

    Returns the tokens computed (0 when those blocks are already held).
    """
    end = num_blocks * runner.block_size
    if end <= seq.num_computed:
        return 0
    view = _LeadingBlocks(seq.token_ids[:end], seq.num_computed, seq.block_table)
    start = seq.num_computed
    runner.prefill([view])
    seq.num_computed = view.num_computed
    return end - start


def export_blocks(runner: ModelRunner, seq: RunnerSequence, first: int, last: int) -> list[np.ndarray]:
    """Copies of blocks ``[first, last)`` as byte arrays, (L, 2, bs, kvh, hd) each in memory,
    in the pool's wire dtype."""
    if _converts(runner):
        return wire_blocks(runner, seq, first, last)
    return [runner.export_block(seq, i).cpu().view(torch.uint8).numpy().copy()
            for i in range(first, last)]


def block_views(runner: ModelRunner, seq: RunnerSequence, first: int, last: int) -> list[np.ndarray]:
    """Blocks ``[first, last)`` as byte arrays viewing the pool (no copy): valid only while
    ``seq`` holds its blocks and nothing writes them. With a wire dtype other than the
    pool's, they are converted copies instead."""
    if _converts(runner):
        return wire_blocks(runner, seq, first, last)
    return [runner.export_block(seq, i).view(torch.uint8).numpy() for i in range(first, last)]


def wire_blocks(runner: ModelRunner, seq: RunnerSequence, first: int, last: int) -> list[np.ndarray]:
    """Blocks ``[first, last)`` converted to the pool's wire dtype, as byte arrays: a float
    wire dtype converts each block once into one buffer ``(n, L, 2, bs, kvh, hd)``, int8
    quantizes each block into its own payload (``int8_block``)."""
    pool = runner.kv
    assert pool is not None
    if pool.wire_dtype == torch.int8:
        return [int8_block(runner.export_block(seq, i)) for i in range(first, last)]
    out = torch.empty((last - first, *pool.block_shape), dtype=pool.wire_dtype)
    for j, i in enumerate(range(first, last)):
        out[j].copy_(runner.export_block(seq, i))
    return list(out.view(torch.uint8).numpy())  # (n, L, 2, bs, kvh, hd * element size)


def int8_block(block: torch.Tensor) -> np.ndarray:
    """``block`` (L, 2, bs, kvh, hd) as an int8 payload: float32 scales (L, 2), each the
    largest |value| of its layer's K or V over 127, then round(value / scale) as int8."""
    x = block.detach().to("cpu", torch.float32)
    scales = (x.abs().amax(dim=(2, 3, 4)) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (L, 2)
    q = torch.round(x / scales[:, :, None, None, None]).to(torch.int8)  # (L, 2, bs, kvh, hd)
    return np.concatenate([scales.numpy().view(np.uint8).reshape(-1),
                           q.numpy().view(np.uint8).reshape(-1)])


def _converts(runner: ModelRunner) -> bool:
    return runner.kv is not None and runner.kv.wire_dtype != runner.kv.tensor.dtype


def collect_payloads(payloads: list[bytes]) -> Callable[[int, memoryview], None]:
    """A fetch sink appending a copy of each verified payload to ``payloads`` (in order)."""
    def sink(index: int, payload: memoryview) -> None:
        payloads.append(bytes(payload))
    return sink


def used_blocks(runner: ModelRunner) -> int:
    """KV blocks currently held by sequences."""
    return runner.allocator.num_blocks - runner.allocator.num_free
