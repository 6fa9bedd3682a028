"""The prefill worker's domain: make a prompt's full blocks present in the shared store.

For each call it loads the cached prefix it finds in the store (verified) as context,
computes K/V for the remaining full blocks on the compute thread, publishes them, and
reports how many leading prompt tokens the store now holds. A trailing partial block is
never computed here: decode computes it (with at least the last prompt token).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

import grpc

from cachestore.hashing import BlockHash
from engine.kv import OutOfBlocks
from engine.sequence import Sequence
from kvrelay.serving.errors import ServiceError, invalid_argument
from kvrelay.serving.kvblocks import (
    collect_payloads,
    export_blocks,
    prefill_full_blocks,
    used_blocks,
)
from kvrelay.serving.runtime import Runtime

log = logging.getLogger("kvrelay.prefill")


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
        computed, exported = await asyncio.get_running_loop().run_in_executor(
            rt.compute, self._compute, job, payloads, len(hashes))
        compute_ms = (time.monotonic() - started) * 1000
        if 0 < self._exit_after_blocks < len(exported):
            await self._die_midway(hashes[cached:], exported)
        published = await rt.on_store("publish", rt.cache.publish, hashes[cached:], exported)
        stored = await rt.on_store("lookup", rt.cache.lookup, hashes)
        rt.metrics.computed_tokens.inc(computed)
        rt.metrics.published_blocks.inc(published)
        log.info("prefilled", extra={"request_id": job.request_id, "cached_blocks": cached,
                                     "computed_tokens": computed, "published_blocks": published,
                                     "stored_tokens": stored * bs, "compute_ms": round(compute_ms, 2)})
        return PrefillResult(stored * bs, computed, published, compute_ms)

    async def _die_midway(self, hashes: list[BlockHash], exported: list) -> None:
        """The ``fault_exit_after_blocks`` hook: publish some blocks, then exit at once."""
        rt = self.runtime
        n = self._exit_after_blocks
        await rt.on_store("publish", rt.cache.publish, hashes[:n], exported[:n])
        log.error("fault hook: exiting after publishing %d of %d blocks", n, len(exported))
        os._exit(70)

    async def warm(self) -> None:
        """One block's prefill on the compute thread, so the first call pays no warm-up."""
        job = PrefillJob([1] * self.runtime.spec.block_size, "", [], "", "warm-up")
        await asyncio.get_running_loop().run_in_executor(self.runtime.compute, self._compute,
                                                         job, [], 1)

    def _compute(self, job: PrefillJob, payloads: list[bytes], num_blocks: int) -> tuple[int, list]:
        """On the compute thread: import the cached prefix, compute the rest, export copies."""
        runner = self.runtime.runner
        seq = Sequence(job.request_id or "prefill", job.token_ids)
        try:
            runner.import_blocks(seq, payloads)
            computed = prefill_full_blocks(runner, seq, num_blocks)
            return computed, export_blocks(runner, seq, len(payloads), num_blocks)
        except OutOfBlocks as exc:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV pool is full") from exc
        finally:
            runner.free(seq)
            self.runtime.metrics.kv_used.set(used_blocks(runner))
