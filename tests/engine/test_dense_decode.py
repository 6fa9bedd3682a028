"""Decode over per-row contiguous K/V kept across steps equals decode gathered from the pool.

The dense buffer is reused while the batch stays the same, appended to every step, and
rebuilt when a row leaves or joins, after a prefill, and when it runs out of room.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.model import build_model
from engine.runner import DENSE_HEADROOM_TOKENS, ModelRunner
from engine.sequence import Sequence


def _runner(dense_bytes: int) -> ModelRunner:
    config = ModelConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 97, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5})
    model = build_model(config)
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return ModelRunner((config, model), num_blocks=256, block_size=4, dense_decode_bytes=dense_bytes)


def test_dense_decode_matches_pool_gather_through_batch_changes() -> None:
    dense, gathered = _runner(1 << 30), _runner(0)
    prompts = [[(7 * i + j) % 97 for j in range(5 + 3 * i)] for i in range(4)]
    rows = {r: [Sequence(f"s{i}", list(p)) for i, p in enumerate(prompts)] for r in (dense, gathered)}
    for runner, seqs in rows.items():
        runner.prefill(seqs)
    steps = DENSE_HEADROOM_TOKENS + 20  # long enough to outgrow the first buffer
    for step in range(steps):
        if step == 10:  # a row leaves
            for runner, seqs in rows.items():
                runner.free(seqs.pop(1))
        if step == 20:  # a row joins after its own prefill
            for runner, seqs in rows.items():
                joined = Sequence("late", [3, 1, 4, 1, 5, 9, 2, 6])
                runner.prefill([joined])
                seqs.append(joined)
        logits = {}
        for runner, seqs in rows.items():
            for s in seqs:
                s.token_ids.append((step * 13 + len(s.token_ids)) % 97)
            logits[runner] = runner.decode(seqs)
        torch.testing.assert_close(logits[dense], logits[gathered], rtol=0, atol=1e-5)
    assert dense._dense is not None and gathered._dense is None


def test_dense_decode_is_skipped_past_its_byte_budget() -> None:
    runner = _runner(1)  # one byte: never enough
    seqs = [Sequence("a", [1, 2, 3, 4, 5])]
    runner.prefill(seqs)
    seqs[0].token_ids.append(6)
    runner.decode(seqs)
    assert runner._dense is None
