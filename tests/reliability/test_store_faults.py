"""RELIABILITY.md section A, the store fails: against real workers and their own redis-server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvrelay.cluster import free_port
from kvrelay.healthcheck import is_serving
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc
from tests.reliability.conftest import (
    BLOCK_SIZE,
    Reference,
    Spawned,
    generate,
    request,
    spawn,
    wait_for,
)
from tests.support.fault_proxy import FaultProxy
from tests.support.redis_server import RedisServer
from tests.support.timing import Stopwatch

SYSTEM = ("Store faults cost cache hits, never requests. The store is only a cache, and "
          "every block that cannot be read is computed again by the worker itself. ")


@pytest.fixture(scope="module")
def pair(redis: RedisServer, tiny_model_dir: Path, log_dir: Path) -> Iterator[tuple[Spawned, Spawned]]:
    prefill = spawn("prefill", tiny_model_dir, redis.url(), log_dir, store_timeout_s=1.0)
    decode = spawn("decode", tiny_model_dir, redis.url(), log_dir, prefill_addr=prefill.addr,
                   store_timeout_s=1.0)
    yield prefill, decode
    decode.stop()
    prefill.stop()


@pytest.fixture(scope="module")
def proxy(redis: RedisServer) -> Iterator[FaultProxy]:
    relay = FaultProxy(redis.port)
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def proxied_decode(proxy: FaultProxy, tiny_model_dir: Path, log_dir: Path) -> Iterator[Spawned]:
    """A decode worker (no prefill worker) that reaches the store through the fault proxy."""
    worker = spawn("decode", tiny_model_dir, f"redis://127.0.0.1:{proxy.port}/0", log_dir,
                   store_timeout_s=0.3)
    yield worker
    worker.stop()


def _expected(reference: Reference, prompt: str, n: int = 8) -> list[int]:
    return reference.greedy(reference.tokenizer.encode(prompt), n)


def _full_blocks(reference: Reference, prompt: str) -> int:
    return len(reference.tokenizer.encode(prompt)) // BLOCK_SIZE * BLOCK_SIZE


def test_workers_start_without_redis_and_serve_by_recompute(
        tiny_model_dir: Path, log_dir: Path, reference: Reference) -> None:
    nothing = f"redis://127.0.0.1:{free_port()}/0"
    prefill = spawn("prefill", tiny_model_dir, nothing, log_dir)
    decode = spawn("decode", tiny_model_dir, nothing, log_dir, prefill_addr=prefill.addr)
    try:
        prompt = SYSTEM + "Nothing is listening."
        replies = [generate(decode, request(prompt, "absent")) for _ in range(3)]
        assert [list(r.token_ids) for r in replies] == [_expected(reference, prompt)] * 3
        assert all(r.usage.cached_prompt_tokens == 0 for r in replies)
        assert decode.metric('kvrelay_store_errors_total{kind="connection"}') >= 1
        assert decode.log().count("store error connection") == 1  # once, not per request
    finally:
        decode.stop()
        prefill.stop()


def test_redis_killed_under_load_then_restarted_empty(
        redis: RedisServer, pair: tuple[Spawned, Spawned], reference: Reference) -> None:
    _, decode = pair
    prompts = [SYSTEM + f"Question {i}: what happens now?" for i in range(4)]
    for p in prompts:
        generate(decode, request(p, "killed"))
    with ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(generate, decode, request(p, "killed", 40)) for p in prompts]
        time.sleep(0.3)
        redis.process.kill()
        replies = [f.result() for f in in_flight]
    for p, reply in zip(prompts, replies):
        assert list(reply.token_ids) == _expected(reference, p, 40)
    redis.restart()  # same port, nothing persisted
    cold = generate(decode, request(prompts[0], "killed"))
    assert cold.usage.cached_prompt_tokens == 0
    assert list(cold.token_ids) == _expected(reference, prompts[0])
    wait_for(lambda: generate(decode, request(prompts[0], "killed")).usage.cached_prompt_tokens
             == _full_blocks(reference, prompts[0]))


def test_a_paused_store_costs_misses_within_the_deadline(
        redis: RedisServer, pair: tuple[Spawned, Spawned], reference: Reference) -> None:
    prefill, decode = pair
    prompt = SYSTEM + "The store is paused."
    redis.client().execute_command("CLIENT", "PAUSE", "4000", "ALL")
    watch = Stopwatch()
    assert is_serving(decode.addr, timeout_s=1.0) and is_serving(prefill.addr, timeout_s=1.0)
    reply = generate(decode, request(prompt, "paused"), timeout_s=60.0)
    assert watch.within(3.5), watch
    assert list(reply.token_ids) == _expected(reference, prompt)
    assert decode.metric('kvrelay_store_errors_total{kind="timeout"}') >= 1


def test_a_full_store_with_noeviction_fails_publishes_not_requests(
        redis: RedisServer, pair: tuple[Spawned, Spawned], reference: Reference) -> None:
    prefill, decode = pair
    admin = redis.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", str(admin.info("memory")["used_memory"] + 1024))
    try:
        errors = prefill.metric("kvrelay_store_errors_total")
        prompt = SYSTEM + "Nothing more fits."
        replies = [generate(decode, request(prompt, "full")) for _ in range(2)]
        assert [list(r.token_ids) for r in replies] == [_expected(reference, prompt)] * 2
        assert replies[1].usage.cached_prompt_tokens == 0
        assert prefill.metric("kvrelay_store_errors_total") > errors
    finally:
        admin.config_set("maxmemory", "64mb")
        admin.config_set("maxmemory-policy", "allkeys-lru")


def test_a_denied_password_is_logged_and_counted_and_requests_succeed(
        redis: RedisServer, tiny_model_dir: Path, log_dir: Path, reference: Reference) -> None:
    decode = spawn("decode", tiny_model_dir, redis.url(username="nobody", password="wrong"),
                   log_dir)
    try:
        prompt = SYSTEM + "Who goes there?"
        replies = [generate(decode, request(prompt, "denied")) for _ in range(2)]
        assert [list(r.token_ids) for r in replies] == [_expected(reference, prompt)] * 2
        assert decode.metric('kvrelay_store_errors_total{kind="auth"}') >= 1
        assert decode.log().count("store error auth") == 1
    finally:
        decode.stop()


def test_a_slow_store_gives_misses_without_head_of_line_blocking(
        proxy: FaultProxy, proxied_decode: Spawned, reference: Reference) -> None:
    prompts = [SYSTEM + f"Slow store, request {i}." for i in range(3)]
    generate(proxied_decode, request(prompts[0], "slow"))  # cached while the store is fast
    shared = proxied_decode.metric("kvrelay_kv_pool_shared_tokens_total")
    proxy.faults.latency_s = 1.0
    try:
        watch = Stopwatch()
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda p: generate(proxied_decode, request(p, "slow")), prompts))
        assert watch.within(6.0), watch
    finally:
        proxy.faults.latency_s = 0.0
    for p, reply in zip(prompts, replies):
        assert list(reply.token_ids) == _expected(reference, p)
    # Nothing came from the store. A request that arrived while another with the same
    # first block was computing it may share that one's pool blocks, and counts them.
    shared = proxied_decode.metric("kvrelay_kv_pool_shared_tokens_total") - shared
    assert sum(r.usage.cached_prompt_tokens for r in replies) == shared
    assert proxied_decode.metric('kvrelay_store_errors_total{kind="timeout"}') >= 1


def test_a_connection_cut_inside_a_value_loads_nothing(
        redis: RedisServer, proxy: FaultProxy, proxied_decode: Spawned, reference: Reference) -> None:
    prompt = SYSTEM + "The connection is cut."
    generate(proxied_decode, request(prompt, "cut"))
    wait_for(lambda: generate(proxied_decode, request(prompt, "cut")).usage.cached_prompt_tokens > 0)
    errors = proxied_decode.metric("kvrelay_store_errors_total")
    proxy.drop_connections()
    proxy.faults.cut_after_bytes = 3000  # inside the first block's value
    try:
        reply = generate(proxied_decode, request(prompt, "cut"))
    finally:
        proxy.faults.cut_after_bytes = None
    assert list(reply.token_ids) == _expected(reference, prompt)
    assert reply.usage.cached_prompt_tokens == 0
    assert proxied_decode.metric("kvrelay_store_errors_total") > errors


def test_blocks_evicted_from_the_middle_leave_only_the_prefix_before_the_gap(
        redis: RedisServer, pair: tuple[Spawned, Spawned], reference: Reference) -> None:
    _, decode = pair
    prompt = SYSTEM * 2 + "Evicted in the middle."
    ids = reference.tokenizer.encode(prompt)
    generate(decode, request(prompt, "gap"))
    keys = reference.block_keys(ids, BLOCK_SIZE, "gap")
    assert len(keys) >= 5 and redis.client().delete(keys[2], keys[4]) == 2
    reply = generate(decode, request(prompt, "gap"))
    assert reply.usage.cached_prompt_tokens == 2 * BLOCK_SIZE
    assert list(reply.token_ids) == _expected(reference, prompt)


def test_a_stream_survives_a_store_restart(redis: RedisServer, pair: tuple[Spawned, Spawned]) -> None:
    _, decode = pair
    req = pb.GenerateRequest(prompt=SYSTEM, cache_salt="stream", sampling=pb.SamplingParams(
        max_new_tokens=60, ignore_eos=True))
    with decode.channel() as channel:
        call = pb_grpc.GenerationStub(channel).GenerateStream(req, timeout=30)
        next(call)
        redis.restart()
        rest = list(call)
    assert rest[-1].usage.completion_tokens == 60


def test_a_black_holed_store_times_out_into_misses(
        proxy: FaultProxy, proxied_decode: Spawned, reference: Reference) -> None:
    prompt = SYSTEM + "Packets to the store vanish."
    generate(proxied_decode, request(prompt, "blackhole-warm"))
    wait_for(lambda: generate(proxied_decode, request(prompt, "blackhole-warm"))
             .usage.cached_prompt_tokens > 0)  # the store answers again (no back-off)
    timeouts = proxied_decode.metric('kvrelay_store_errors_total{kind="timeout"}')
    proxy.drop_connections()
    proxy.faults.blackhole = True
    try:
        watch = Stopwatch()
        reply = generate(proxied_decode, request(prompt, "blackhole"), timeout_s=60.0)
        assert watch.within(3.0), watch
    finally:
        proxy.faults.blackhole = False
    assert list(reply.token_ids) == _expected(reference, prompt)
    assert reply.usage.cached_prompt_tokens == 0
    assert proxied_decode.metric('kvrelay_store_errors_total{kind="timeout"}') > timeouts
