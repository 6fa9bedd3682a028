"""The prefill worker's domain: make a prompt's full blocks present in the shared store.

For each call it loads the cached prefix it finds in the store (verified) as context,
computes K/V for the remaining full blocks on the compute thread in chunks, publishes each
chunk straight from the KV pool while the next one computes, and
reports how many leading prompt tokens the store now holds. A trailing partial block is
never computed here: decode computes it (with at least the last prompt token).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from cachestore.hashing import BlockHash
from engine.kv import OutOfBlocks
from engine.sequence import Sequence
from kvrelay.serving.errors import ServiceError, invalid_argument
from kvrelay.serving.kvblocks import (
    block_views,
    collect_payloads,
    prefill_full_blocks,
    prefill_full_blocks_batch,
    used_blocks,
)
from kvrelay.serving.runtime import Runtime

log = logging.getLogger("kvrelay.prefill")
T = TypeVar("T")

PUBLISH_CHUNK_BLOCKS = 32
"""Blocks of the last chunk: computed in a pass of their own after the others are published,
so that only their publish (and decode's fetch of them) adds to a long prompt's latency."""

MAX_CHUNK_BLOCKS = 128
"""Most blocks computed in one forward pass (2048 tokens of 16), which bounds the pass's
activations. A pass over a paged context costs more per token than the first, causal pass
(measured on CPU, when such passes still attended with an explicit mask: a 2048-token prompt
as 4 chunks of 512 tokens took 1.2-1.8x the CPU time of one pass, as 1536 + 512 tokens
1.1-1.2x; a single call's pass now attends to its held prefix and its new tokens apart,
``attention.prefix_split_attention``, which narrows that), so the blocks before the last
chunk go in as few passes as this allows."""


BATCH_TOKENS = 4096
"""Most tokens (padded) in one pass that batches several calls' chunks (``PassBatcher``)."""

BATCH_FILL = 0.75
"""Least share of real tokens in such a pass: chunks of very different lengths go in
passes of their own rather than padding the short ones to the long one's width."""


class PassBatcher:
    """The prefill passes of concurrent calls, batched on the compute thread.

    A call asks for its next chunk (``compute``); a job on the compute thread takes the
    chunks waiting when it starts, as many as ``BATCH_TOKENS`` and ``BATCH_FILL`` allow, in
    arrival order, and computes them in one batched pass; the rest wait for the next job.
    Calls that arrive together (a burst of new system prompts) are computed together and
    reply together, instead of one pass each in turn; a call alone is its own pass. On a
    full KV pool the chunks of a batch are retried one by one, so that one call's lack of
    room fails that call only. A chunk whose call was cancelled before a job took it is
    dropped; one already taken is computed before the cancelled call's release, which goes
    through the compute thread after it (``PrefillWorker._prefill``).
    """

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._lock = threading.Lock()
        self._waiting: list[tuple[Sequence, int, asyncio.Future[int]]] = []
        self._job_queued = False

    async def compute(self, seq: Sequence, num_blocks: int) -> int:
        """``prefill_full_blocks(runner, seq, num_blocks)`` in the next batched pass."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        with self._lock:
            self._waiting.append((seq, num_blocks, done))
            submit = not self._job_queued
            self._job_queued = True
        if submit:
            self._rt.compute.submit(self._run, loop)
        return await done

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the compute thread: one batched pass over the chunks that fit, then again
        later for any left waiting."""
        with self._lock:
            batch = self._take()
            again = bool(self._waiting)
            self._job_queued = again
        if again:
            self._rt.compute.submit(self._run, loop)
        runner = self._rt.runner
        with self._rt.gate.turn():  # one forward pass (kvrelay.serving.gate)
            try:
                results: list[int | BaseException] = list(prefill_full_blocks_batch(
                    runner, [(seq, n) for seq, n, _ in batch]))
            except OutOfBlocks:
                results = [self._alone(seq, n) for seq, n, _ in batch]
            except Exception as exc:  # noqa: BLE001 - every caller in the batch gets it
                results = [exc] * len(batch)
        for (_, _, done), result in zip(batch, results):
            loop.call_soon_threadsafe(_settle, done, result)

    def _alone(self, seq: Sequence, n: int) -> int | BaseException:
        try:
            return prefill_full_blocks(self._rt.runner, seq, n)
        except Exception as exc:  # noqa: BLE001 - handed to that call
            return exc

    def _take(self) -> list[tuple[Sequence, int, asyncio.Future[int]]]:
        bs = self._rt.runner.block_size
        batch: list[tuple[Sequence, int, asyncio.Future[int]]] = []
        rest = []
        widest = real = 0
        for item in self._waiting:
            seq, n, done = item
            if done.cancelled():
                # Never computed: its call frees its blocks through the compute thread
                # after this job, and a chunk taken here would run before that.
                continue
            width = max(1, n * bs - seq.num_computed)
            w = max(widest, width)
            fits = (w * (len(batch) + 1) <= BATCH_TOKENS
                    and real + width >= BATCH_FILL * w * (len(batch) + 1))
            if not batch or fits:
                batch.append(item)
                widest, real = w, real + width
            else:
                rest.append(item)
        self._waiting = rest
        return batch


def _settle(done: asyncio.Future[int], result: int | BaseException) -> None:
    if done.cancelled():
        return
    if isinstance(result, BaseException):
        done.set_exception(result)
    else:
        done.set_result(result)


@dataclass(frozen=True)
class PrefillJob:
    """One Prefill call, free of protobuf."""

    token_ids: list[int]
    cache_salt: str
    block_hashes: list[bytes]
    fingerprint: str
    request_id: str


@dataclass(frozen=True)
class PrefillResult:
    """What one call achieved."""

    stored_prompt_tokens: int
    computed_tokens: int
    published_blocks: int
    compute_ms: float


class PrefillWorker:
    """Serves Prefill calls on a warm ``Runtime``; at most ``max_requests`` at once."""

    def __init__(self, runtime: Runtime, max_requests: int, fault_exit_after_blocks: int = 0) -> None:
        self.runtime = runtime
        self._exit_after_blocks = fault_exit_after_blocks
        self._slots = max_requests
        self._active = 0
        self._passes = PassBatcher(runtime)

    def _check(self, job: PrefillJob) -> list[BlockHash]:
        rt = self.runtime
        if job.fingerprint != rt.spec.fingerprint:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "model_fingerprint: differs from this prefill worker's model")
        cfg = rt.loaded.config
        if not job.token_ids or min(job.token_ids) < 0 or max(job.token_ids) >= cfg.vocab_size:
            raise invalid_argument("token_ids", f"must be non-empty ids in [0, {cfg.vocab_size})")
        if len(job.token_ids) >= cfg.max_position_embeddings:
            raise invalid_argument("token_ids", "longer than the model's context window")
        hashes = rt.cache.block_hashes(job.token_ids, job.cache_salt)
        if [bytes(h) for h in hashes] != job.block_hashes:
            raise invalid_argument("block_hashes", "do not match the token ids, salt and model")
        return hashes

    async def prefill(self, job: PrefillJob) -> PrefillResult:
        """Compute and publish what the store lacks of ``job``'s full blocks."""
        hashes = self._check(job)
        if self._active >= self._slots:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "prefill queue is full")
        self._active += 1
        try:
            return await self._prefill(job, hashes)
        finally:
            self._active -= 1

    async def _prefill(self, job: PrefillJob, hashes: list[BlockHash]) -> PrefillResult:
        rt = self.runtime
        bs = rt.spec.block_size
        payloads: list[bytes] = []
        cached = await rt.on_store("fetch", rt.cache.fetch_prefix, hashes, collect_payloads(payloads))
        if cached == len(hashes):
            return PrefillResult(cached * bs, 0, 0, 0.0)
        started = time.monotonic()
        seq = Sequence(job.request_id or "prefill", job.token_ids)
        try:
            published = await self._compute_and_publish(seq, payloads, hashes)
        except BaseException:
            # A pass of this call may still be queued on the compute thread (the call was
            # cancelled while it waited): free its blocks after it, never under it.
            await self._on_compute(self._release, seq)
            raise
        # Every pass of this call is over and every publish done. Free its blocks now: on
        # the compute thread the release would wait behind other calls' queued passes, and
        # this call's reply with it (four concurrent 544-token prompts all returned when
        # the last one was computed, 4.5 s, instead of one by one).
        self._release(seq)
        compute_ms = (time.monotonic() - started) * 1000
        computed = (len(hashes) - cached) * bs
        stored = await rt.on_store("lookup", rt.cache.lookup, hashes)
        rt.metrics.computed_tokens.inc(computed)
        rt.metrics.published_blocks.inc(published)
        log.info("prefilled", extra={"request_id": job.request_id, "cached_blocks": cached,
                                     "computed_tokens": computed, "published_blocks": published,
                                     "stored_tokens": stored * bs, "compute_ms": round(compute_ms, 2)})
        return PrefillResult(stored * bs, computed, published, compute_ms)

    async def _compute_and_publish(self, seq: Sequence, payloads: list[bytes],
                                   hashes: list[BlockHash]) -> int:
        """Compute the missing blocks chunk by chunk (``chunks``), publishing each chunk while
        the next one computes; returns the blocks newly written. Publishes read the pool in place:
        ``seq`` holds its blocks until every publish is over."""
        rt = self.runtime
        if payloads:  # (nothing to import: no place in the compute thread's queue)
            await self._on_compute(self._import, seq, payloads)
        publishes: list[asyncio.Future[int]] = []
        try:
            for first, last in chunks(len(payloads), len(hashes)):
                await self._passes.compute(seq, last)
                views = block_views(rt.runner, seq, first, last)
                if 0 < self._exit_after_blocks < len(hashes) - len(payloads):
                    await self._die_midway(hashes[first:last], views)
                publishes.append(asyncio.ensure_future(
                    rt.on_store("publish", rt.cache.publish, hashes[first:last], views)))
            return sum(await asyncio.gather(*publishes))
        finally:
            await asyncio.gather(*publishes, return_exceptions=True)

    async def _on_compute(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.runtime.compute, fn, *args)

    def _import(self, seq: Sequence, payloads: list[bytes]) -> None:
        try:
            self.runtime.runner.import_blocks(seq, payloads)
        except OutOfBlocks as exc:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV pool is full") from exc

    def _warm_pass(self, seq: Sequence) -> None:
        with self.runtime.gate.turn():
            prefill_full_blocks(self.runtime.runner, seq, 1)

    def _release(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks (the allocator is thread-safe; nothing else uses them)."""
        runner = self.runtime.runner
        runner.free(seq)
        self.runtime.metrics.kv_used.set(used_blocks(runner))

    async def _die_midway(self, hashes: list[BlockHash], views: list) -> None:
        """The ``fault_exit_after_blocks`` hook: publish some blocks, then exit at once."""
        rt = self.runtime
        n = self._exit_after_blocks
        await rt.on_store("publish", rt.cache.publish, hashes[:n], views[:n])
        log.error("fault hook: exiting after publishing %d blocks", min(n, len(views)))
        os._exit(70)

    async def warm(self) -> None:
        """One block's prefill on the compute thread, so the first call pays no warm-up."""
        seq = Sequence("warm-up", [1] * self.runtime.spec.block_size)
        try:
            await self._on_compute(self._warm_pass, seq)
        finally:
            await self._on_compute(self._release, seq)


def chunks(first: int, last: int, tail: int = PUBLISH_CHUNK_BLOCKS,
           size: int = MAX_CHUNK_BLOCKS) -> list[tuple[int, int]]:
    """Block ranges ``[a, b)`` covering ``[first, last)``: the last ``tail`` blocks, and
    before them as few chunks of at most ``size`` blocks as will do, of even sizes.

    A range with fewer than ``tail`` blocks before the last ones is one pass (when it fits
    ``size``): an early pass that short publishes little ahead of the rest and costs a pass
    over the weights of its own (in-process on a 2-core CPU, SmolLM2-135M: 34 blocks as 2 +
    32 took 755-825 ms against 714-755 as one pass, 48 as 16 + 32 1048-1087 against 918-938;
    128 as 96 + 32 cost the same as one pass)."""
    if last - first < 2 * tail and last - first <= size:
        return [(first, last)] if last > first else []
    body = max(first, last - tail)
    passes = -(-(body - first) // size)
    edges = [first] + [first + (body - first) * i // passes for i in range(1, passes + 1)]
    return list(zip(edges, edges[1:] + ([last] if last > body else [])))
