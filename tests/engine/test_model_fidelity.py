"""kvrelay's model against HuggingFace transformers on the same weights.

Four configurations (Llama GQA with llama3 rope scaling and tied embeddings, Mistral,
Qwen2 with qkv bias and untied embeddings, MQA with linear rope scaling); every KV path
(one prefill, split prefill, batched with other prompts, cache off) must give the tokens
transformers gives.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import SUPPORTED_ARCHITECTURES, ModelConfigError
from engine.engine import LLMEngine
from engine.model import MODEL_REGISTRY, build_model
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from engine.sequence import Sequence
from tests.engine.conftest import ModelPair, prompts

NEW_TOKENS = 32
ATOL = 1e-4


def hf_greedy(pair: ModelPair, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation and its per-step logits (NEW_TOKENS, V)."""
    out = pair.hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits)[:, 0]


def greedy(runner: ModelRunner, prompt: list[int],
           split: int | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation with kvrelay's runner; ``split`` prefills the prompt in two calls."""
    seq = Sequence("s", prompt[:split] if split else prompt)
    logits = runner.prefill([seq])
    if split:
        seq.token_ids += prompt[split:]
        logits = runner.prefill([seq])
    steps = [logits[0]]
    for _ in range(NEW_TOKENS - 1):
        seq.token_ids.append(int(steps[-1].argmax()))
        steps.append(runner.decode([seq])[0])
    seq.token_ids.append(int(steps[-1].argmax()))
    runner.free(seq)
    return seq.token_ids[len(prompt):], torch.stack(steps)


@pytest.fixture(scope="module")
def references(pair: ModelPair) -> list[tuple[list[int], list[int], torch.Tensor]]:
    return [(p, *hf_greedy(pair, p)) for p in prompts(3)]


def test_last_token_logits_match_transformers(pair: ModelPair) -> None:
    runner = pair.runner()
    for prompt in prompts(4, seed=7):
        with torch.no_grad():
            expected = pair.hf(torch.tensor([prompt])).logits[0, -1]
        got = runner.prefill([Sequence("s", prompt)])[0]
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_greedy_continuation_and_step_logits_match_generate(pair: ModelPair, references) -> None:
    runner = pair.runner()
    for prompt, expected_tokens, expected_logits in references:
        tokens, logits = greedy(runner, prompt)
        assert tokens == expected_tokens
        torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_split_prefill_gives_the_same_tokens(pair: ModelPair, references, block_size: int) -> None:
    runner = pair.runner(block_size=block_size)
    for prompt, expected, _ in references:
        assert greedy(runner, prompt, split=len(prompt) // 2)[0] == expected


def test_cache_off_gives_the_same_tokens(pair: ModelPair, references) -> None:
    runner = pair.runner(use_cache=False)
    for prompt, expected, _ in references:
        assert greedy(runner, prompt)[0] == expected


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_with_other_prompts_gives_the_same_tokens(pair: ModelPair, references,
                                                          use_cache: bool) -> None:
    engine = LLMEngine(pair.runner(use_cache=use_cache))
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    batch = [p for p, _, _ in references] + prompts(2, seed=3)
    results = engine.generate(batch, params)
    for (_, expected, _), result in zip(references, results):
        assert result.token_ids == expected
        assert result.finish_reason == "length"
    assert engine.runner.allocator.num_free == engine.runner.allocator.num_blocks


def test_logits_of_several_rows_match_each_row_alone(pair: ModelPair) -> None:
    model = pair.runner().model
    hidden = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        batched = model.logits(hidden)
        alone = torch.cat([model.logits(row[None]) for row in hidden])
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)


def test_every_supported_architecture_has_a_model_class() -> None:
    assert set(SUPPORTED_ARCHITECTURES) <= set(MODEL_REGISTRY)


@pytest.mark.parametrize("scaling", [{"rope_type": "dynamic", "factor": 2.0},
                                     {"rope_type": "yarn", "factor": 4.0}])
def test_rope_types_not_implemented_are_refused_at_build(llama_pair: ModelPair,
                                                         scaling: dict[str, object]) -> None:
    config = dataclasses.replace(llama_pair.config, rope_scaling=scaling)
    with pytest.raises(ModelConfigError, match="rope_scaling"):
        build_model(config)


def test_fused_model_still_exposes_the_hf_state_dict(pair: ModelPair) -> None:
    pair.runner()  # fuses the model in place
    ours, theirs = pair.model.state_dict(), pair.hf.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
