"""Fetched payloads received straight into memory the caller names (``fetch_prefix``'s
``land``: the decode worker's KV pool blocks), verified there, never copied again, and
never handed over when they do not verify."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from cachestore.codec import HEADER_SIZE, BlockSpec
from cachestore.kvstore import PrefixCache
from cachestore.redis_store import RedisBlockStore
from tests.cachestore.conftest import FINGERPRINT, make_payloads
from tests.support.redis_server import RedisServer

# 64 KiB payloads: large enough to be received into an arena (small replies are not)
SPEC = BlockSpec(FINGERPRINT, "float32", num_layers=4, block_size=16, num_kv_heads=4,
                 head_dim=32)
TOKENS = list(range(500, 500 + 6 * SPEC.block_size))


class Pool:
    """Destinations for the fetch (``land``) and a sink recording what it was handed."""

    def __init__(self, count: int, refuse: set[int] | None = None) -> None:
        self.memory = np.zeros((count, SPEC.payload_nbytes), np.uint8)
        self.refuse = refuse or set()
        self.asked: list[int] = []
        self.handed: list[tuple[int, bool, bytes]] = []  # (index, in place, bytes)

    def land(self, index: int) -> memoryview | None:
        self.asked.append(index)
        return None if index in self.refuse else memoryview(self.memory[index])

    def sink(self, index: int, payload: memoryview) -> None:
        in_place = np.frombuffer(payload, np.uint8).ctypes.data == self.memory[index].ctypes.data
        self.handed.append((index, in_place, bytes(payload)))


@pytest.fixture
def published(redis_server: RedisServer) -> tuple[PrefixCache, list, np.ndarray]:
    cache = PrefixCache(RedisBlockStore.from_url(redis_server.url()), SPEC,
                        batch_bytes=4 * SPEC.value_nbytes)  # two batches of the six
    hashes = cache.block_hashes(TOKENS)
    payloads = make_payloads(SPEC, len(hashes), seed=5)
    assert cache.publish(hashes, list(payloads)) == len(hashes)
    return cache, hashes, payloads


def test_payloads_are_received_in_place_and_handed_over_as_that_memory(
        published: tuple[PrefixCache, list, np.ndarray]) -> None:
    cache, hashes, payloads = published
    pool = Pool(len(hashes))
    assert cache.fetch_prefix(hashes, pool.sink, pool.land) == len(hashes)
    assert pool.asked == list(range(len(hashes)))
    assert [(i, in_place) for i, in_place, _ in pool.handed] == [(i, True) for i in range(6)]
    assert all(data == payloads[i].tobytes() for i, _, data in pool.handed)
    assert all(pool.memory[i].tobytes() == payloads[i].tobytes() for i in range(6))


def test_a_block_with_nowhere_to_land_arrives_as_usual(
        published: tuple[PrefixCache, list, np.ndarray]) -> None:
    cache, hashes, payloads = published
    pool = Pool(len(hashes), refuse={1, 4})
    assert cache.fetch_prefix(hashes, pool.sink, pool.land) == len(hashes)
    assert [in_place for _, in_place, _ in pool.handed] == [True, False, True, True, False, True]
    assert all(data == payloads[i].tobytes() for i, _, data in pool.handed)


@pytest.mark.parametrize("damage,reason", [("payload", "wrong_checksum"),
                                           ("header", "wrong_format"),  # a byte of the shape
                                           ("truncated", "truncated")])
def test_a_block_that_does_not_verify_is_never_handed_over(
        published: tuple[PrefixCache, list, np.ndarray], redis_server: RedisServer,
        damage: str, reason: str) -> None:
    cache, hashes, _ = published
    key = cache.keys(hashes)[2]
    with contextlib.closing(redis_server.client()) as admin:
        value = bytearray(admin.get(key))
        if damage == "payload":
            value[HEADER_SIZE + 100] ^= 0x01
        elif damage == "header":
            value[10] ^= 0x01
        else:
            value = value[:-7]
        admin.set(key, bytes(value))
    pool = Pool(len(hashes))
    assert cache.fetch_prefix(hashes, pool.sink, pool.land) == 2
    assert [i for i, _, _ in pool.handed] == [0, 1]
    assert cache.stats.snapshot()["integrity"] == {reason: 1}
