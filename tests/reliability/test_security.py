"""RELIABILITY.md section E: API keys, tenant isolation, the prefill worker's callers, mTLS."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrelay.client import open_channel
from kvrelay.healthcheck import is_serving
from kvrelay.serving.auth import KeyRing, bearer, parse_key_file, tenant_salt, with_api_key
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc
from protos.kvrelay.v1 import prefill_pb2, prefill_pb2_grpc
from tests.reliability.conftest import Reference, Spawned, generate, request, spawn, status_of
from tests.support.redis_server import RedisServer, make_tls_files

ALICE, BOB, DECODE = "alice-key-0123456789", "bob-key-0123456789ab", "decode-token-0123456789"
PROMPT = ("Tenants must never learn from the time to first token what other tenants asked. "
          "The server derives every cache salt from the caller's key. ")


@pytest.fixture(scope="module")
def secured(redis: RedisServer, tiny_model_dir: Path, log_dir: Path
            ) -> Iterator[tuple[Spawned, Spawned]]:
    (log_dir / "tenants.keys").write_text(f"# tenant key\nalice {ALICE}\nbob {BOB}\n")
    (log_dir / "prefill.keys").write_text(f"decode {DECODE}\n")
    (log_dir / "decode.token").write_text(DECODE + "\n")
    prefill = spawn("prefill", tiny_model_dir, redis.url(), log_dir,
                    extra=("--api-keys-file", str(log_dir / "prefill.keys")))
    decode = spawn("decode", tiny_model_dir, redis.url(), log_dir, prefill_addr=prefill.addr,
                   extra=("--api-keys-file", str(log_dir / "tenants.keys"),
                          "--max-streams-per-tenant", "1",
                          "--prefill-api-key-file", str(log_dir / "decode.token")))
    yield prefill, decode
    decode.stop()
    prefill.stop()


@pytest.mark.parametrize("metadata", [None, bearer("alice-key-0123456788"), bearer(""),
                                      (("authorization", ALICE),)], ids=["none", "wrong", "empty",
                                                                         "not-bearer"])
def test_a_missing_or_wrong_key_is_unauthenticated(secured: tuple[Spawned, Spawned],
                                                   metadata: tuple | None) -> None:
    _, decode = secured
    code = status_of(lambda: generate(decode, request("hello"), metadata=metadata))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert is_serving(decode.addr)  # health stays open for probes


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=80))
def test_fuzzed_authorization_headers_are_unauthenticated(
        secured: tuple[Spawned, Spawned], value: str) -> None:
    _, decode = secured
    for metadata in ((("authorization", value),), (("authorization", "Bearer " + value),)):
        code = status_of(lambda m=metadata: generate(decode, request("hi", max_new_tokens=1),
                                                     metadata=m))
        assert code == grpc.StatusCode.UNAUTHENTICATED


def test_tenants_never_share_cached_blocks_whatever_salt_they_send(
        secured: tuple[Spawned, Spawned], reference: Reference) -> None:
    prefill, decode = secured
    expected = reference.greedy(reference.tokenizer.encode(PROMPT), 8)
    alice = [generate(decode, request(PROMPT, "same"), metadata=bearer(ALICE)) for _ in range(2)]
    bob = generate(decode, request(PROMPT, "same"), metadata=bearer(BOB))
    assert [list(r.token_ids) for r in (*alice, bob)] == [expected] * 3
    assert alice[0].usage.cached_prompt_tokens == 0 < alice[1].usage.cached_prompt_tokens
    assert bob.usage.cached_prompt_tokens == 0
    forged = generate(decode, request(PROMPT, tenant_salt("alice", "same")), metadata=bearer(BOB))
    assert forged.usage.cached_prompt_tokens == 0
    assert decode.metric("kvrelay_local_prefill_fallbacks_total") == 0  # decode's token works
    assert prefill.metric("kvrelay_prefill_computed_tokens_total") > 0


def test_one_tenant_cannot_hold_more_than_its_streams(secured: tuple[Spawned, Spawned]) -> None:
    _, decode = secured
    long = pb.GenerateRequest(prompt="A long story.", sampling=pb.SamplingParams(
        max_new_tokens=400, ignore_eos=True))
    with decode.channel() as channel:
        stub = pb_grpc.GenerationStub(channel)
        call = stub.GenerateStream(long, timeout=30, metadata=bearer(ALICE))
        next(call)
        second = status_of(lambda: stub.Generate(request("again"), timeout=10, metadata=bearer(ALICE)))
        other = status_of(lambda: stub.Generate(request("mine"), timeout=10, metadata=bearer(BOB)))
        call.cancel()
    assert (second, other) == (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK)
    time.sleep(0.2)
    assert status_of(lambda: generate(decode, request("later"), metadata=bearer(ALICE))) \
        == grpc.StatusCode.OK


def test_a_client_channel_with_a_key_reaches_both_methods(secured: tuple[Spawned, Spawned]) -> None:
    _, decode = secured
    with open_channel(decode.addr) as plain:
        stub = pb_grpc.GenerationStub(with_api_key(plain, BOB))
        assert stub.Generate(request("unary"), timeout=30).usage.completion_tokens > 0
        assert list(stub.GenerateStream(request("stream"), timeout=30))[-1].usage.prompt_tokens > 0


def test_the_prefill_worker_refuses_callers_without_its_token(
        secured: tuple[Spawned, Spawned]) -> None:
    prefill, _ = secured
    call = prefill_pb2.PrefillRequest(token_ids=[1, 2, 3], model_fingerprint="0" * 32)
    with prefill.channel() as channel:
        stub = prefill_pb2_grpc.PrefillStub(channel)
        codes = [status_of(lambda m=m: stub.Prefill(call, timeout=10, metadata=m))
                 for m in (None, bearer(ALICE), bearer(DECODE))]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED,
                     grpc.StatusCode.FAILED_PRECONDITION]  # the token passes; the model differs


def test_mtls_admits_only_decode_workers_with_a_client_certificate(
        redis: RedisServer, tiny_model_dir: Path, log_dir: Path, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    prefill = spawn("prefill", tiny_model_dir, redis.url(), log_dir, tls_ca_file=str(tls.ca_cert),
                    client_cert=(str(tls.cert), str(tls.key)),
                    extra=("--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
                           "--tls-client-ca-file", str(tls.ca_cert)))
    workers = [prefill]
    try:
        decode = spawn("decode", tiny_model_dir, redis.url(), log_dir, prefill_addr=prefill.addr,
                       extra=("--prefill-tls-ca-file", str(tls.ca_cert),
                              "--prefill-tls-cert-file", str(tls.cert),
                              "--prefill-tls-key-file", str(tls.key)))
        workers.append(decode)
        generate(decode, request(PROMPT, "mtls"))
        assert decode.metric("kvrelay_local_prefill_fallbacks_total") == 0
        assert prefill.metric("kvrelay_prefill_computed_tokens_total") > 0
        with open_channel(prefill.addr, str(tls.ca_cert)) as no_certificate:
            code = status_of(lambda: prefill_pb2_grpc.PrefillStub(no_certificate).Prefill(
                prefill_pb2.PrefillRequest(token_ids=[1]), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        for worker in reversed(workers):
            worker.stop()


def test_key_files_map_keys_to_tenants_and_refuse_bad_lines() -> None:
    assert parse_key_file(f"alice {ALICE}  # a comment\n\nbob {BOB}\n") == {ALICE: "alice", BOB: "bob"}
    for bad in ("", "alice", "alice short", f"alice {ALICE}\nbob {ALICE}", f"a b {ALICE}"):
        with pytest.raises(ValueError):
            parse_key_file(bad)


def test_the_key_ring_finds_only_exact_keys() -> None:
    ring = KeyRing({ALICE: "alice", BOB: "bob"})
    assert (ring.tenant_of(ALICE), ring.tenant_of(BOB)) == ("alice", "bob")
    assert {ring.tenant_of(k) for k in ("", ALICE[:-1], ALICE + "x", ALICE.upper())} == {None}


def test_tenant_salts_cannot_collide() -> None:
    assert tenant_salt("a", "b:c") != tenant_salt("a:b", "c")
    assert tenant_salt("a", "") != tenant_salt("b", "")
