"""``StorePrefix``: the blocks a prefill worker publishes while its call runs are fetched in
order, verified, never past the prompt, and the polling ends with the call (unit tests on an
in-memory store; tests/services/test_prefill_overlap.py runs the same with real processes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cachestore.codec import BlockSpec
from cachestore.kvstore import PrefixCache
from cachestore.store import MemoryBlockStore
from decode_service.store_prefix import StorePrefix

SPEC = BlockSpec("ab" * 16, "float32", num_layers=2, block_size=4, num_kv_heads=2, head_dim=8)
POLL_S = 0.01
TOKENS = list(range(3, 3 + 10 * SPEC.block_size + 2))  # 10 full blocks and 2 tokens


class _Store:
    """Stands in for the decode worker's ``Runtime``: its prefix cache and its store calls,
    with every call recorded by op."""

    def __init__(self) -> None:
        self.cache = PrefixCache(MemoryBlockStore(), SPEC)
        self.calls: list[str] = []

    async def on_store(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        self.calls.append(op)
        return await asyncio.to_thread(fn, *args)


def _payload(index: int) -> np.ndarray:
    return np.full(SPEC.payload_nbytes, index, dtype=np.uint8)


def _collect(into: list[tuple[int, int]]) -> Callable[[int, memoryview], None]:
    def sink(index: int, payload: memoryview) -> None:
        into.append((index, payload[0]))
    return sink


async def _publish_in_steps(store: _Store, steps: list[tuple[int, int]], pause_s: float) -> str:
    hashes = store.cache.block_hashes(TOKENS)
    for first, last in steps:
        await asyncio.sleep(pause_s)
        store.cache.publish(hashes[first:last], [_payload(i) for i in range(first, last)])
    await asyncio.sleep(pause_s)
    return "reply"


def _prefix(store: _Store, got: list[tuple[int, int]]) -> StorePrefix:
    return StorePrefix(store, store.cache.block_hashes(TOKENS), _collect(got),  # type: ignore[arg-type]
                       poll_interval_s=POLL_S)


def test_blocks_published_during_the_call_are_fetched_in_order_before_it_returns() -> None:
    store, got = _Store(), []
    prefix = _prefix(store, got)

    async def run() -> str:
        reply = await prefix.following(_publish_in_steps(store, [(0, 3), (3, 7), (7, 10)], 0.1))
        polls = store.calls.count("poll")
        await asyncio.sleep(20 * POLL_S)
        assert store.calls.count("poll") == polls
        return reply

    assert asyncio.run(run()) == "reply"
    assert prefix.fetched == 10
    assert got == [(i, i) for i in range(10)]
    assert store.cache.stats.count("misses") == 0
    assert asyncio.run(prefix.fetch_to(10)) == 0


def test_the_rest_is_fetched_after_the_call_from_where_the_polls_left_off() -> None:
    store, got = _Store(), []
    prefix = _prefix(store, got)

    async def run() -> None:
        await prefix.following(_publish_in_steps(store, [(0, 4)], 0.1))
        hashes = store.cache.block_hashes(TOKENS)
        store.cache.publish(hashes[4:10], [_payload(i) for i in range(4, 10)])
        assert prefix.fetched == 4
        assert await prefix.fetch_to(10) == 6

    asyncio.run(run())
    assert got == [(i, i) for i in range(10)]


def test_a_block_that_does_not_verify_ends_the_prefix_and_the_polling() -> None:
    store, got = _Store(), []
    prefix = _prefix(store, got)
    hashes = store.cache.block_hashes(TOKENS)
    store.cache.store.values[store.cache.keys(hashes)[2]] = b"not a block"

    async def run() -> None:
        await prefix.following(_publish_in_steps(store, [(0, 6)], 0.1))
        assert await prefix.fetch_to(6) == 0

    asyncio.run(run())
    assert got == [(0, 0), (1, 1)]
    assert store.calls.count("fetch") == 2  # one during the call, one after it
    assert sum(store.cache.stats.snapshot()["integrity"].values()) == 2


def test_cancelling_the_request_stops_the_polling_at_once() -> None:
    store, got = _Store(), []
    prefix = _prefix(store, got)

    async def run() -> None:
        task = asyncio.create_task(prefix.following(_publish_in_steps(store, [(0, 2)], 10.0)))
        await asyncio.sleep(20 * POLL_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        polls = store.calls.count("poll")
        await asyncio.sleep(20 * POLL_S)
        assert store.calls.count("poll") == polls

    asyncio.run(run())
    assert got == []


def test_a_failing_call_stops_the_polling_and_keeps_what_was_fetched() -> None:
    store, got = _Store(), []
    prefix = _prefix(store, got)

    async def failing() -> None:
        await _publish_in_steps(store, [(0, 5)], 0.1)
        raise RuntimeError("the call failed")

    async def run() -> None:
        with pytest.raises(RuntimeError):
            await prefix.following(failing())
        polls = store.calls.count("poll")
        await asyncio.sleep(20 * POLL_S)
        assert store.calls.count("poll") == polls

    asyncio.run(run())
    assert got == [(i, i) for i in range(5)]


def test_the_first_request_on_a_prefix_leads_and_the_others_wait_for_it() -> None:
    from decode_service.store_prefix import PrefixLeaders

    async def run() -> None:
        leaders = PrefixLeaders()
        lead = await leaders.wait_or_lead(b"p", 5.0)
        assert lead is not None
        other = await leaders.wait_or_lead(b"q", 5.0)  # another prefix: its own leader
        assert other is not None
        follower = asyncio.create_task(leaders.wait_or_lead(b"p", 5.0))
        await asyncio.sleep(0.05)
        assert not follower.done()  # waits while the leader fetches
        leaders.end(b"p", lead)
        assert await asyncio.wait_for(follower, 1.0) is None
        leaders.end(b"p", lead)  # idempotent
        assert await leaders.wait_or_lead(b"p", 5.0) is not None  # a new lead after the end
        started = asyncio.get_running_loop().time()
        assert await leaders.wait_or_lead(b"q", 0.05) is None  # bounded wait
        assert asyncio.get_running_loop().time() - started < 1.0
        assert await leaders.wait_or_lead(b"q", -1.0) is None  # no time left: no wait

    asyncio.run(run())
