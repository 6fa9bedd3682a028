"""A decode step whose rows share leading pool blocks attends to them once per group of
rows (``attention.shared_attention``) and gives the same logits as attending row by row."""

from __future__ import annotations

import pytest
import torch

from engine import attention
from engine.runner import MIN_SHARED_BLOCKS
from engine.sequence import Sequence
from tests.engine.conftest import ModelPair, prompts

TOL: dict[str, float] = {"atol": 1e-5, "rtol": 0.0}


def test_rows_sharing_prefix_blocks_decode_as_if_alone(llama_pair: ModelPair,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    runner = llama_pair.runner(num_blocks=128, block_size=4)
    prefix_a, prefix_b = prompts(2, seed=31, lengths=(4 * MIN_SHARED_BLOCKS + 4,
                                                      4 * MIN_SHARED_BLOCKS))
    tails = prompts(6, seed=32, lengths=(3, 6, 1, 9))
    holders = [Sequence("a", prefix_a), Sequence("b", prefix_b)]
    runner.prefill(holders)
    rows = []
    for i, tail in enumerate(tails):
        if i < 3:  # group a: the whole 5-block prefix held once
            holder, shared = holders[0], len(prefix_a) // 4
        elif i < 5:  # group b
            holder, shared = holders[1], len(prefix_b) // 4
        else:  # shares nothing
            holder, shared = None, 0
        seq = Sequence(f"r{i}", (holder.token_ids if holder else []) + tail)
        if holder is not None:
            runner.adopt_blocks(seq, holder.block_table[:shared])
        rows.append(seq)
    runner.prefill(rows)
    for i, seq in enumerate(rows):
        seq.token_ids.append(10 + i)

    calls: list[int] = []
    real = attention.shared_attention

    def counted(q, kv_layer, meta):  # type: ignore[no-untyped-def]
        calls.append(len(meta.shared))
        return real(q, kv_layer, meta)

    monkeypatch.setattr(attention, "shared_attention", counted)
    logits = runner.decode(rows)
    assert calls and set(calls) == {2}  # two groups, in every layer
    reference = llama_pair.runner(use_cache=False)
    for seq, got in zip(rows, logits):
        expected = reference.prefill([Sequence("ref", list(seq.token_ids))])[0]
        torch.testing.assert_close(got, expected, **TOL)
    assert runner.allocator.ref_count(holders[0].block_table[0]) == 4  # held once, shared


def test_too_short_a_common_prefix_takes_the_plain_path(llama_pair: ModelPair,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    runner = llama_pair.runner(num_blocks=64, block_size=4)
    holder = Sequence("h", prompts(1, seed=33, lengths=(4 * (MIN_SHARED_BLOCKS - 1),))[0])
    runner.prefill([holder])
    rows = []
    for i, tail in enumerate(prompts(2, seed=34, lengths=(2, 5))):
        seq = Sequence(f"r{i}", holder.token_ids + tail)
        runner.adopt_blocks(seq, holder.block_table)
        rows.append(seq)
    runner.prefill(rows)
    for seq in rows:
        seq.token_ids.append(3)
    monkeypatch.setattr(attention, "shared_attention", None)  # would fail if called
    logits = runner.decode(rows)
    reference = llama_pair.runner(use_cache=False)
    for seq, got in zip(rows, logits):
        expected = reference.prefill([Sequence("ref", list(seq.token_ids))])[0]
        torch.testing.assert_close(got, expected, **TOL)
