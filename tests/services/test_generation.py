"""Generate through real workers (separate processes) sharing a real redis-server."""

from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc
from tests.services.conftest import BLOCK_SIZE, Cluster, Reference, Worker

SYSTEM = ("You are the assistant of a bicycle shop. The shop opens at nine and closes at six. "
          "A tune-up costs forty dollars and a full overhaul one hundred and twenty dollars. ")
TIMEOUT_S = 60.0


def _request(prompt: str, max_new_tokens: int = 12, salt: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, cache_salt=salt,
                              sampling=pb.SamplingParams(max_new_tokens=max_new_tokens))


def _generate(worker: Worker, request: pb.GenerateRequest) -> pb.GenerateResponse:
    with worker.channel() as channel:
        return pb_grpc.GenerationStub(channel).Generate(request, timeout=TIMEOUT_S)


def _stream(worker: Worker, request: pb.GenerateRequest) -> list[pb.GenerateStreamResponse]:
    with worker.channel() as channel:
        return list(pb_grpc.GenerationStub(channel).GenerateStream(request, timeout=TIMEOUT_S))


def _shared_blocks(reference: Reference, a: str, b: str) -> int:
    ids_a, ids_b = reference.tokenizer.encode(a), reference.tokenizer.encode(b)
    common = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
    return common // BLOCK_SIZE


def test_a_shared_prefix_is_served_from_the_store(cluster: Cluster, reference: Reference) -> None:
    decode = cluster.decodes[0]
    first = _generate(decode, _request(SYSTEM + "When do you open?", salt="reuse"))
    second_prompt = SYSTEM + "How much is a tune-up?"
    second = _generate(decode, _request(second_prompt, salt="reuse"))

    shared = _shared_blocks(reference, SYSTEM + "When do you open?", second_prompt)
    assert shared >= 2
    assert first.usage.cached_prompt_tokens == 0
    assert second.usage.cached_prompt_tokens == shared * BLOCK_SIZE
    ids = reference.tokenizer.encode(second_prompt)
    assert second.usage.prompt_tokens == len(ids)
    assert list(second.token_ids) == reference.greedy(ids, 12)
    for reply in (first, second):  # the phases add up to the time to first token
        t = reply.timings
        assert t.prefill_ms > 0 and t.queue_ms >= 0 and t.kv_fetch_ms >= 0
        assert abs(t.queue_ms + t.prefill_ms + t.kv_fetch_ms - t.time_to_first_token_ms) < 1.0


def test_decode_workers_share_blocks_through_the_store(cluster: Cluster, reference: Reference) -> None:
    prompt = SYSTEM + "Do you rent bikes?"
    ids = reference.tokenizer.encode(prompt)
    a = _generate(cluster.decodes[0], _request(prompt, salt="two-decoders"))
    b = _generate(cluster.decodes[1], _request(prompt, salt="two-decoders"))
    assert a.usage.cached_prompt_tokens == 0
    assert b.usage.cached_prompt_tokens == len(ids) // BLOCK_SIZE * BLOCK_SIZE
    assert list(a.token_ids) == list(b.token_ids) == reference.greedy(ids, 12)


def test_salts_do_not_share_blocks(cluster: Cluster) -> None:
    prompt = SYSTEM + "Is there parking?"
    _generate(cluster.decodes[0], _request(prompt, salt="tenant-a"))
    other = _generate(cluster.decodes[0], _request(prompt, salt="tenant-b"))
    assert other.usage.cached_prompt_tokens == 0


def test_unary_and_streaming_give_the_same_tokens(cluster: Cluster) -> None:
    request = _request(SYSTEM + "Tell me about tyres.", max_new_tokens=16)
    unary = _generate(cluster.decodes[0], request)
    messages = _stream(cluster.decodes[1], request)
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in messages) == unary.text
    last = messages[-1]
    assert last.finish_reason == unary.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert last.usage.completion_tokens == len(unary.token_ids)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])


def test_eight_concurrent_streams_are_all_correct(cluster: Cluster, reference: Reference) -> None:
    prompts = [f"{SYSTEM}Question number {i}: what about wheel {i}?" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: _stream(cluster.decodes[0], _request(p, 10, "eight")),
                                prompts))
    for prompt, messages in zip(prompts, results):
        got = [t for m in messages for t in m.token_ids]
        assert got == reference.greedy(reference.tokenizer.encode(prompt), 10)


def test_chat_messages_and_token_ids_are_accepted(cluster: Cluster, reference: Reference) -> None:
    chat = pb.GenerateRequest(sampling=pb.SamplingParams(max_new_tokens=6))
    chat.messages.messages.add(role="system", content=SYSTEM)
    chat.messages.messages.add(role="user", content="Hello!")
    rendered = reference.tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello!"}])
    ids = reference.tokenizer.encode(rendered, add_special_tokens=False)
    by_chat = _generate(cluster.decodes[0], chat)
    by_ids = _generate(cluster.decodes[0], pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_new_tokens=6)))
    assert by_chat.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)
    assert list(by_chat.token_ids) == list(by_ids.token_ids) == reference.greedy(ids, 6)


def test_seeded_sampling_is_reproducible(cluster: Cluster) -> None:
    sampling = pb.SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    request = pb.GenerateRequest(prompt=SYSTEM + "Surprise me.", sampling=sampling)
    a = _generate(cluster.decodes[0], request)
    b = _generate(cluster.decodes[1], request)
    assert list(a.token_ids) == list(b.token_ids)


def test_workers_report_health_and_reflection(cluster: Cluster) -> None:
    for worker, service in ((cluster.prefill, "kvrelay.v1.Prefill"),
                            (cluster.decodes[0], "kvrelay.v1.Generation")):
        with worker.channel() as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            names = {s.name for r in replies for s in r.list_services_response.service}
            assert {service, "grpc.health.v1.Health"} <= names


BAD_REQUESTS = {
    "input": pb.GenerateRequest(),
    "prompt": pb.GenerateRequest(prompt=""),
    "token_ids": pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**9])),
    "sampling.max_new_tokens": pb.GenerateRequest(
        prompt="hi", sampling=pb.SamplingParams(max_new_tokens=-1)),
    "sampling.temperature": pb.GenerateRequest(
        prompt="hi", sampling=pb.SamplingParams(temperature=float("nan"))),
    "sampling.top_p": pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=1.5)),
    "sampling.stop_token_ids": pb.GenerateRequest(
        prompt="hi", sampling=pb.SamplingParams(stop_token_ids=[10**9])),
    "messages.role": pb.GenerateRequest(
        messages=pb.ChatMessages(messages=[pb.ChatMessage(role="", content="x")])),
}


@pytest.mark.parametrize("field", sorted(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_naming_the_field(cluster: Cluster, field: str) -> None:
    decode = cluster.decodes[1]
    queried = decode.metric("kvrelay_prefix_cache_queried_tokens_total")
    lookups = decode.metric('kvrelay_store_call_seconds_count{op="lookup"}')
    with pytest.raises(grpc.RpcError) as err:
        _generate(decode, BAD_REQUESTS[field])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:")
    assert decode.metric("kvrelay_prefix_cache_queried_tokens_total") == queried
    assert decode.metric('kvrelay_store_call_seconds_count{op="lookup"}') == lookups


def test_a_prompt_longer_than_the_context_is_invalid_argument(cluster: Cluster) -> None:
    too_long = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 2048))
    with pytest.raises(grpc.RpcError) as err:
        _generate(cluster.decodes[1], too_long)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("token_ids:")


def test_a_prompt_of_whole_blocks_is_served_entirely_from_the_store(
        cluster: Cluster, reference: Reference) -> None:
    ids = reference.tokenizer.encode(SYSTEM * 2)[:4 * BLOCK_SIZE]
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), cache_salt="whole-blocks",
                                 sampling=pb.SamplingParams(max_new_tokens=8))
    cold = _generate(cluster.decodes[0], request)
    warm = _generate(cluster.decodes[1], request)
    assert warm.usage.cached_prompt_tokens == len(ids)
    assert list(cold.token_ids) == list(warm.token_ids) == reference.greedy(ids, 8)


def test_a_block_evicted_from_the_middle_ends_the_reused_prefix(
        cluster: Cluster, reference: Reference) -> None:
    prompt = SYSTEM + "What if a block goes missing?"
    ids = reference.tokenizer.encode(prompt)
    _generate(cluster.decodes[0], _request(prompt, salt="evicted"))
    keys = reference.block_keys(ids, BLOCK_SIZE, "evicted")
    assert cluster.redis.client().delete(keys[2]) == 1
    reply = _generate(cluster.decodes[1], _request(prompt, salt="evicted"))
    assert reply.usage.cached_prompt_tokens == 2 * BLOCK_SIZE
    assert list(reply.token_ids) == reference.greedy(ids, 12)


def test_stop_strings_cut_the_text(cluster: Cluster) -> None:
    free = _generate(cluster.decodes[0], _request(SYSTEM + "Say something.", max_new_tokens=24))
    words = [w for w in free.text.split() if w.isascii() and w.isalpha() and len(w) >= 3]
    assert words, f"no plain word to stop at in {free.text!r}"
    stop = words[0]
    request = _request(SYSTEM + "Say something.", max_new_tokens=24)
    request.sampling.stop.append(stop)
    cut = _generate(cluster.decodes[0], request)
    assert cut.text == free.text[:free.text.index(stop)]
    assert cut.finish_reason == pb.FINISH_REASON_STOP


def test_logprobs_come_with_every_token(cluster: Cluster) -> None:
    request = _request(SYSTEM + "Give me numbers.", max_new_tokens=6)
    request.sampling.logprobs = True
    reply = _generate(cluster.decodes[0], request)
    assert len(reply.logprobs) == len(reply.token_ids) > 0
    assert all(p <= 0.0 for p in reply.logprobs)


def test_every_documented_metric_is_exported(cluster: Cluster) -> None:
    readme = (Path(__file__).resolve().parents[2] / "deploy" / "README.md").read_text()
    documented = set(re.findall(r"`(kvrelay_[a-z_]+)", readme))
    assert len(documented) > 10
    exported = set()
    for worker in (cluster.prefill, cluster.decodes[0]):
        text = urllib.request.urlopen(worker.metrics_url, timeout=5).read().decode()
        exported |= set(re.findall(r"^# TYPE (\w+) \w+", text, re.MULTILINE))
        exported |= set(re.findall(r"^(\w+)[{ ]", text, re.MULTILINE))
    assert documented <= exported, documented - exported


def test_a_burst_on_one_prefix_shares_the_blocks_of_the_first_request(
        cluster: Cluster, reference: Reference) -> None:
    """Requests arriving together on one system prompt: the first fetches or computes it,
    the others take its blocks in the decode worker's KV pool (single flight)."""
    decode = cluster.decodes[0]
    shared_metric = "kvrelay_kv_pool_shared_tokens_total"
    before = decode.metric(shared_metric)
    prompts = [SYSTEM * 2 + f"Question {i}: is the shop open on day {i}?" for i in range(4)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: _generate(decode, _request(p, 24, salt="burst")),
                                prompts))
    for prompt, reply in zip(prompts, replies):
        assert list(reply.token_ids) == reference.greedy(reference.tokenizer.encode(prompt), 24)
    assert decode.metric(shared_metric) > before
