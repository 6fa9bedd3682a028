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
activations. A pass over a paged context attends with an explicit mask, which costs far more
per token than the first, causal pass (measured on CPU: a 2048-token prompt as 4 chunks of
512 tokens took 1.2-1.8x the CPU time of one pass, as 1536 + 512 tokens 1.1-1.2x), so the
blocks before the last chunk go in as few passes as this allows."""


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
        await self._on_compute(self._import, seq, payloads)
        publishes: list[asyncio.Future[int]] = []
        try:
            for first, last in chunks(len(payloads), len(hashes)):
                await self._on_compute(prefill_full_blocks, rt.runner, seq, last)
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
            await self._on_compute(prefill_full_blocks, self.runtime.runner, seq, 1)
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
