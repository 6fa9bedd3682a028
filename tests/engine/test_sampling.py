"""SamplingParams validation and the batched, per-sequence-seeded sampler."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampling import InvalidSamplingParams, SamplingParams, sample

VOCAB = 100


@pytest.mark.parametrize(("field", "kwargs"), [
    ("max_new_tokens", {"max_new_tokens": 0}),
    ("max_new_tokens", {"max_new_tokens": -5}),
    ("max_new_tokens", {"max_new_tokens": 10**9}),
    ("temperature", {"temperature": math.nan}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": math.inf}),
    ("top_k", {"top_k": -1}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_p", {"top_p": math.nan}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": 1 << 64}),
    ("stop", {"stop": ("",)}),
    ("stop", {"stop": tuple(str(i) for i in range(100))}),
    ("stop_token_ids", {"stop_token_ids": (VOCAB,)}),
    ("stop_token_ids", {"stop_token_ids": (-1,)}),
])
def test_validate_names_the_field_out_of_range(field: str, kwargs: dict) -> None:
    with pytest.raises(InvalidSamplingParams) as err:
        SamplingParams(**kwargs).validate(VOCAB)
    assert err.value.field == field


def test_validate_accepts_sensible_params() -> None:
    SamplingParams(max_new_tokens=16, temperature=0.7, top_k=40, top_p=0.9, seed=3,
                   stop=["\n\n"], stop_token_ids=[VOCAB - 1]).validate(VOCAB)


def _draw(logits: torch.Tensor, params: list[SamplingParams], steps: int) -> list[list[int]]:
    """``steps`` successive samples per row, each row with its own generator."""
    gens = [p.make_generator() for p in params]
    rows: list[list[int]] = [[] for _ in params]
    for _ in range(steps):
        for row, tok in zip(rows, sample(logits, params, gens).token_ids):
            row.append(tok)
    return rows


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_picks_the_argmax() -> None:
    logits = _logits(4)
    assert sample(logits, [SamplingParams()] * 4, [None] * 4).token_ids == logits.argmax(-1).tolist()


def test_same_seed_gives_the_same_tokens_whatever_shares_the_batch() -> None:
    logits = _logits(4)
    mine = SamplingParams(temperature=1.0, seed=42)
    alone = _draw(logits[:1], [mine], 20)[0]
    others = [SamplingParams(temperature=0.8, seed=7), SamplingParams(),
              SamplingParams(temperature=1.3, top_k=5, seed=9)]
    in_batch = _draw(logits[[1, 0, 2, 3]], [others[0], mine, others[1], others[2]], 20)[1]
    assert alone == in_batch


def test_different_seeds_give_different_tokens() -> None:
    logits = torch.zeros(1, VOCAB)
    a = _draw(logits, [SamplingParams(temperature=1.0, seed=1)], 20)[0]
    b = _draw(logits, [SamplingParams(temperature=1.0, seed=2)], 20)[0]
    assert a != b


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = _logits(1)
    top3 = set(logits[0].topk(3).indices.tolist())
    drawn = _draw(logits, [SamplingParams(temperature=5.0, top_k=3, seed=0)], 200)[0]
    assert set(drawn) <= top3 and len(set(drawn)) > 1
    nucleus = _draw(logits, [SamplingParams(temperature=1.0, top_p=1e-6, seed=0)], 20)[0]
    assert set(nucleus) == {int(logits.argmax())}


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    drawn = _draw(probs.log(), [SamplingParams(temperature=1.0, top_p=0.7, seed=0)], 300)[0]
    assert set(drawn) == {0, 1}


def test_sampled_frequencies_follow_the_softmax() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])
    drawn = _draw(logits, [SamplingParams(temperature=1.0, seed=5)], 4000)[0]
    assert abs(sum(drawn) / len(drawn) - 0.75) < 0.03


def test_logprobs_are_those_of_the_chosen_tokens_under_the_model() -> None:
    logits = _logits(3)
    params = [SamplingParams(logprobs=True), SamplingParams(temperature=2.0, seed=1, logprobs=True),
              SamplingParams()]
    result = sample(logits, params, [p.make_generator() for p in params])
    expected = torch.log_softmax(logits, -1)[torch.arange(3), torch.tensor(result.token_ids)]
    assert result.logprobs is not None
    torch.testing.assert_close(torch.tensor(result.logprobs), expected)
