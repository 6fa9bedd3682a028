"""RELIABILITY.md sections C and D where tests/services does not cover them already: fuzzed
Prefill calls, malformed requests that must not grow memory, a deadline that expires while the
prefill worker hangs, a decode worker killed mid-stream and restarted, a rolling restart."""

from __future__ import annotations

import signal

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.chaos import process_usage
from cachestore.hashing import hash_block_chain
from engine.runner import ModelRunner
from kvrelay.healthcheck import is_serving
from kvrelay.serving.runtime import block_spec
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc
from protos.kvrelay.v1 import prefill_pb2, prefill_pb2_grpc
from tests.reliability.conftest import (
    BLOCK_SIZE,
    Reference,
    Spawned,
    generate,
    request,
    status_of,
    wait_for,
)

PREFILL_DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                      grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fingerprint(reference: Reference) -> str:
    return block_spec(reference.loaded, ModelRunner(reference.loaded, num_blocks=1,
                                                    block_size=BLOCK_SIZE)).fingerprint


@FUZZ
@given(ids=st.lists(st.integers(-5, 600) | st.integers(-2**62, 2**62), max_size=80),
       salt=st.text(max_size=40), true_hashes=st.booleans(), true_model=st.booleans(),
       junk=st.lists(st.binary(max_size=40), max_size=4))
def test_fuzzed_prefill_calls_get_a_documented_status(
        shared_pair: tuple[Spawned, Spawned], fingerprint: str, ids: list[int], salt: str,
        true_hashes: bool, true_model: bool, junk: list[bytes]) -> None:
    prefill, _ = shared_pair
    hashes = junk
    if true_hashes and all(0 <= i < 2**32 for i in ids):
        hashes = [bytes(h) for h in hash_block_chain(ids, BLOCK_SIZE, fingerprint, salt)]
    call = prefill_pb2.PrefillRequest(token_ids=ids, cache_salt=salt, block_hashes=hashes,
                                      model_fingerprint=fingerprint if true_model else "x" * 32)
    with prefill.channel() as channel:
        stub = prefill_pb2_grpc.PrefillStub(channel)
        assert status_of(lambda: stub.Prefill(call, timeout=30)) in PREFILL_DOCUMENTED


def test_a_deadline_while_the_prefill_worker_hangs_is_deadline_exceeded_and_frees_kv(
        shared_pair: tuple[Spawned, Spawned], reference: Reference) -> None:
    prefill, decode = shared_pair
    prompt = "The prefill worker hangs and the client will not wait. " * 3
    prefill.process.send_signal(signal.SIGSTOP)
    try:
        code = status_of(lambda: generate(decode, request(prompt, "deadline", 200), timeout_s=1.0))
    finally:
        prefill.process.send_signal(signal.SIGCONT)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: decode.metric("kvrelay_kv_pool_used_blocks") == 0)
    wait_for(lambda: decode.metric("kvrelay_running_requests") == 0)
    reply = generate(decode, request(prompt, "deadline"))
    assert list(reply.token_ids) == reference.greedy(reference.tokenizer.encode(prompt), 8)


def test_a_decode_worker_killed_mid_stream_serves_again_after_restart(
        shared_pair: tuple[Spawned, Spawned], reference: Reference) -> None:
    _, decode = shared_pair
    long = pb.GenerateRequest(prompt="Tell a long story.", sampling=pb.SamplingParams(
        max_new_tokens=500, ignore_eos=True))
    with decode.channel() as channel:
        call = pb_grpc.GenerationStub(channel).GenerateStream(long, timeout=30)
        next(call)
        decode.process.kill()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    decode.start()  # same port and command
    prompt = "After the restart. " * 4
    reply = generate(decode, request(prompt, "restart"))
    assert list(reply.token_ids) == reference.greedy(reference.tokenizer.encode(prompt), 8)
    assert decode.metric("kvrelay_kv_pool_used_blocks") == 0
    assert decode.metric("kvrelay_running_requests") == 0


def test_malformed_and_bad_requests_leave_memory_and_files_flat(
        shared_pair: tuple[Spawned, Spawned]) -> None:
    _, decode = shared_pair
    bad = [b"\x00", b"\xff" * 64, b"\x0a\x05hello\x12", pb.GenerateRequest(
        prompt="x", sampling=pb.SamplingParams(top_p=7.0)).SerializeToString()]

    def hammer(rounds: int) -> None:
        with decode.channel() as channel:
            call = channel.unary_unary("/kvrelay.v1.Generation/Generate")
            for i in range(rounds):
                raw = bad[i % len(bad)]
                assert status_of(lambda raw=raw: call(raw, timeout=10)) \
                    == grpc.StatusCode.INVALID_ARGUMENT

    hammer(100)
    before = process_usage(decode.process.pid)
    hammer(400)
    after = process_usage(decode.process.pid)
    assert after["fds"] <= before["fds"] + 2
    assert after["rss_kib"] < before["rss_kib"] + 16 * 1024
    assert status_of(lambda: generate(decode, request("still up"))) == grpc.StatusCode.OK


def test_a_rolling_restart_under_load_drains_then_serves(
        shared_pair: tuple[Spawned, Spawned], reference: Reference) -> None:
    _, decode = shared_pair
    stream = pb.GenerateRequest(prompt="Keep talking while the worker drains.",
                                sampling=pb.SamplingParams(max_new_tokens=80, ignore_eos=True))
    with decode.channel() as channel:
        stub = pb_grpc.GenerationStub(channel)
        calls = [stub.GenerateStream(stream, timeout=30) for _ in range(3)]
        for call in calls:
            next(call)
        decode.process.send_signal(signal.SIGTERM)
        wait_for(lambda: not is_serving(decode.addr, timeout_s=0.5))
        assert status_of(lambda: stub.Generate(request("late"), timeout=10)) \
            == grpc.StatusCode.UNAVAILABLE
        finished = [list(call)[-1].usage.completion_tokens for call in calls]
    assert finished == [80, 80, 80]
    assert decode.process.wait(timeout=15) == 0
    decode.start()
    prompt = "Back after the rolling restart. " * 3
    reply = generate(decode, request(prompt, "rolled"))
    assert list(reply.token_ids) == reference.greedy(reference.tokenizer.encode(prompt), 8)
