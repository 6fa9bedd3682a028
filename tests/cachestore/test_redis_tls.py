"""RedisBlockStore over TLS (rediss://) against a real TLS-only redis-server."""

from __future__ import annotations

import pytest

from cachestore import redis_store
from cachestore.codec import BlockSpec
from cachestore.kvstore import PrefixCache
from cachestore.redis_store import RedisBlockStore
from tests.cachestore.conftest import Collect, make_payloads
from tests.support.redis_server import RedisServer


@pytest.mark.parametrize("ahead", [None, 2])
def test_blocks_round_trip_over_tls(redis_tls: RedisServer, spec: BlockSpec, ahead: int | None,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert redis_tls.url().startswith("rediss://") and redis_tls.tls is not None
    if ahead is not None:  # GETs written a few at a time while replies are read
        monkeypatch.setattr(redis_store, "FETCH_AHEAD_BYTES", ahead * spec.value_nbytes)
    store = RedisBlockStore.from_url(redis_tls.url(), tls_ca_file=str(redis_tls.tls.ca_cert))
    cache = PrefixCache(store, spec, batch_bytes=6 * spec.value_nbytes)
    hashes = cache.block_hashes(list(range(40)) if ahead is None else list(range(100, 140)))
    payloads = make_payloads(spec, len(hashes))
    assert cache.publish(hashes, list(payloads)) == 10
    sink = Collect()
    assert cache.fetch_prefix(hashes, sink) == 10
    assert sink.blocks == [(i, payloads[i].tobytes()) for i in range(10)]
    assert cache.stats.snapshot()["errors"] == {}


def test_untrusted_server_certificate_is_a_counted_miss(redis_tls: RedisServer,
                                                        spec: BlockSpec) -> None:
    cache = PrefixCache(RedisBlockStore.from_url(redis_tls.url()), spec)
    assert cache.lookup(cache.block_hashes(list(range(8)))) == 0
    assert cache.stats.errors("connection") == 1


def test_plaintext_client_gets_no_blocks_from_a_tls_port(redis_tls: RedisServer,
                                                         spec: BlockSpec) -> None:
    plain = redis_tls.url().replace("rediss://", "redis://")
    cache = PrefixCache(RedisBlockStore.from_url(plain, timeout_s=0.3), spec)
    assert cache.lookup(cache.block_hashes(list(range(8)))) == 0
    assert sum(cache.stats.snapshot()["errors"].values()) == 1
