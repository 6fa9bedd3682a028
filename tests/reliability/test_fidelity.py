"""RELIABILITY.md section F: greedy output is the same through every KV path, through real
workers: HuggingFace transformers (no kvrelay code), the monolithic engine, the engine with
the KV cache off, a cold disaggregated run, a warm run (whole prefix from the store) and a
partial one (middle blocks evicted). Logit-level agreement: tests/engine/test_model_fidelity.py."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from engine.engine import LLMEngine
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from protos.kvrelay.v1 import generation_pb2 as pb
from tests.reliability.conftest import BLOCK_SIZE, Reference, Spawned, generate
from tests.support.redis_server import RedisServer

NEW_TOKENS = 12
PROMPT = ("Fidelity: the KV path must never change what the model says, whether the prefix "
          "was computed here, by the prefill worker, or read back from the store. ")


def _transformers_greedy(model_dir: Path, ids: list[int]) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(ids):]


def _cache_off_greedy(reference: Reference, ids: list[int]) -> list[int]:
    runner = ModelRunner(reference.loaded, num_blocks=64, block_size=BLOCK_SIZE, use_cache=False)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return LLMEngine(runner, reference.tokenizer).generate([ids], params)[0].token_ids


def test_greedy_output_is_identical_across_every_kv_path(
        shared_redis: RedisServer, shared_pair: tuple[Spawned, Spawned], reference: Reference,
        tiny_model_dir: Path) -> None:
    _, decode = shared_pair
    ids = reference.tokenizer.encode(PROMPT * 2)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), cache_salt="fidelity",
                                 sampling=pb.SamplingParams(max_new_tokens=NEW_TOKENS,
                                                            ignore_eos=True))
    cold = generate(decode, request)
    warm = generate(decode, request)
    keys = reference.block_keys(ids, BLOCK_SIZE, "fidelity")
    assert len(keys) >= 4 and shared_redis.client().delete(keys[1], keys[2]) == 2
    partial = generate(decode, request)
    assert (cold.usage.cached_prompt_tokens, warm.usage.cached_prompt_tokens,
            partial.usage.cached_prompt_tokens) == (0, len(keys) * BLOCK_SIZE, BLOCK_SIZE)
    hf = _transformers_greedy(tiny_model_dir, ids)
    assert reference.greedy(ids, NEW_TOKENS, ignore_eos=True) == hf
    assert _cache_off_greedy(reference, ids) == hf
    assert [list(r.token_ids) for r in (cold, warm, partial)] == [hf] * 3
