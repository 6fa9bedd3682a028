"""The decode worker's local prefix cache: finished prompts' blocks kept in free pool memory.

A decode worker started with ``--local-prefix-cache true`` (the default outside these
tests) keeps the named prompt blocks of finished requests; a later prompt with that prefix
shares them instead of fetching them, even with the store gone, and a full pool takes them
back least recently used first. Tokens stay exactly the reference's.
"""

from __future__ import annotations

from pathlib import Path

from kvrelay.cluster import free_port
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc
from tests.services.conftest import BLOCK_SIZE, Reference, start_worker
from tests.support.redis_server import RedisServer

PROMPT = ("A bicycle shop's assistant answers questions about repairs, rentals and opening "
          "hours. Customers ask short questions; the assistant answers in one sentence. ")
KEEP = ("--local-prefix-cache", "true")


def _generate(worker, prompt: str, salt: str = "", tokens: int = 8) -> pb.GenerateResponse:  # type: ignore[no-untyped-def]
    request = pb.GenerateRequest(prompt=prompt, cache_salt=salt,
                                 sampling=pb.SamplingParams(max_new_tokens=tokens))
    with worker.channel() as channel:
        return pb_grpc.GenerationStub(channel).Generate(request, timeout=60)


def test_a_finished_prompt_is_shared_from_the_pool_without_the_store(
        tiny_model_dir: Path, tmp_path: Path, reference: Reference) -> None:
    dead_store = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: every call fails
    decode = start_worker("decode", tiny_model_dir, dead_store, tmp_path,
                          extra=(*KEEP, "--store-timeout-s", "0.3"))
    try:
        ids = reference.tokenizer.encode(PROMPT + "When do you open?")
        full = len(ids) // BLOCK_SIZE * BLOCK_SIZE
        first = _generate(decode, PROMPT + "When do you open?", "shop")
        again = _generate(decode, PROMPT + "When do you open?", "shop")
        other = _generate(decode, PROMPT + "Do you rent bikes?", "shop")
        tenant = _generate(decode, PROMPT + "When do you open?", "another-shop")
        assert first.usage.cached_prompt_tokens == 0
        assert again.usage.cached_prompt_tokens == full
        assert other.usage.cached_prompt_tokens >= 2 * BLOCK_SIZE  # the shared opening
        assert tenant.usage.cached_prompt_tokens == 0  # another salt: other names
        assert list(first.token_ids) == list(again.token_ids) == reference.greedy(ids, 8)
        other_ids = reference.tokenizer.encode(PROMPT + "Do you rent bikes?")
        assert list(other.token_ids) == reference.greedy(other_ids, 8)
        assert decode.metric("kvrelay_kv_pool_shared_tokens_total") >= full
        assert decode.metric("kvrelay_kv_pool_used_blocks") == 0  # kept blocks count as free
        assert decode.metric("kvrelay_kv_pool_kept_blocks") >= 2 * (full // BLOCK_SIZE)
    finally:
        decode.stop()


def test_a_full_pool_takes_kept_blocks_back_and_answers_stay_exact(
        store: RedisServer, tiny_model_dir: Path, tmp_path: Path, reference: Reference) -> None:
    decode = start_worker("decode", tiny_model_dir, store.url(), tmp_path,
                          extra=(*KEEP, "--num-blocks", "24", "--max-batch-size", "2"))
    try:
        prompts = [f"Question {n}: " + PROMPT for n in range(6)]  # ~12 blocks of 24 each
        for round_ in range(2):
            for prompt in prompts:
                reply = _generate(decode, prompt, f"round-{round_}")
                ids = reference.tokenizer.encode(prompt)
                assert list(reply.token_ids) == reference.greedy(ids, 8)
        # every request found room: kept blocks went back as new prompts needed them
        assert decode.metric("kvrelay_kv_pool_used_blocks") == 0
        assert 0 < decode.metric("kvrelay_kv_pool_kept_blocks") <= 24
    finally:
        decode.stop()


def test_the_local_prefix_cache_can_be_turned_off(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    dead_store = f"redis://127.0.0.1:{free_port()}/0"
    decode = start_worker("decode", tiny_model_dir, dead_store, tmp_path,
                          extra=("--local-prefix-cache", "false", "--store-timeout-s", "0.3"))
    try:
        _generate(decode, PROMPT, "off")
        assert _generate(decode, PROMPT, "off").usage.cached_prompt_tokens == 0
    finally:
        decode.stop()
