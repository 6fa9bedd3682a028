"""Worker faults and limits: prefill down, cancellation, overload, draining on SIGTERM."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from kvrelay.cluster import free_port
from kvrelay.healthcheck import is_serving
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc
from tests.services.conftest import Reference, Worker, start_worker
from tests.support.redis_server import RedisServer, start_redis
from tests.support.timing import Stopwatch

PROMPT = "The prefill worker may be gone, but the request must still be answered. " * 3


def _long_request(max_new_tokens: int = 1500) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="Tell a very long story.", sampling=pb.SamplingParams(
        max_new_tokens=max_new_tokens, ignore_eos=True))


def _wait_for(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _generate(worker: Worker, prompt: str, salt: str) -> pb.GenerateResponse:
    request = pb.GenerateRequest(prompt=prompt, cache_salt=salt,
                                 sampling=pb.SamplingParams(max_new_tokens=8))
    with worker.channel() as channel:
        return pb_grpc.GenerationStub(channel).Generate(request, timeout=30)


def test_requests_succeed_by_local_prefill_when_the_prefill_worker_hangs_or_is_down(
        store: RedisServer, tiny_model_dir: Path, tmp_path: Path, reference: Reference) -> None:
    prefill = start_worker("prefill", tiny_model_dir, store.url(), tmp_path)
    decode = start_worker("decode", tiny_model_dir, store.url(), tmp_path,
                          prefill_addr=prefill.addr, extra=("--prefill-timeout-s", "1"))
    try:
        prefill.process.send_signal(signal.SIGSTOP)
        watch = Stopwatch()
        hung = _generate(decode, "Hung: " + PROMPT, "hung")
        assert watch.within(10), watch
        assert list(hung.token_ids) == reference.greedy(reference.tokenizer.encode("Hung: " + PROMPT), 8)
        assert decode.metric('kvrelay_local_prefill_fallbacks_total{reason="deadline_exceeded"}') == 1
        prefill.process.send_signal(signal.SIGCONT)
        prefill.stop()

        reply = _generate(decode, PROMPT, "down")
        ids = reference.tokenizer.encode(PROMPT)
        assert list(reply.token_ids) == reference.greedy(ids, 8)
        assert decode.metric('kvrelay_local_prefill_fallbacks_total{reason="unavailable"}') == 1
        # decode published what it computed itself: the same prompt is now a hit
        _wait_for(lambda: decode.metric("kvrelay_published_blocks_total") >= 2 * (len(ids) // 16))
        again = _generate(decode, PROMPT, "down")
        assert again.usage.cached_prompt_tokens == len(ids) // 16 * 16
        assert list(again.token_ids) == list(reply.token_ids)
    finally:
        decode.stop()
        prefill.process.send_signal(signal.SIGCONT)
        prefill.stop()


def test_a_decode_worker_killed_mid_stream_ends_the_stream_unavailable(
        store: RedisServer, tiny_model_dir: Path, tmp_path: Path) -> None:
    decode = start_worker("decode", tiny_model_dir, store.url(), tmp_path)
    try:
        with decode.channel() as channel:
            call = pb_grpc.GenerationStub(channel).GenerateStream(_long_request(), timeout=60)
            next(call)
            decode.process.kill()
            with pytest.raises(grpc.RpcError) as err:
                list(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        decode.stop()


def test_requests_succeed_by_recompute_when_the_store_is_down(
        tiny_model_dir: Path, tmp_path: Path, reference: Reference) -> None:
    nothing_there = f"redis://127.0.0.1:{free_port()}/0"
    decode = start_worker("decode", tiny_model_dir, nothing_there, tmp_path)
    try:
        request = pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(max_new_tokens=6))
        with decode.channel() as channel:
            replies = [pb_grpc.GenerationStub(channel).Generate(request, timeout=30)
                       for _ in range(2)]
        expected = reference.greedy(reference.tokenizer.encode(PROMPT), 6)
        assert [list(r.token_ids) for r in replies] == [expected, expected]
        assert all(r.usage.cached_prompt_tokens == 0 for r in replies)
        assert decode.metric("kvrelay_store_errors_total") >= 1
    finally:
        decode.stop()


@pytest.fixture(scope="module")
def lone_decode(store: RedisServer, tiny_model_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Worker:
    worker = start_worker("decode", tiny_model_dir, store.url(),
                          tmp_path_factory.mktemp("lone"), extra=("--max-requests", "2"))
    yield worker
    worker.stop()


def test_a_cancelled_stream_frees_its_kv(lone_decode: Worker) -> None:
    with lone_decode.channel() as channel:
        call = pb_grpc.GenerationStub(channel).GenerateStream(_long_request(), timeout=60)
        next(call)
        _wait_for(lambda: lone_decode.metric("kvrelay_kv_pool_used_blocks") > 0)
        call.cancel()
    _wait_for(lambda: lone_decode.metric("kvrelay_kv_pool_used_blocks") == 0)
    _wait_for(lambda: lone_decode.metric("kvrelay_running_requests") == 0)


def test_a_deadline_ends_the_request_and_frees_its_kv(lone_decode: Worker) -> None:
    with lone_decode.channel() as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GenerationStub(channel).Generate(_long_request(), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_for(lambda: lone_decode.metric("kvrelay_kv_pool_used_blocks") == 0)


def test_requests_beyond_the_limit_are_resource_exhausted(lone_decode: Worker) -> None:
    with lone_decode.channel() as channel:
        stub = pb_grpc.GenerationStub(channel)
        calls = [stub.GenerateStream(_long_request(), timeout=60) for _ in range(2)]
        for call in calls:
            next(call)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(prompt="one too many"), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in calls:
            call.cancel()
    _wait_for(lambda: lone_decode.metric("kvrelay_kv_pool_used_blocks") == 0)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(
        store: RedisServer, tiny_model_dir: Path, tmp_path: Path) -> None:
    decode = start_worker("decode", tiny_model_dir, store.url(), tmp_path)
    try:
        with decode.channel() as channel:
            stub = pb_grpc.GenerationStub(channel)
            call = stub.GenerateStream(_long_request(max_new_tokens=150), timeout=60)
            next(call)
            decode.process.send_signal(signal.SIGTERM)
            _wait_for(lambda: not is_serving(decode.addr))
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(pb.GenerateRequest(prompt="late"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(call)
        assert rest[-1].usage.completion_tokens == 150
        assert decode.process.wait(timeout=30) == 0
    finally:
        decode.stop()


def test_requests_wait_for_kv_blocks_when_the_pool_is_full(
        store: RedisServer, tiny_model_dir: Path, tmp_path: Path, reference: Reference) -> None:
    decode = start_worker("decode", tiny_model_dir, store.url(), tmp_path,
                          extra=("--num-blocks", "12"))
    prompts = [f"Request {i} asks for a long answer about the pool being full. " * 4
               for i in range(3)]  # 7 blocks each: two never fit at once
    try:
        def run(prompt: str) -> list[int]:
            request = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
                max_new_tokens=16, ignore_eos=True))
            with decode.channel() as channel:
                return list(pb_grpc.GenerationStub(channel).Generate(request, timeout=60).token_ids)

        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(run, prompts))
        for prompt, tokens in zip(prompts, results):
            ids = reference.tokenizer.encode(prompt)
            assert 6 * 16 < len(ids) and -(-(len(ids) + 16) // 16) <= 12
            assert tokens == reference.greedy(ids, 16, ignore_eos=True)
        assert decode.metric("kvrelay_kv_pool_used_blocks") == 0
    finally:
        decode.stop()


def test_decode_needs_only_read_access_to_the_store(
        store: RedisServer, tiny_model_dir: Path, tmp_path: Path, reference: Reference) -> None:
    admin = store.client()
    admin.execute_command("ACL", "SETUSER", "reader", "on", ">reader-pw", "~kvrelay:*",
                          "-@all", "+exists", "+get", "+getrange", "+strlen", "+ping", "+hello")
    read_only = store.url(username="reader", password="reader-pw")
    prefill = start_worker("prefill", tiny_model_dir, store.url(), tmp_path)
    decode = start_worker("decode", tiny_model_dir, read_only, tmp_path, prefill_addr=prefill.addr,
                          extra=("--publish-local-blocks", "false"))
    try:
        prompt = "Only the prefill worker writes to the store. " * 4
        ids = reference.tokenizer.encode(prompt)
        replies = [_generate(decode, prompt, "read-only") for _ in range(2)]
        assert [list(r.token_ids) for r in replies] == [reference.greedy(ids, 8)] * 2
        assert replies[1].usage.cached_prompt_tokens == len(ids) // 16 * 16
        short = "A short prompt that decode prefills by itself."  # under the prefill threshold
        assert 16 <= len(reference.tokenizer.encode(short)) < 32
        _generate(decode, short, "read-only")
        assert decode.metric("kvrelay_store_errors_total") == 0
    finally:
        decode.stop()
        prefill.stop()
        admin.execute_command("ACL", "DELUSER", "reader")


def test_a_hung_store_costs_misses_not_requests(
        tiny_model_dir: Path, tmp_path: Path, reference: Reference) -> None:
    hung = start_redis()
    decode = start_worker("decode", tiny_model_dir, hung.url(), tmp_path,
                          extra=("--store-timeout-s", "0.5"))
    try:
        hung.client().execute_command("CLIENT", "PAUSE", "8000", "ALL")
        watch = Stopwatch()
        assert is_serving(decode.addr, timeout_s=1.0)
        reply = _generate(decode, "The store is hung. " + PROMPT, "hung-store")
        assert watch.within(6.0), watch
        ids = reference.tokenizer.encode("The store is hung. " + PROMPT)
        assert list(reply.token_ids) == reference.greedy(ids, 8)
        assert reply.usage.cached_prompt_tokens == 0
        assert decode.metric('kvrelay_store_errors_total{kind="timeout"}') >= 1
    finally:
        decode.stop()
        hung.stop()
