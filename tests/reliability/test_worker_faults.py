"""RELIABILITY.md sections C and D where tests/services does not cover them already: fuzzed
Prefill calls, a deadline that expires while the prefill worker hangs, a decode worker killed
mid-stream and restarted."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachestore.hashing import hash_block_chain
from engine.runner import ModelRunner
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
    spawn,
    status_of,
    wait_for,
)
from tests.support.redis_server import RedisServer

PREFILL_DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                      grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pair(redis: RedisServer, tiny_model_dir: Path, log_dir: Path) -> Iterator[tuple[Spawned, Spawned]]:
    prefill = spawn("prefill", tiny_model_dir, redis.url(), log_dir)
    decode = spawn("decode", tiny_model_dir, redis.url(), log_dir, prefill_addr=prefill.addr,
                   extra=("--prefill-timeout-s", "20"))
    yield prefill, decode
    decode.stop()
    prefill.stop()


@pytest.fixture(scope="module")
def fingerprint(reference: Reference) -> str:
    return block_spec(reference.loaded, ModelRunner(reference.loaded, num_blocks=1,
                                                    block_size=BLOCK_SIZE)).fingerprint


@FUZZ
@given(ids=st.lists(st.integers(-5, 600) | st.integers(-2**62, 2**62), max_size=80),
       salt=st.text(max_size=40), true_hashes=st.booleans(), true_model=st.booleans(),
       junk=st.lists(st.binary(max_size=40), max_size=4))
def test_fuzzed_prefill_calls_get_a_documented_status(
        pair: tuple[Spawned, Spawned], fingerprint: str, ids: list[int], salt: str,
        true_hashes: bool, true_model: bool, junk: list[bytes]) -> None:
    prefill, _ = pair
    hashes = junk
    if true_hashes and all(0 <= i < 2**32 for i in ids):
        hashes = [bytes(h) for h in hash_block_chain(ids, BLOCK_SIZE, fingerprint, salt)]
    call = prefill_pb2.PrefillRequest(token_ids=ids, cache_salt=salt, block_hashes=hashes,
                                      model_fingerprint=fingerprint if true_model else "x" * 32)
    with prefill.channel() as channel:
        stub = prefill_pb2_grpc.PrefillStub(channel)
        assert status_of(lambda: stub.Prefill(call, timeout=30)) in PREFILL_DOCUMENTED


def test_a_deadline_while_the_prefill_worker_hangs_is_deadline_exceeded_and_frees_kv(
        pair: tuple[Spawned, Spawned], reference: Reference) -> None:
    prefill, decode = pair
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
        pair: tuple[Spawned, Spawned], reference: Reference) -> None:
    _, decode = pair
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
