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
    """Copies of blocks ``[first, last)`` as byte arrays, (L, 2, bs, kvh, hd) each in memory."""
    return [runner.export_block(seq, i).cpu().view(torch.uint8).numpy().copy()
            for i in range(first, last)]


def block_views(runner: ModelRunner, seq: RunnerSequence, first: int, last: int) -> list[np.ndarray]:
    """Blocks ``[first, last)`` as byte arrays viewing the pool (no copy): valid only while
    ``seq`` holds its blocks and nothing writes them."""
    return [runner.export_block(seq, i).view(torch.uint8).numpy() for i in range(first, last)]


def collect_payloads(payloads: list[bytes]) -> Callable[[int, memoryview], None]:
    """A fetch sink appending a copy of each verified payload to ``payloads`` (in order)."""
    def sink(index: int, payload: memoryview) -> None:
        payloads.append(bytes(payload))
    return sink


def used_blocks(runner: ModelRunner) -> int:
    """KV blocks currently held by sequences."""
    return runner.allocator.num_blocks - runner.allocator.num_free
