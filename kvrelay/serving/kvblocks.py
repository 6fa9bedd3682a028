"""Moving whole KV blocks between a ``ModelRunner`` and the prefix cache.

Runs on the compute thread (it touches the runner). Exported payloads are copies, so a
block can be freed or reused while its bytes are still on their way to the store; block
views are not, for a caller that keeps the blocks until their bytes are sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from engine.runner import ModelRunner, RunnerSequence, leading


def prefill_full_blocks(runner: ModelRunner, seq: RunnerSequence, num_blocks: int) -> int:
    """Compute K/V of ``seq``'s first ``num_blocks`` full blocks on top of what it holds.

    Returns the tokens computed (0 when those blocks are already held).
    """
    return prefill_full_blocks_batch(runner, [(seq, num_blocks)])[0]


def prefill_full_blocks_batch(runner: ModelRunner,
                              items: Sequence[tuple[RunnerSequence, int]]) -> list[int]:
    """``prefill_full_blocks`` of several sequences in one batched pass (each padded to
    the widest); the tokens computed for each."""
    bs = runner.block_size
    todo = [(seq, leading(seq, n * bs))
            for seq, n in items if n * bs > seq.num_computed]
    starts = [seq.num_computed for seq, _ in items]
    if todo:
        runner.prefill([view for _, view in todo])
        for seq, view in todo:
            seq.num_computed = view.num_computed
    return [seq.num_computed - start for (seq, _), start in zip(items, starts)]


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


class BlockLanding:
    """Where a request's fetched prefix blocks land, in prompt order.

    Straight in the KV pool when it can: ``reserve(n)`` takes up to ``n`` free pool blocks
    (never the last ``headroom``, which running sequences need to grow) and ``put`` copies
    each verified payload from the receive buffer into the next of them: one memcpy into
    memory that is already paged in, where a ``bytes`` copy costs a fresh allocation (and
    its page faults) and a second copy into the pool at admission. In-process, 124 fp32
    blocks of SmolLM2-135M fetched into ``bytes`` copies in 95 ms and into reused memory in
    49 ms (no copy at all: 38 ms), and the import at admission took 18 ms; in the decode
    worker, the fetch of a 1984-token prefix took 58-86 ms landing in the pool against
    67-197 ms plus the import before. A block that
    cannot land in the pool (a GPU or converting pool, no room) is kept as a ``bytes``
    copy, and so is every one after it: the prefix is ``blocks`` then ``payloads``.

    The landed blocks are allocated in the runner's allocator, owned by whoever holds
    this object until ``release()``: the decode worker until it submits the admission,
    then the scheduler (``adopt_blocks`` gives the sequence references of its own).
    ``reserve``/``put``/``settle`` run on a store thread, one fetch at a time; the
    allocator is thread-safe and the pool blocks written are nobody else's.
    """

    def __init__(self, runner: ModelRunner | None, headroom: int = 0) -> None:
        self._runner = runner
        self._headroom = headroom
        self.blocks: list[int] = []
        self.payloads: list[bytes] = []
        self._reserved: list[int] = []

    def __len__(self) -> int:
        return len(self.blocks) + len(self.payloads)

    def share(self, names: Sequence[bytes]) -> int:
        """Take the leading blocks the pool already holds under these names (block hashes;
        ``BlockAllocator.share_named``) as the first blocks of the prefix; returns how many.
        Call before any ``put``."""
        if self._runner is None or len(self):
            return 0
        shared = self._runner.allocator.share_named(names)
        self.blocks += shared
        return len(shared)

    def reserve(self, n: int) -> None:
        """Make room in the pool for the next ``n`` blocks, if it has room to spare."""
        runner = self._runner
        if runner is None or runner.kv is None or self.payloads or not runner.kv.lands_in_place:
            return
        more = n - len(self._reserved)
        if more > 0:
            self._reserved += runner.allocator.allocate_up_to(more, self._headroom)

    def land(self, index: int) -> memoryview | None:
        """Where block ``index``'s payload may be received: the pool block ``put`` would
        copy it into (``PrefixCache.fetch_prefix``'s ``land``), or None."""
        if index != len(self) or not self._reserved or self.payloads:
            return None
        assert self._runner is not None and self._runner.kv is not None
        return memoryview(self._runner.kv.landing_bytes(self._reserved[0]))  # type: ignore[arg-type]

    def put(self, index: int, payload: memoryview) -> None:
        """The fetch sink: block ``index`` of the prompt (they arrive in order). A payload
        received straight into the block ``land`` named is taken as it is, not copied."""
        if index != len(self):
            raise ValueError(f"block {index} arrived, block {len(self)} was next")
        if self._reserved and not self.payloads:
            assert self._runner is not None and self._runner.kv is not None
            block = self._reserved.pop(0)
            dest = self._runner.kv.landing_bytes(block)
            if payload.nbytes != dest.nbytes:
                self._reserved.insert(0, block)
                raise ValueError(f"block payload is {payload.nbytes} bytes, "
                                 f"a pool block {dest.nbytes}")
            source = np.frombuffer(payload, np.uint8)
            if source.ctypes.data != dest.ctypes.data:  # else it was received in place
                np.copyto(dest, source)
            self.blocks.append(block)
        else:
            self.payloads.append(bytes(payload))

    def settle(self) -> None:
        """Give back reserved blocks that nothing was written to (after each fetch)."""
        if self._reserved:
            assert self._runner is not None
            self._runner.allocator.free(self._reserved)
            self._reserved = []

    def release(self) -> None:
        """Free every pool block this object holds; safe to call more than once."""
        self.settle()
        if self.blocks:
            assert self._runner is not None
            self._runner.allocator.free(self.blocks)
            self.blocks = []


def used_blocks(runner: ModelRunner) -> int:
    """KV blocks currently held by sequences."""
    return runner.allocator.num_blocks - runner.allocator.num_free
