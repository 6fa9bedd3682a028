"""Which prompts decode ships to the prefill worker: an uncached part that reaches the
threshold and is at least as long as the cached part; a shorter tail is computed on decode."""

from __future__ import annotations

import random

from prefill_service.worker import PUBLISH_CHUNK_BLOCKS
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc
from tests.services.conftest import BLOCK_SIZE, Cluster, Reference, Worker

COMPUTED = "kvrelay_prefill_computed_tokens_total"


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 700) for _ in range(n)]


def _generate(worker: Worker, ids: list[int]) -> pb.GenerateResponse:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), cache_salt="routing",
                                 sampling=pb.SamplingParams(max_new_tokens=6))
    with worker.channel() as channel:
        return pb_grpc.GenerationStub(channel).Generate(request, timeout=60.0)


def test_a_short_tail_on_a_long_cached_prefix_is_computed_on_decode(
        cluster: Cluster, reference: Reference) -> None:
    rng = random.Random(5)
    decode, prefill = cluster.decodes[0], cluster.prefill
    prefix = _ids(rng, 6 * BLOCK_SIZE)
    _generate(decode, prefix + _ids(rng, 40))  # cold: 136 uncached tokens, shipped

    before = prefill.metric(COMPUTED)
    short = prefix + _ids(rng, 40)  # 40 uncached tokens after 96 cached ones
    reply = _generate(decode, short)
    assert prefill.metric(COMPUTED) == before
    assert reply.usage.cached_prompt_tokens == len(prefix)
    assert list(reply.token_ids) == reference.greedy(short, 6)

    long = prefix + _ids(rng, 7 * BLOCK_SIZE)  # 112 uncached tokens after 96 cached ones
    reply = _generate(decode, long)
    assert prefill.metric(COMPUTED) == before + 7 * BLOCK_SIZE
    assert list(reply.token_ids) == reference.greedy(long, 6)


def test_a_prompt_of_several_publish_chunks_is_stored_whole(
        cluster: Cluster, reference: Reference) -> None:
    rng = random.Random(6)
    prompt = _ids(rng, (2 * PUBLISH_CHUNK_BLOCKS + 3) * BLOCK_SIZE + 5)
    first = _generate(cluster.decodes[0], prompt)
    again = _generate(cluster.decodes[1], prompt)
    assert first.usage.cached_prompt_tokens == 0
    assert again.usage.cached_prompt_tokens == (2 * PUBLISH_CHUNK_BLOCKS + 3) * BLOCK_SIZE
    assert list(first.token_ids) == list(again.token_ids) == reference.greedy(prompt, 6)
