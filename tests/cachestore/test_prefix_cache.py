"""PrefixCache over the in-memory store: prefix semantics, verification, counters."""

from __future__ import annotations

import numpy as np
import pytest

from cachestore.codec import BlockSpec, encode_block
from cachestore.kvstore import PrefixCache
from cachestore.store import MemoryBlockStore, NullBlockStore
from tests.cachestore.conftest import Collect, make_payloads

TOKENS = list(range(100, 124))  # 6 full blocks of 4 tokens


@pytest.fixture
def cache(spec: BlockSpec) -> PrefixCache:
    return PrefixCache(MemoryBlockStore(), spec, batch_bytes=2 * spec.value_nbytes)


def _publish_all(cache: PrefixCache, tokens: list[int] = TOKENS, salt: str = ""
                 ) -> tuple[list, np.ndarray]:
    hashes = cache.block_hashes(tokens, salt)
    payloads = make_payloads(cache.spec, len(hashes), seed=len(salt))
    assert cache.publish(hashes, list(payloads)) == len(hashes)
    return hashes, payloads


def test_fetch_returns_every_block_in_order(cache: PrefixCache) -> None:
    hashes, payloads = _publish_all(cache)
    sink = Collect()
    assert cache.lookup(hashes) == 6
    assert cache.fetch_prefix(hashes, sink) == 6
    assert sink.blocks == [(i, payloads[i].tobytes()) for i in range(6)]
    assert cache.stats.count("hits") == 6 and cache.stats.count("misses") == 0


def test_publish_is_idempotent(cache: PrefixCache) -> None:
    hashes, payloads = _publish_all(cache)
    assert cache.publish(hashes, list(payloads)) == 0


def test_missing_middle_block_ends_the_prefix(cache: PrefixCache) -> None:
    hashes, _ = _publish_all(cache)
    del cache.store.values[cache.keys(hashes)[3]]  # type: ignore[attr-defined]
    sink = Collect()
    assert cache.lookup(hashes) == 3
    assert cache.fetch_prefix(hashes, sink) == 3
    assert [i for i, _ in sink.blocks] == [0, 1, 2]
    assert cache.stats.count("misses") == 3


def test_corrupt_middle_block_ends_the_prefix_and_is_counted(cache: PrefixCache) -> None:
    hashes, _ = _publish_all(cache)
    key = cache.keys(hashes)[2]
    values = cache.store.values  # type: ignore[attr-defined]
    flipped = bytearray(values[key])
    flipped[-7] ^= 0x10
    values[key] = bytes(flipped)
    assert cache.fetch_prefix(hashes, Collect()) == 2
    assert cache.stats.integrity_failures("wrong_checksum") == 1


def test_valid_block_of_another_prompt_under_this_key_is_rejected(cache: PrefixCache) -> None:
    hashes, _ = _publish_all(cache)
    other = cache.block_hashes([7] * 24)
    values = cache.store.values  # type: ignore[attr-defined]
    foreign = encode_block(cache.spec, other[1], make_payloads(cache.spec, 1, seed=9)[0])
    values[cache.keys(hashes)[1]] = b"".join(bytes(p) for p in foreign)
    assert cache.fetch_prefix(hashes, Collect()) == 1
    assert cache.stats.integrity_failures("wrong_tokens") == 1


def test_salts_do_not_share_blocks(cache: PrefixCache) -> None:
    _publish_all(cache, salt="tenant-a")
    assert cache.lookup(cache.block_hashes(TOKENS, "tenant-b")) == 0
    assert cache.lookup(cache.block_hashes(TOKENS, "tenant-a")) == 6


def test_shared_prefix_is_reused_by_a_longer_prompt(cache: PrefixCache) -> None:
    _publish_all(cache)
    longer = cache.block_hashes(TOKENS + [1, 2, 3, 4, 5])
    assert len(longer) == 7
    assert cache.fetch_prefix(longer, Collect()) == 6


def test_memory_store_honours_ttl(spec: BlockSpec) -> None:
    now = [100.0]
    cache = PrefixCache(MemoryBlockStore(clock=lambda: now[0]), spec, ttl_s=10)
    hashes, _ = _publish_all(cache)
    now[0] += 9
    assert cache.lookup(hashes) == 6
    now[0] += 2
    assert cache.lookup(hashes) == 0


def test_a_failing_sink_propagates_and_stops_the_fetch(cache: PrefixCache) -> None:
    hashes, _ = _publish_all(cache)
    calls: list[int] = []

    def sink(index: int, payload: memoryview) -> None:
        calls.append(index)
        if index == 2:
            raise MemoryError("KV pool full")

    with pytest.raises(MemoryError):
        cache.fetch_prefix(hashes, sink)
    assert calls == [0, 1, 2]
    assert cache.stats.snapshot()["errors"] == {}


@pytest.mark.parametrize("stored", [b"", b"\x80\x04K\x01.", b"KVRB"])
def test_short_or_foreign_values_are_rejected(cache: PrefixCache, stored: bytes) -> None:
    hashes, _ = _publish_all(cache)
    cache.store.values[cache.keys(hashes)[0]] = stored  # type: ignore[attr-defined]
    sink = Collect()
    assert cache.fetch_prefix(hashes, sink) == 0
    assert sink.blocks == []
    assert cache.stats.integrity_failures("truncated") == 1


def test_null_store_misses_everything(spec: BlockSpec) -> None:
    cache = PrefixCache(NullBlockStore(), spec)
    hashes = cache.block_hashes(TOKENS)
    assert cache.publish(hashes, list(make_payloads(spec, len(hashes)))) == 0
    assert cache.lookup(hashes) == 0
    assert cache.fetch_prefix(hashes, Collect()) == 0
    assert cache.stats.count("misses") == len(hashes)


def test_publish_refuses_mismatched_lengths(cache: PrefixCache) -> None:
    hashes = cache.block_hashes(TOKENS)
    with pytest.raises(ValueError):
        cache.publish(hashes, list(make_payloads(cache.spec, len(hashes) - 1)))


def test_an_oversized_value_is_rejected(cache: PrefixCache) -> None:
    hashes, _ = _publish_all(cache)
    values = cache.store.values  # type: ignore[attr-defined]
    values[cache.keys(hashes)[1]] += b"\0" * 10
    assert cache.fetch_prefix(hashes, Collect()) == 1
    assert cache.stats.integrity_failures("too_large") == 1
