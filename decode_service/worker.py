"""The decode worker's request path (DESIGN.md, "The request path").

tokenize and check -> hash full blocks -> look up the longest cached prefix -> if enough
is uncached, ask a prefill worker (with a deadline; on failure prefill locally and count
it) -> fetch the verified blocks -> admit to the batch (import, prefill what is still
missing, publish what was computed here) -> stream tokens. Every check that can fail a
request runs before any compute or store I/O. Cancellation anywhere frees the KV at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np

from cachestore.hashing import BlockHash
from decode_service.config import DecodeConfig
from decode_service.prefill_client import PrefillClient
from decode_service.prompts import check_prompt, prompt_ids
from decode_service.requests import Completion, GenerationRequest, Timings, TokenDelta, Usage
from decode_service.scheduler import Admission, Admitted, BatchScheduler
from decode_service.store_prefix import PrefixLeaders, StorePrefix
from engine.engine import LLMEngine, StepOutput
from engine.kv import OutOfBlocks
from engine.sampling import InvalidRequest, InvalidSamplingParams
from engine.sequence import Sequence
from kvrelay.serving.errors import ServiceError, invalid_argument
from kvrelay.serving.kvblocks import BlockLanding
from kvrelay.serving.runtime import Runtime

log = logging.getLogger("kvrelay.decode")
_DEADLINE_MARGIN_S = 0.05


@dataclass(frozen=True)
class _Plan:
    """What the store and the prefill worker gave a request before it joins the batch."""

    hashes: list[BlockHash]
    cached_blocks: int
    landing: BlockLanding
    prefill_ms: float
    fetch_ms: float


class DecodeWorker:
    """Runs requests through the store, the prefill worker and the continuous batch."""

    def __init__(self, runtime: Runtime, config: DecodeConfig, engine: LLMEngine,
                 prefill: PrefillClient | None) -> None:
        self.runtime = runtime
        self.config = config
        publishes = bool(config.redis_url) and config.publish_local_blocks
        self.scheduler = scheduler = BatchScheduler(
            engine, runtime.metrics, self.publish if publishes else None, runtime.gate)
        self.prefill_client = prefill
        self._leaders = PrefixLeaders()
        self.active = 0
        runtime.metrics.running.set_function(lambda: len(scheduler.engine.running))
        runtime.metrics.waiting.set_function(
            lambda: max(0, self.active - len(scheduler.engine.running)))

    async def close(self) -> None:
        """Stop the batch thread, close the prefill channel and the store."""
        self.scheduler.stop()
        if self.prefill_client is not None:
            await self.prefill_client.close()
        self.runtime.close()

    async def generate(self, req: GenerationRequest, time_left_s: float | None) -> Completion:
        """Run ``req`` to the end and answer once."""
        deltas: list[TokenDelta] = []
        async for item in self.stream(req, time_left_s, method="generate"):
            if isinstance(item, Completion):
                return Completion(item.request_id, item.finish_reason, item.usage, item.timings,
                                  text="".join(d.text for d in deltas),
                                  token_ids=[t for d in deltas for t in d.token_ids],
                                  logprobs=[p for d in deltas for p in d.logprobs])
            deltas.append(item)
        raise RuntimeError("the request ended without a completion")

    async def stream(self, req: GenerationRequest, time_left_s: float | None,
                     method: str = "stream") -> AsyncIterator[TokenDelta | Completion]:
        """Yield a ``TokenDelta`` per sampled token, then one ``Completion``."""
        arrived = time.monotonic()
        if self.active >= self.config.max_requests:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"more than {self.config.max_requests} requests in flight")
        self.active += 1
        try:
            async for item in self._stream(req, arrived, time_left_s):
                yield item
            self.runtime.metrics.request_latency.labels(method).observe(time.monotonic() - arrived)
        finally:
            self.active -= 1

    async def _stream(self, req: GenerationRequest, arrived: float,
                      time_left_s: float | None) -> AsyncIterator[TokenDelta | Completion]:
        token_ids, hashes = await asyncio.to_thread(self._prepare, req)
        seq = Sequence(uuid.uuid4().hex, token_ids, req.params)
        events: asyncio.Queue[object] = asyncio.Queue()
        lead = None
        if hashes:  # wait for a request fetching the same prefix, to share its blocks
            wait_s = self.config.prefill_timeout_s
            if time_left_s is not None:
                wait_s = min(wait_s, time_left_s - (time.monotonic() - arrived) - _DEADLINE_MARGIN_S)
            lead = await self._leaders.wait_or_lead(hashes[0], wait_s)
        submitted = finished = False
        try:
            plan = await self._plan(req, token_ids, hashes, arrived, time_left_s)
            self.scheduler.submit(Admission(seq, plan.hashes, plan.landing.payloads, events,
                                            plan.landing.blocks))
            submitted = True
            async for item in self._follow(req, seq, plan, events, arrived, lead):
                finished = isinstance(item, Completion)
                yield item
        finally:
            if submitted and not finished:
                self.scheduler.abort(seq.seq_id)
            if lead is not None:
                self._leaders.end(hashes[0], lead)

    # -- before any compute: the prompt and its checks ---------------------------------

    def _prepare(self, req: GenerationRequest) -> tuple[list[int], list[BlockHash]]:
        """The checked prompt ids and the chained hashes of its full blocks."""
        rt = self.runtime
        ids = prompt_ids(rt.loaded.tokenizer, req)
        check_prompt(req, ids, rt.loaded.config, rt.spec.block_size, self.config.num_blocks,
                     self.config.max_prompt_tokens)
        return ids, rt.cache.block_hashes(ids, req.cache_salt)

    # -- store and prefill worker -------------------------------------------------------

    async def _plan(self, req: GenerationRequest, ids: list[int], hashes: list[BlockHash],
                    arrived: float, time_left_s: float | None) -> _Plan:
        rt = self.runtime
        bs = rt.spec.block_size
        landing = BlockLanding(self.scheduler.engine.runner, headroom=self.config.max_batch_size)
        held = landing.share(hashes)  # blocks a running request holds: no fetch, no copy
        try:  # the pool blocks shared or fetched into are this request's until submitted
            cached = held
            if held < len(hashes):
                cached += await rt.on_store("lookup", rt.cache.lookup, hashes[held:])
            rt.metrics.queried_tokens.inc(len(hashes) * bs)
            rt.metrics.pool_shared_tokens.inc(held * bs)
            prefix = StorePrefix(rt, hashes, landing.put, reserve=landing.reserve,
                                 settle=landing.settle, start=held, land=landing.land)
            started = time.monotonic()
            available = await self._remote_prefill(req, ids, prefix, cached, arrived, time_left_s)
            prefill_ms = (time.monotonic() - started) * 1000
            started = time.monotonic()
            await prefix.fetch_to(available)
        except BaseException:
            landing.release()
            raise
        hit = min(cached, prefix.fetched)
        rt.metrics.hit_tokens.inc(hit * bs)
        return _Plan(hashes, hit, landing, prefill_ms, (time.monotonic() - started) * 1000)

    async def _remote_prefill(self, req: GenerationRequest, ids: list[int], prefix: StorePrefix,
                              cached: int, arrived: float, time_left_s: float | None) -> int:
        """Blocks now in the store: after a Prefill call when worth it, else ``cached``.

        Worth it when the uncached part reaches the threshold and is at least as long as
        the cached part: a Prefill call moves the cached part twice more (the prefill
        worker loads it as context, decode fetches it again), so a short tail on a long
        cached prefix is cheaper computed here. While the call runs, ``prefix`` fetches
        the blocks the prefill worker has published so far.
        """
        bs = self.runtime.spec.block_size
        hashes = prefix.hashes
        uncached = len(ids) - cached * bs
        if (self.prefill_client is None or cached == len(hashes)
                or uncached < max(self.config.prefill_threshold_tokens, cached * bs)):
            return cached
        timeout = self.config.prefill_timeout_s
        if time_left_s is not None:
            timeout = min(timeout, time_left_s - (time.monotonic() - arrived) - _DEADLINE_MARGIN_S)
        stored, reason = (None, "deadline_exceeded") if timeout <= 0 else \
            await prefix.following(self.prefill_client.prefill(
                ids, req.cache_salt, hashes, self.runtime.spec.fingerprint, req.request_id,
                timeout))
        if stored is None:
            self.runtime.metrics.fallbacks.labels(reason).inc()
            return cached
        return min(len(hashes), max(cached, stored // bs))

    def publish(self, hashes: list[BlockHash], payloads: list[np.ndarray]) -> None:
        """Publish blocks computed here (called on the compute thread; runs on the store pool)."""
        rt = self.runtime
        rt.store_io.submit(_publish, rt, hashes, payloads)

    # -- following the batch ------------------------------------------------------------

    async def _follow(self, req: GenerationRequest, seq: Sequence, plan: _Plan,
                      events: asyncio.Queue[object], arrived: float,
                      lead: asyncio.Event | None = None
                      ) -> AsyncIterator[TokenDelta | Completion]:
        admitted: Admitted | None = None
        first = last = 0.0
        count = 0
        while True:
            event = await events.get()
            if isinstance(event, Exception):
                raise _as_service_error(event, req.input_field)
            if isinstance(event, Admitted):
                admitted = event
                if lead is not None:  # its prefix blocks are named in the pool now
                    self._leaders.end(plan.hashes[0], lead)
                continue
            assert isinstance(event, StepOutput) and admitted is not None
            now = time.monotonic()
            if count:
                self.runtime.metrics.inter_token.observe(now - last)
            else:
                first = now
                self.runtime.metrics.ttft.observe(now - arrived)
            last, count = now, count + 1
            yield TokenDelta(event.text, [event.token_id],
                             [] if event.logprob is None else [event.logprob])
            if event.finished:
                yield self._completion(req, seq, plan, admitted, arrived, first, last, count,
                                       event.finish_reason or "stop")
                return

    def _completion(self, req: GenerationRequest, seq: Sequence, plan: _Plan, admitted: Admitted,
                    arrived: float, first: float, last: float, count: int,
                    reason: str) -> Completion:
        bs = self.runtime.spec.block_size
        # prefill: the remote call, then from admission to the first token (importing the
        # blocks, then the step that computes the prompt's tail here); the three phases add
        # up to the time to first token
        timings = Timings(queue_ms=(admitted.started - arrived) * 1000 - plan.prefill_ms - plan.fetch_ms,
                          prefill_ms=plan.prefill_ms + (first - admitted.started) * 1000,
                          kv_fetch_ms=plan.fetch_ms,
                          time_to_first_token_ms=(first - arrived) * 1000,
                          decode_ms=(last - first) * 1000)
        usage = Usage(seq.prompt_len, plan.cached_blocks * bs, count)
        log.info("request finished", extra={
            "request_id": req.request_id, "finish_reason": reason, "prompt_tokens": usage.prompt_tokens,
            "cached_prompt_tokens": usage.cached_prompt_tokens, "completion_tokens": count,
            "ttft_ms": round(timings.time_to_first_token_ms, 2)})
        return Completion(req.request_id, reason, usage, timings)


def _as_service_error(exc: Exception, input_field: str) -> Exception:
    if isinstance(exc, InvalidSamplingParams):
        return invalid_argument(f"sampling.{exc.field}", exc.message)
    if isinstance(exc, InvalidRequest):
        field = input_field if exc.field == "prompt" else f"sampling.{exc.field}"
        return invalid_argument(field, exc.message)
    if isinstance(exc, OutOfBlocks):
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV pool is full")
    return exc


def _publish(rt: Runtime, hashes: list[BlockHash], payloads: list[np.ndarray]) -> None:
    with rt.metrics.store_call.labels("publish").time():
        rt.metrics.published_blocks.inc(rt.cache.publish(hashes, payloads))
