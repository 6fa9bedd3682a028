"""RedisBlockStore against a real standalone redis-server started by the test."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import redis

from cachestore import redis_store
from cachestore.codec import BlockSpec
from cachestore.kvstore import PrefixCache
from cachestore.redis_store import RedisBlockStore
from tests.cachestore.conftest import Collect, make_payloads
from tests.support.redis_server import RedisServer, free_port, start_redis
from tests.support.timing import Stopwatch

TOKENS = list(range(1000, 1032))  # 8 full blocks of 4 tokens


def _cache(url: str, spec: BlockSpec, **options: Any) -> PrefixCache:
    store = RedisBlockStore.from_url(url, **options)
    return PrefixCache(store, spec, batch_bytes=3 * spec.value_nbytes)


def _publish(cache: PrefixCache) -> tuple[list, np.ndarray]:
    hashes = cache.block_hashes(TOKENS)
    payloads = make_payloads(cache.spec, len(hashes))
    cache.publish(hashes, list(payloads))
    return hashes, payloads


def test_blocks_round_trip_exactly(redis_server: RedisServer, spec: BlockSpec) -> None:
    cache = _cache(redis_server.url(), spec)
    hashes, payloads = _publish(cache)
    sink = Collect()
    assert cache.fetch_prefix(hashes, sink) == 8
    assert sink.blocks == [(i, payloads[i].tobytes()) for i in range(8)]
    assert cache.publish(hashes, list(payloads)) == 0
    assert cache.stats.snapshot()["errors"] == {}
    cache.store.close()


def test_lookup_and_fetch_stop_at_a_deleted_middle_block(redis_server: RedisServer,
                                                         spec: BlockSpec) -> None:
    cache = _cache(redis_server.url(), spec)
    hashes, _ = _publish(cache)
    with contextlib.closing(redis_server.client()) as admin:
        admin.delete(cache.keys(hashes)[5])
    sink = Collect()
    assert cache.lookup(hashes) == 5
    assert cache.fetch_prefix(hashes, sink) == 5
    assert [i for i, _ in sink.blocks] == [0, 1, 2, 3, 4]


def test_fetch_stops_at_an_overwritten_middle_block(redis_server: RedisServer,
                                                    spec: BlockSpec) -> None:
    cache = _cache(redis_server.url(), spec)
    hashes, _ = _publish(cache)
    key = cache.keys(hashes)[4]
    with contextlib.closing(redis_server.client()) as admin:
        value = bytearray(admin.get(key))  # type: ignore[arg-type]
        value[200] ^= 0xFF
        admin.set(key, bytes(value))
    assert cache.lookup(hashes) == 8
    assert cache.fetch_prefix(hashes, Collect()) == 4
    assert cache.stats.integrity_failures("wrong_checksum") == 1


def test_writes_carry_the_ttl(redis_server: RedisServer, spec: BlockSpec) -> None:
    cache = _cache(redis_server.url(), spec, ttl_s=120)
    hashes, _ = _publish(cache)
    with contextlib.closing(redis_server.client()) as admin:
        ttls = [admin.ttl(key) for key in cache.keys(hashes)]
    assert all(0 < ttl <= 120 for ttl in ttls)


def test_unreachable_server_gives_quick_counted_misses(spec: BlockSpec) -> None:
    cache = _cache(f"redis://127.0.0.1:{free_port()}/0", spec, retry_after_s=30.0)
    hashes = cache.block_hashes(TOKENS)
    watch = Stopwatch()
    assert cache.lookup(hashes) == 0
    assert cache.fetch_prefix(hashes, Collect()) == 0
    assert cache.publish(hashes, list(make_payloads(spec, 8))) == 0
    assert watch.within(2.0), watch
    assert cache.stats.errors("connection") == 1
    assert cache.stats.errors("unavailable") > 0


def test_reconnects_after_a_restart(redis_server: RedisServer, spec: BlockSpec) -> None:
    cache = _cache(redis_server.url(), spec, retry_after_s=0.2)
    hashes, _ = _publish(cache)
    redis_server.terminate()
    assert cache.lookup(hashes) == 0
    assert cache.stats.errors("connection") == 1
    redis_server.restart()
    time.sleep(0.3)
    assert cache.lookup(hashes) == 0  # restarted empty
    _publish(cache)
    assert cache.fetch_prefix(hashes, Collect()) == 8


def test_paused_server_times_out_quickly(redis_server: RedisServer, spec: BlockSpec) -> None:
    cache = _cache(redis_server.url(), spec, timeout_s=0.3)
    hashes, _ = _publish(cache)
    with contextlib.closing(redis_server.client()) as admin:
        admin.execute_command("CLIENT", "PAUSE", 2000, "ALL")
        watch = Stopwatch()
        assert cache.fetch_prefix(hashes, Collect()) == 0
        assert watch.within(1.0), watch
        assert cache.stats.errors("timeout") == 1
        admin.execute_command("CLIENT", "UNPAUSE")


def test_full_server_with_noeviction_refuses_writes(spec: BlockSpec) -> None:
    server = start_redis(["--maxmemory-policy", "noeviction"])
    try:
        cache = _cache(server.url(), spec)
        with contextlib.closing(server.client()) as admin:
            admin.set("filler", b"x" * 2_000_000)
            admin.config_set("maxmemory", "1mb")
        hashes = cache.block_hashes(TOKENS)
        assert cache.publish(hashes, list(make_payloads(spec, 8))) == 0
        assert cache.stats.errors("oom") == 8
    finally:
        server.stop()


def test_read_only_acl_user_reads_and_is_refused_writes(redis_server: RedisServer,
                                                       spec: BlockSpec) -> None:
    with contextlib.closing(redis_server.client()) as admin:
        admin.acl_setuser("reader", enabled=True, passwords=["+r3ad"], keys=["*"],
                          commands=["+@read", "+@connection"])
    writer = _cache(redis_server.url(), spec)
    hashes, _ = _publish(writer)
    reader = _cache(redis_server.url("reader", "r3ad"), spec)
    assert reader.lookup(hashes) == 8
    assert reader.fetch_prefix(hashes, Collect()) == 8
    other = reader.block_hashes([5] * 8)
    assert reader.publish(other, list(make_payloads(spec, 2))) == 0
    assert reader.stats.errors("noperm") == 2
    assert writer.lookup(other) == 0


def test_wrong_password_is_counted_not_raised(spec: BlockSpec) -> None:
    server = start_redis(password="s3cret")
    try:
        cache = _cache(server.url(password="wrong"), spec)
        assert cache.lookup(cache.block_hashes(TOKENS)) == 0
        assert cache.stats.errors("auth") == 1
        good = _cache(server.url(), spec)
        hashes, _ = _publish(good)
        assert good.fetch_prefix(hashes, Collect()) == 8
    finally:
        server.stop()


def test_stopping_a_stream_early_leaves_the_connection_usable(redis_server: RedisServer,
                                                             spec: BlockSpec) -> None:
    cache = _cache(redis_server.url(), spec, max_connections=1)
    hashes, payloads = _publish(cache)
    keys = cache.keys(hashes)
    seen: list[int] = []

    def visit(index: int, value: memoryview | None) -> bool:
        seen.append(index)
        return index < 2

    cache.store.get_each(keys, visit)
    assert seen == [0, 1, 2]
    values = cache.store.get_many(keys)
    assert [bytes(v or b"")[-payloads[0].nbytes:] for v in values] == [
        p.tobytes() for p in payloads]
    assert cache.stats.snapshot()["errors"] == {}


def _gets_served(server: RedisServer) -> int:
    with contextlib.closing(redis.Redis.from_url(server.url())) as admin:
        return int(admin.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


def test_a_payload_of_the_wrong_size_is_refused_before_anything_is_sent(
        redis_server: RedisServer, spec: BlockSpec) -> None:
    cache = _cache(redis_server.url(), spec)
    hashes = cache.block_hashes([7] * 32)
    payloads = list(make_payloads(spec, len(hashes)))
    payloads[5] = payloads[5][:-1]  # values are encoded while they are sent, checked before
    with pytest.raises(ValueError, match="payload has"):
        cache.publish(hashes, payloads)
    assert cache.lookup(hashes) == 0
    assert cache.stats.snapshot()["errors"] == {}


def test_fetch_keeps_a_window_of_requests_ahead(redis_server: RedisServer, spec: BlockSpec,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_store, "FETCH_AHEAD_BYTES", 2 * spec.value_nbytes)  # 2 ahead
    cache = _cache(redis_server.url(), spec, max_connections=1)
    cache = PrefixCache(cache.store, spec)  # one batch: the window alone paces the GETs
    hashes, payloads = _publish(cache)
    sink = Collect()
    assert cache.fetch_prefix(hashes, sink) == len(hashes) == 8
    assert sink.blocks == [(i, p.tobytes()) for i, p in enumerate(payloads)]

    # Stopping at block 2 leaves blocks 4-7 unrequested: at most two were ahead of it.
    before = _gets_served(redis_server)
    seen: list[int] = []

    def visit(index: int, value: memoryview | None) -> bool:
        seen.append(index)
        return index < 2

    cache.store.get_each(cache.keys(hashes), visit, max_value_bytes=spec.value_nbytes)
    assert seen == [0, 1, 2]
    assert _gets_served(redis_server) - before == 4
    sink = Collect()  # the one connection is clean: nothing left unread on it
    assert cache.fetch_prefix(hashes, sink) == 8
    assert sink.blocks == [(i, p.tobytes()) for i, p in enumerate(payloads)]
    assert cache.stats.snapshot()["errors"] == {}


def test_concurrent_fetches_and_publishes_from_threads(redis_server: RedisServer,
                                                       spec: BlockSpec) -> None:
    # Generous timeout: this test is about threads sharing connections, not deadlines.
    cache = _cache(redis_server.url(), spec, max_connections=4, timeout_s=30.0,
                   connect_timeout_s=30.0)
    prompts = [[seed] * 4 + list(range(28)) for seed in range(8)]
    payloads = {seed: make_payloads(spec, 8, seed) for seed in range(8)}

    def work(seed: int) -> bool:
        hashes = cache.block_hashes(prompts[seed])
        cache.publish(hashes, list(payloads[seed]))
        sink = Collect()
        return (cache.fetch_prefix(hashes, sink) == 8
                and sink.blocks == [(i, payloads[seed][i].tobytes()) for i in range(8)])

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(work, list(range(8)) * 3))
    assert cache.stats.snapshot()["errors"] == {}


def test_an_oversized_value_is_dropped_unread_and_counted(redis_server: RedisServer,
                                                         spec: BlockSpec) -> None:
    cache = _cache(redis_server.url(), spec)
    hashes, _ = _publish(cache)
    with contextlib.closing(redis_server.client()) as admin:
        admin.set(cache.keys(hashes)[3], b"KVRB" + b"\0" * 5_000_000)
    sink = Collect()
    assert cache.fetch_prefix(hashes, sink) == 3
    assert cache.stats.integrity_failures("too_large") == 1
    assert cache._arena().capacity < 5_000_000
    assert cache.fetch_prefix(hashes[:3], Collect()) == 3
    assert cache.stats.snapshot()["errors"] == {}


def test_stopped_server_process_times_out_quickly(redis_server: RedisServer,
                                                  spec: BlockSpec) -> None:
    cache = _cache(redis_server.url(), spec, timeout_s=0.3, retry_after_s=0.1)
    hashes, _ = _publish(cache)
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        watch = Stopwatch()
        assert cache.fetch_prefix(hashes, Collect()) == 0
        assert cache.publish(cache.block_hashes([9] * 8), list(make_payloads(spec, 2))) == 0
        assert watch.within(1.5), watch
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    assert cache.stats.errors("timeout") >= 1
    # Back by itself once retry_after_s has passed; on a stalled machine the first calls
    # after SIGCONT may still time out, so poll rather than sleep a fixed time.
    deadline = time.monotonic() + 30
    while cache.fetch_prefix(hashes, Collect()) != 8:
        assert time.monotonic() < deadline, "the store did not come back"
        time.sleep(0.1)


def test_lru_eviction_leaves_only_a_contiguous_verified_prefix(spec: BlockSpec) -> None:
    server = start_redis(["--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru"])
    try:
        cache = _cache(server.url(), spec)
        hashes = cache.block_hashes(list(range(4 * 6000)))
        cache.publish(hashes, list(make_payloads(spec, len(hashes))))
        sink = Collect()
        fetched = cache.fetch_prefix(hashes, sink)
        assert fetched < len(hashes)
        assert [i for i, _ in sink.blocks] == list(range(fetched))
        assert cache.stats.snapshot()["integrity"] == {}
    finally:
        server.stop()


def test_payloads_reach_the_socket_without_a_copy(redis_server: RedisServer, spec: BlockSpec,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import cachestore.pipeline

    sent: list[memoryview] = []
    real_send = cachestore.pipeline.send_buffers

    def recording_send(sock: object, buffers: Iterable[Any]) -> None:
        views = [memoryview(b) for b in buffers]
        sent.extend(views)
        real_send(sock, views)  # type: ignore[arg-type]

    monkeypatch.setattr(cachestore.pipeline, "send_buffers", recording_send)
    big = BlockSpec(spec.fingerprint, "float32", num_layers=4, block_size=4, num_kv_heads=4,
                    head_dim=64)  # 32 KiB payloads: above the size that is framed inline
    cache = _cache(redis_server.url(), big)
    hashes = cache.block_hashes(TOKENS)
    payloads = make_payloads(big, len(hashes))
    assert cache.publish(hashes, list(payloads)) == len(hashes)
    for payload in payloads:
        assert any(np.shares_memory(np.frombuffer(view, np.uint8), payload) for view in sent
                   if view.nbytes == payload.nbytes)
