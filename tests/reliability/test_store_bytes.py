"""RELIABILITY.md section B, the bytes in the store are wrong: written into the test's own
redis-server under the keys real workers read."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.reliability.conftest import (
    BLOCK_SIZE,
    Reference,
    Spawned,
    generate,
    request,
    spawn,
    wait_for,
)
from tests.support.redis_server import RedisServer

SYSTEM = ("Every block read from the store is verified before it touches KV memory: its header, "
          "fingerprint, token digest and checksum. A block that fails is a miss. ")


@pytest.fixture(scope="module")
def pair(redis: RedisServer, tiny_model_dir: Path, log_dir: Path) -> Iterator[tuple[Spawned, Spawned]]:
    """Prefill and decode with different hash seeds; decode never writes, prefill does."""
    prefill = spawn("prefill", tiny_model_dir, redis.url(), log_dir, env={"PYTHONHASHSEED": "1"})
    decode = spawn("decode", tiny_model_dir, redis.url(), log_dir, prefill_addr=prefill.addr,
                   env={"PYTHONHASHSEED": "2"}, extra=("--publish-local-blocks", "false"))
    yield prefill, decode
    decode.stop()
    prefill.stop()


def _pickle_bomb(_: bytes) -> bytes:
    return pickle.dumps(ValueError("never unpickled"))


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "flipped-bit": lambda v: v[:-7] + bytes([v[-7] ^ 0x10]) + v[-6:],
    "flipped-header-bit": lambda v: v[:9] + bytes([v[9] ^ 0x01]) + v[10:],
    "truncated": lambda v: v[: len(v) // 2],
    "too-long": lambda v: v + b"\0" * 64,
    "pickle": _pickle_bomb,
    "empty": lambda v: b"",
}


def _warm(decode: Spawned, reference: Reference, prompt: str, salt: str) -> list[str]:
    generate(decode, request(prompt, salt))
    ids = reference.tokenizer.encode(prompt)
    wait_for(lambda: generate(decode, request(prompt, salt)).usage.cached_prompt_tokens
             == len(ids) // BLOCK_SIZE * BLOCK_SIZE)
    return reference.block_keys(ids, BLOCK_SIZE, salt)


def test_workers_with_different_hash_seeds_share_blocks(
        pair: tuple[Spawned, Spawned], reference: Reference) -> None:
    prefill, decode = pair
    _warm(decode, reference, SYSTEM + "Hash seeds differ.", "seeds")
    assert decode.metric("kvrelay_local_prefill_fallbacks_total") == 0
    assert prefill.metric("kvrelay_prefill_computed_tokens_total") > 0


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_value_is_a_counted_miss_never_a_wrong_hit(
        redis: RedisServer, pair: tuple[Spawned, Spawned], reference: Reference, kind: str) -> None:
    _, decode = pair
    prompt = SYSTEM + f"Corruption: {kind}."
    keys = _warm(decode, reference, prompt, kind)
    admin = redis.client()
    admin.set(keys[1], CORRUPTIONS[kind](admin.get(keys[1])))
    failures = decode.metric("kvrelay_store_integrity_failures_total")
    reply = generate(decode, request(prompt, kind))
    assert reply.usage.cached_prompt_tokens == BLOCK_SIZE
    assert list(reply.token_ids) == reference.greedy(reference.tokenizer.encode(prompt), 8)
    assert decode.metric("kvrelay_store_integrity_failures_total") > failures


def test_a_valid_block_of_another_prompt_under_this_key_is_rejected(
        redis: RedisServer, pair: tuple[Spawned, Spawned], reference: Reference) -> None:
    _, decode = pair
    mine, other = SYSTEM + "Mine.", "Another prompt entirely, long enough for blocks. " * 4
    keys = _warm(decode, reference, mine, "swap")
    other_keys = _warm(decode, reference, other, "swap")
    admin = redis.client()
    admin.set(keys[1], admin.get(other_keys[1]))
    reply = generate(decode, request(mine, "swap"))
    assert reply.usage.cached_prompt_tokens == BLOCK_SIZE
    assert list(reply.token_ids) == reference.greedy(reference.tokenizer.encode(mine), 8)
    assert decode.metric('kvrelay_store_integrity_failures_total{reason="wrong_tokens"}') >= 1


def test_concurrent_writers_of_one_prefix_are_idempotent(
        pair: tuple[Spawned, Spawned], reference: Reference) -> None:
    _, decode = pair
    prompt = SYSTEM + "Four at once."
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: generate(decode, request(prompt, "racing")), range(4)))
    expected = reference.greedy(reference.tokenizer.encode(prompt), 8)
    assert [list(r.token_ids) for r in replies] == [expected] * 4
    again = generate(decode, request(prompt, "racing"))
    assert again.usage.cached_prompt_tokens == len(reference.tokenizer.encode(prompt)) // 16 * 16


def test_a_prefill_worker_dying_after_some_blocks_leaves_a_usable_prefix(
        redis: RedisServer, tiny_model_dir: Path, log_dir: Path, reference: Reference) -> None:
    dying = spawn("prefill", tiny_model_dir, redis.url(), log_dir,
                  extra=("--fault-exit-after-blocks", "2"))
    decode = spawn("decode", tiny_model_dir, redis.url(), log_dir, prefill_addr=dying.addr,
                   extra=("--publish-local-blocks", "false"))
    try:
        prompt = SYSTEM * 2 + "The prefill worker dies half way."
        expected = reference.greedy(reference.tokenizer.encode(prompt), 8)
        first = generate(decode, request(prompt, "dying"))
        assert dying.process.wait(timeout=10) == 70
        second = generate(decode, request(prompt, "dying"))
        assert list(first.token_ids) == list(second.token_ids) == expected
        assert second.usage.cached_prompt_tokens == 2 * BLOCK_SIZE
        assert decode.metric("kvrelay_local_prefill_fallbacks_total") == 2
    finally:
        decode.stop()
        dying.stop()
