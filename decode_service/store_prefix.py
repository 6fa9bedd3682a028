"""A prompt's verified prefix in the store, fetched in order, also while a Prefill call runs.

The prefill worker publishes a long prompt chunk by chunk while it computes the next
chunk. ``StorePrefix.following`` fetches those chunks as they land, so that when the
Prefill call returns only the blocks published since the last poll are left to fetch.

It polls the store rather than following a progress stream from the prefill worker: a
poll is one pipelined EXISTS per block not fetched yet (a miss there costs nothing, where
a failing GET would count as a miss), it needs no change to the Prefill protocol, it finds
blocks whoever wrote them (this prefill worker, another one computing the same prefix, a
decode worker), and a call that fails or hangs leaves nothing to undo: every block fetched
so far is verified and part of a contiguous prefix, so the request goes on from there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from cachestore.hashing import BlockHash
from cachestore.kvstore import Sink
from kvrelay.serving.runtime import Runtime

T = TypeVar("T")

POLL_INTERVAL_S = 0.25
"""Seconds between two polls while a Prefill call runs. A chunk takes a second or more to
compute on CPU and is fetched well before the next one lands, so a poll late by up to this
interval costs nothing; each poll costs well under a millisecond of CPU on cores that the
prefill worker's compute needs."""


class StorePrefix:
    """Blocks ``[0, fetched)`` of ``hashes``: verified and handed to ``sink`` in order, with
    their index in ``hashes``. Fetches never run two at a time. On the store thread, each
    fetch of ``n`` blocks first calls ``reserve(n)`` and ends with ``settle()`` (room for
    the blocks and giving back what was not used: ``kvblocks.BlockLanding``); with ``land``,
    payloads are received straight into the memory it names (``BlockLanding.land``)."""

    def __init__(self, runtime: Runtime, hashes: list[BlockHash], sink: Sink,
                 poll_interval_s: float = POLL_INTERVAL_S, *,
                 reserve: Callable[[int], None] | None = None,
                 settle: Callable[[], None] | None = None, start: int = 0,
                 land: Callable[[int], memoryview | None] | None = None) -> None:
        self.hashes = hashes
        self.fetched = start  # blocks the caller has already (shared from the KV pool)
        self._rt = runtime
        self._sink = sink
        self._poll_interval_s = poll_interval_s
        self._reserve = reserve
        self._settle = settle
        self._land = land

    async def fetch_to(self, end: int) -> int:
        """Fetch blocks ``[fetched, end)`` up to the first one missing or invalid; returns
        how many were added."""
        start = self.fetched
        if end <= start:
            return 0

        def sink(index: int, payload: memoryview) -> None:
            self._sink(start + index, payload)

        land = None
        if self._land is not None:
            to = self._land

            def land(index: int) -> memoryview | None:
                return to(start + index)

        rt = self._rt

        def fetch() -> int:
            if self._reserve is not None:
                self._reserve(end - start)
            try:
                return rt.cache.fetch_prefix(self.hashes[start:end], sink, land)
            finally:
                if self._settle is not None:
                    self._settle()

        added = await rt.on_store("fetch", fetch)
        self.fetched += added
        return added

    async def following(self, call: Awaitable[T]) -> T:
        """``await call`` while fetching the leading blocks that appear in the store.

        When ``call`` ends, a fetch in progress completes before this returns; when it is
        cancelled (or raises), the polling stops at once.
        """
        stop = asyncio.Event()
        follower = asyncio.create_task(self._follow(stop))
        try:
            result = await call
        except BaseException:
            follower.cancel()
            raise
        stop.set()
        await follower
        return result

    async def _follow(self, stop: asyncio.Event) -> None:
        rt = self._rt
        while self.fetched < len(self.hashes):
            try:
                await asyncio.wait_for(stop.wait(), self._poll_interval_s)
                return
            except TimeoutError:
                pass
            present = await rt.on_store("poll", rt.cache.lookup, self.hashes[self.fetched:])
            if present and await self.fetch_to(self.fetched + present) < present:
                return  # a block vanished or did not verify: what is left waits for the reply


class PrefixLeaders:
    """Single flight for a prompt prefix in the decode worker's KV pool.

    The first request with a given first block leads: it fetches (or has computed) the
    prefix as usual. Requests with the same first block that arrive before the leader is
    admitted wait for that (``wait_or_lead``), then share the blocks it holds in the pool
    instead of fetching their own copies (``kvblocks.BlockLanding.share``): a burst of
    requests on one system prompt fetches it once. A leader that fails, is cancelled or
    is admitted ends its lead (``end``) and the waiting requests go on at once; none
    waits longer than its ``timeout_s``.
    """

    def __init__(self) -> None:
        self._leaders: dict[BlockHash, asyncio.Event] = {}

    async def wait_or_lead(self, key: BlockHash, timeout_s: float) -> asyncio.Event | None:
        """The event to ``end`` when this request leads for ``key``; else None, once the
        current leader has ended (or ``timeout_s`` has passed)."""
        leader = self._leaders.get(key)
        if leader is None:
            lead = self._leaders[key] = asyncio.Event()
            return lead
        if timeout_s > 0:
            try:
                await asyncio.wait_for(leader.wait(), timeout_s)
            except TimeoutError:
                pass
        return None

    def end(self, key: BlockHash, lead: asyncio.Event) -> None:
        """Let the requests waiting on this lead go on (idempotent)."""
        lead.set()
        if self._leaders.get(key) is lead:
            del self._leaders[key]
