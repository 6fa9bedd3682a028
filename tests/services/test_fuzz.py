"""Fuzzed requests against a real decode worker: a documented status, and it stays up."""

from __future__ import annotations

import math

import grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc
from tests.services.conftest import Cluster

DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
              grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

samplings = st.builds(
    pb.SamplingParams,
    max_new_tokens=st.integers(-5, 8) | st.just(2**31 - 1),
    temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
    top_k=st.integers(-3, 2000),
    top_p=st.floats(-1, 2, width=32) | st.just(math.nan),
    seed=st.integers(0, 2**64 - 1),
    stop=st.lists(st.text(max_size=4), max_size=3),
    stop_token_ids=st.lists(st.integers(-2**40, 2**40), max_size=3),
)
inputs = st.one_of(
    st.builds(lambda p: {"prompt": p}, st.text(max_size=200)),
    st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)},
              st.lists(st.integers(-2**62, 2**62) | st.integers(0, 800), max_size=40)),
    st.builds(lambda turns: {"messages": pb.ChatMessages(messages=turns)},
              st.lists(st.builds(pb.ChatMessage, role=st.text(max_size=8),
                                 content=st.text(max_size=40)), max_size=3)),
)


def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@FUZZ
@given(fields=inputs, sampling=samplings, salt=st.text(max_size=300))
def test_fuzzed_requests_get_a_documented_status(cluster: Cluster, fields: dict, sampling: pb.SamplingParams,
                                                 salt: str) -> None:
    request = pb.GenerateRequest(sampling=sampling, cache_salt=salt, **fields)
    with cluster.decodes[1].channel() as channel:
        stub = pb_grpc.GenerationStub(channel)
        assert _code(lambda: stub.Generate(request, timeout=30)) in DOCUMENTED


@FUZZ
@given(raw=st.binary(max_size=300))
@example(raw=b"\x00")  # field number 0: never valid protobuf
def test_malformed_bytes_get_a_status_and_the_worker_stays_up(cluster: Cluster, raw: bytes) -> None:
    with cluster.decodes[1].channel() as channel:
        call = channel.unary_unary("/kvrelay.v1.Generation/Generate")
        code = _code(lambda: call(raw, timeout=30))
        assert code in DOCUMENTED
        ok = _code(lambda: pb_grpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(prompt="still up?", sampling=pb.SamplingParams(max_new_tokens=1)),
            timeout=30))
        assert ok == grpc.StatusCode.OK
