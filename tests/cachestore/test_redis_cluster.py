"""RedisBlockStore against a real three-master Redis Cluster started by the test."""

from __future__ import annotations

import contextlib
import time

import pytest
from redis.cluster import RedisCluster

from cachestore import redis_store
from cachestore.codec import BlockSpec
from cachestore.kvstore import PrefixCache
from cachestore.redis_store import RedisBlockStore
from tests.cachestore.conftest import Collect, make_payloads
from tests.support.redis_server import RedisClusterServers, start_cluster


def _cache(cluster: RedisClusterServers, spec: BlockSpec) -> PrefixCache:
    store = RedisBlockStore.from_url(cluster.url(), cluster=True)
    return PrefixCache(store, spec, batch_bytes=5 * spec.value_nbytes)


def test_blocks_spread_over_masters_and_round_trip(redis_cluster: RedisClusterServers,
                                                   spec: BlockSpec) -> None:
    cache = _cache(redis_cluster, spec)
    hashes = cache.block_hashes(list(range(2000, 2048)), "spread")
    payloads = make_payloads(spec, len(hashes))
    assert cache.publish(hashes, list(payloads)) == 12
    counts = []
    for node in redis_cluster.nodes:
        with contextlib.closing(node.client()) as client:
            counts.append(client.dbsize())
    assert sum(counts) >= 12 and sum(1 for c in counts if c) >= 2
    sink = Collect()
    reader = _cache(redis_cluster, spec)
    assert reader.lookup(hashes) == 12
    assert reader.fetch_prefix(hashes, sink) == 12
    assert sink.blocks == [(i, payloads[i].tobytes()) for i in range(12)]
    assert reader.stats.snapshot()["errors"] == {}


def test_a_fetch_window_spans_the_masters_in_key_order(redis_cluster: RedisClusterServers,
                                                      spec: BlockSpec,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_store, "FETCH_AHEAD_BYTES", 3 * spec.value_nbytes)  # 3 ahead
    cache = _cache(redis_cluster, spec)
    hashes = cache.block_hashes(list(range(4000, 4064)), "window")
    payloads = make_payloads(spec, len(hashes))
    assert cache.publish(hashes, list(payloads)) == 16
    whole = PrefixCache(cache.store, spec)  # one batch of 16 over three masters
    sink = Collect()
    assert whole.fetch_prefix(hashes, sink) == 16
    assert sink.blocks == [(i, p.tobytes()) for i, p in enumerate(payloads)]
    seen: list[int] = []

    def visit(index: int, value: memoryview | None) -> bool:
        seen.append(index)
        return index < 4

    whole.store.get_each(whole.keys(hashes), visit, max_value_bytes=spec.value_nbytes)
    assert seen == [0, 1, 2, 3, 4]
    sink = Collect()  # every connection was left clean
    assert whole.fetch_prefix(hashes, sink) == 16
    assert sink.blocks == [(i, p.tobytes()) for i, p in enumerate(payloads)]
    assert whole.stats.snapshot()["errors"] == {}


def test_prefix_stops_at_a_deleted_middle_block(redis_cluster: RedisClusterServers,
                                                spec: BlockSpec) -> None:
    cache = _cache(redis_cluster, spec)
    hashes = cache.block_hashes(list(range(3000, 3040)), "gap")
    cache.publish(hashes, list(make_payloads(spec, len(hashes))))
    admin = RedisCluster.from_url(redis_cluster.url())
    try:
        admin.delete(cache.keys(hashes)[6])
    finally:
        admin.close()
    assert cache.lookup(hashes) == 6
    assert cache.fetch_prefix(hashes, Collect()) == 6


def test_a_dead_master_gives_counted_misses_until_it_is_back(spec: BlockSpec) -> None:
    cluster = start_cluster()
    try:
        cache = PrefixCache(RedisBlockStore.from_url(cluster.url(), cluster=True,
                                                     retry_after_s=0.1), spec)
        hashes = cache.block_hashes(list(range(48)))
        payloads = list(make_payloads(spec, len(hashes)))
        assert cache.publish(hashes, payloads) == 12
        cluster.nodes[0].terminate()
        assert cache.fetch_prefix(hashes, Collect()) < 12
        assert cache.stats.errors("connection") >= 1
        cluster.nodes[0].restart()
        cluster.wait_until_ok()
        time.sleep(0.2)
        cache.publish(hashes, payloads)  # the restarted master came back empty
        assert cache.fetch_prefix(hashes, Collect()) == 12
    finally:
        cluster.stop()
