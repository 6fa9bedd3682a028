"""One sequence's new tokens over a held prefix attend to the two apart
(``attention.prefix_split_attention``) and give what one masked product over the whole
context gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import attention
from engine.runner import SPLIT_PREFIX_TOKENS
from engine.sequence import Sequence
from tests.engine.conftest import ModelPair, prompts

TOL: dict[str, float] = {"atol": 1e-5, "rtol": 0.0}


@pytest.mark.parametrize("held", [37, 48])  # ending inside a block and on its boundary
def test_split_attention_equals_the_masked_product(held: int) -> None:
    torch.manual_seed(held)
    t, heads, kvh, hd, bs = SPLIT_PREFIX_TOKENS + 3, 6, 2, 8, 16
    pool = torch.randn(12, 2, bs, kvh, hd)  # one layer: (NB, 2, bs, kvh, hd)
    blocks = [7, 2, 9, 4][:-(-held // bs)]
    q = torch.randn(1, t, heads, hd)
    kv = torch.randn(1, t, 2, kvh, hd)
    got = attention.prefix_split_attention(q, kv, pool, (torch.tensor(blocks), held), 0.3)

    old = pool[blocks].transpose(0, 1).reshape(2, -1, kvh, hd)[:, :held]  # (2, held, kvh, hd)
    keys = torch.cat([old[0], kv[0, :, 0]]).transpose(0, 1).repeat_interleave(heads // kvh, 0)
    values = torch.cat([old[1], kv[0, :, 1]]).transpose(0, 1).repeat_interleave(heads // kvh, 0)
    allowed = torch.arange(held + t)[None, :] <= held + torch.arange(t)[:, None]  # (T, Tk)
    mask = torch.zeros(t, held + t).masked_fill_(~allowed, float("-inf"))
    expected = F.scaled_dot_product_attention(q[0].transpose(0, 1), keys, values,
                                              attn_mask=mask, scale=0.3)  # (H, T, hd)
    torch.testing.assert_close(got, expected.transpose(0, 1).reshape(1, t, heads * hd), **TOL)


def test_a_long_second_prefill_call_splits_and_matches_one_call(
        llama_pair: ModelPair, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = llama_pair.runner(num_blocks=64, block_size=4)
    ids = prompts(1, seed=41, lengths=(22 + SPLIT_PREFIX_TOKENS,))[0]
    calls: list[int] = []
    real = attention.prefix_split_attention

    def counted(q, kv, kv_layer, prefix, scale):  # type: ignore[no-untyped-def]
        calls.append(prefix[1])
        return real(q, kv, kv_layer, prefix, scale)

    monkeypatch.setattr(attention, "prefix_split_attention", counted)
    seq = Sequence("s", ids[:22])
    runner.prefill([seq])
    seq.token_ids += ids[22:]
    got = runner.prefill([seq])[0]
    assert calls and set(calls) == {22}  # every layer, over the 22 held tokens
    short = Sequence("short", ids[:20])
    runner.prefill([short])
    short.token_ids += ids[20:20 + SPLIT_PREFIX_TOKENS - 1]
    calls.clear()
    runner.prefill([short])
    assert not calls  # fewer new tokens: the masked product over the whole context
    reference = llama_pair.runner(use_cache=False)
    expected = reference.prefill([Sequence("ref", list(ids))])[0]
    torch.testing.assert_close(got, expected, **TOL)
