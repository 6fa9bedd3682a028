"""engine.cpu_attention: a sequence's new tokens over its pool blocks, read in place."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import cpu_attention
from engine.config import ModelConfig
from engine.runner import MIN_SHARED_BLOCKS, SPLIT_PREFIX_TOKENS, ModelRunner
from engine.sequence import Sequence
from tests.engine.conftest import llama_of

needs_kernel = pytest.mark.skipif(cpu_attention.kernel() is None, reason="no C compiler here")

BS, KVH, HD, GROUP = 16, 3, 64, 3


def _reference(q: torch.Tensor, layer: torch.Tensor, table: torch.Tensor, start: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention in float64 over the gathered blocks: (1, T, H*hd), lse (1, H, T)."""
    t, heads = q.shape[1], q.shape[2]
    g = heads // KVH
    k = layer[:, 0].index_select(0, table).reshape(-1, KVH, HD)[:start + t].transpose(0, 1)
    v = layer[:, 1].index_select(0, table).reshape(-1, KVH, HD)[:start + t].transpose(0, 1)
    k, v = k.repeat_interleave(g, 0).double(), v.repeat_interleave(g, 0).double()
    scores = q[0].transpose(0, 1).double() @ k.transpose(1, 2) * HD ** -0.5  # (H, T, Tk)
    later = torch.arange(start + t)[None, :] > (start + torch.arange(t))[:, None]
    scores = scores.masked_fill(later, float("-inf"))
    out = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(1, t, heads * HD)
    return out, torch.logsumexp(scores, -1)[None]


@needs_kernel
@pytest.mark.parametrize(("start", "t"), [(0, 1), (0, 64), (5, 7), (16, 33), (100, 1),
                                          (200, 130), (1984, 64), (1000, 300)])
def test_matches_causal_attention_over_scattered_blocks(start: int, t: int) -> None:
    torch.manual_seed(start * 1000 + t)
    pool = torch.randn(160, 3, 2, BS, KVH, HD)  # (blocks, layers, K/V, bs, kvh, hd)
    layer = pool[:, 1]  # a strided layer view, as the model passes it
    table = torch.randperm(150)[:-(-(start + t) // BS)] + 5  # blocks in any order
    q = torch.randn(1, t, KVH * GROUP, HD)
    out, lse = cpu_attention.attend_with_lse(q, layer, table, start, HD ** -0.5)
    want, want_lse = _reference(q, layer, table, start)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=0)


@needs_kernel
@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_a_prefix_pass_takes_any_block_size(block_size: int) -> None:
    torch.manual_seed(block_size)
    start, t = 150, 40
    pool = torch.randn(300, 1, 2, block_size, KVH, HD)
    table = torch.randperm(290)[:-(-(start + t) // block_size)] + 5
    q = torch.randn(1, t, KVH * GROUP, HD)
    out, lse = cpu_attention.attend_with_lse(q, pool[:, 0], table, start, HD ** -0.5)
    want, want_lse = _reference(q, pool[:, 0], table, start)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=0)


def _step_reference(q: torch.Tensor, layer: torch.Tensor, tables: list[list[int]],
                    nkeys: list[int], group: int) -> torch.Tensor:
    """Each row's one query token over its keys, in float64: (B, 1, H*hd)."""
    outs = []
    for b, (table, n) in enumerate(zip(tables, nkeys)):
        blocks = torch.tensor(table)
        k = layer[:, 0].index_select(0, blocks).reshape(-1, KVH, HD)[:n].transpose(0, 1)
        v = layer[:, 1].index_select(0, blocks).reshape(-1, KVH, HD)[:n].transpose(0, 1)
        k, v = k.repeat_interleave(group, 0).double(), v.repeat_interleave(group, 0).double()
        scores = (q[b, 0].double()[:, None] @ k.transpose(1, 2))[:, 0] * HD ** -0.5  # (H, n)
        outs.append((torch.softmax(scores, -1)[:, None] @ v).reshape(1, -1))
    return torch.stack(outs)


@needs_kernel
@pytest.mark.parametrize(("group", "lengths", "shared"), [
    (3, [1], 0), (3, [17, 300, 64, 65], 0), (1, [40, 7], 0), (8, [129], 0),
    (3, [600] * 16, 32),  # 16 rows over a 512-token prefix held once
    (3, [200, 130, 97, 70, 300], 4),  # a group of three and two rows of their own
    (30, [90, 81], 5)])  # more query rows than a tile: the group's rows in two tiles
def test_decode_steps_match_attention_over_scattered_blocks(
        group: int, lengths: list[int], shared: int) -> None:
    torch.manual_seed(sum(lengths) + group)
    pool = torch.randn(400, 2, 2, BS, KVH, HD)
    layer = pool[:, 1]
    free = torch.randperm(390).add(5).tolist()
    common = [free.pop() for _ in range(shared)]
    members = [0, 1, 2] if len(lengths) == 5 else list(range(len(lengths))) if shared else []
    tables = [(common if b in members else []) for b in range(len(lengths))]
    tables = [t + [free.pop() for _ in range(-(-n // BS) - len(t) + 1)]  # one spare block
              for t, n in zip(tables, lengths)]
    q = torch.randn(len(lengths), 1, KVH * group, HD)
    groups = [(members, shared)] if shared else []
    layout = cpu_attention.StepLayout.build(tables, lengths, BS, groups)
    out = cpu_attention.attend_steps(q, layer, layout, HD ** -0.5)
    want = _step_reference(q, layer, tables, lengths, group)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=0)


@needs_kernel
@pytest.mark.parametrize("block_size", [1, 4, 32, 64])
def test_decode_steps_take_any_block_size(block_size: int) -> None:
    torch.manual_seed(block_size)
    lengths, shared = [130, 200, 70, 129, 5], 64 // block_size  # three rows share 64 keys
    pool = torch.randn(700, 1, 2, block_size, KVH, HD)
    free = torch.randperm(690).add(5).tolist()
    common = [free.pop() for _ in range(shared)]
    tables = [(common if b < 3 else []) for b in range(len(lengths))]
    tables = [t + [free.pop() for _ in range(-(-n // block_size) - len(t))]
              for t, n in zip(tables, lengths)]
    q = torch.randn(len(lengths), 1, KVH * GROUP, HD)
    layout = cpu_attention.StepLayout.build(tables, lengths, block_size, [([0, 1, 2], shared)])
    out = cpu_attention.attend_steps(q, pool[:, 0], layout, HD ** -0.5)
    want = _step_reference(q, pool[:, 0], tables, lengths, GROUP)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=0)


def test_a_step_layout_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="cannot hold 40 keys"):
        cpu_attention.StepLayout.build([[1, 2]], [40], BS)
    with pytest.raises(ValueError, match="before its rows' new tokens"):
        cpu_attention.StepLayout.build([[1, 2], [1, 2, 3]], [32, 40], BS, [([0, 1], 2)])


@needs_kernel
def test_what_it_does_not_take_is_refused() -> None:
    layer = torch.randn(8, 2, BS, KVH, HD)
    q = torch.randn(1, 4, KVH, HD)
    with pytest.raises(ValueError, match="block table"):
        cpu_attention.attend(q, layer, torch.tensor([0]), BS, 0.125)  # 20 tokens, 1 block
    with pytest.raises(RuntimeError):
        cpu_attention.attend(q.double(), layer.double(), torch.tensor([0, 1]), 0, 0.125)
    small = torch.randn(8, 2, BS, KVH, 32)
    assert not cpu_attention.supports(torch.randn(1, 4, KVH, 32), small)


def _pair() -> tuple[Any, ModelConfig, Any]:
    """A tiny HF Llama with head dim 64 (the kernel's) and kvrelay's model with its weights."""
    return llama_of(3, vocab_size=256, hidden_size=256, intermediate_size=128,
                    num_attention_heads=4, num_key_value_heads=2)


@needs_kernel
def test_a_pass_over_a_held_prefix_runs_it_and_gives_the_reference_logits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hf, config, model = _pair()
    runner = ModelRunner((config, model), num_blocks=64, block_size=BS)
    calls: list[int] = []
    real = cpu_attention.attend

    def counted(q, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(q.shape[1])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(cpu_attention, "attend", counted)
    prompt = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(4)).tolist()
    tails = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("KVRELAY_CPU_ATTENTION", switch)
        seq = Sequence("s", prompt[:70])  # a held prefix that ends inside a block
        runner.prefill([seq])
        seq.token_ids += prompt[70:]
        tails[switch] = runner.prefill([seq])[0]  # 80 new tokens over 70 held
        runner.free(seq)
        if switch == "1":
            assert calls == [80] * config.num_layers
    assert len(calls) == config.num_layers  # switched off: the PyTorch path
    with torch.inference_mode():
        want = hf(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(tails["1"], want, atol=1e-4, rtol=0)
    torch.testing.assert_close(tails["1"], tails["0"], atol=1e-4, rtol=0)
    assert 80 >= SPLIT_PREFIX_TOKENS


@needs_kernel
def test_a_batch_of_rows_over_held_context_runs_it_row_by_row(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of different lengths (a padded batch) over different held prefixes, one of
    them short of ``SPLIT_PREFIX_TOKENS``: each row through the kernel, logits as
    transformers' and as the PyTorch path's."""
    hf, config, model = _pair()
    runner = ModelRunner((config, model), num_blocks=96, block_size=BS)
    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (90, 61, 140)]
    held = (37, 48, 100)  # two ending inside a block
    calls: list[tuple[int, int]] = []
    real = cpu_attention.attend

    def counted(q, kv_layer, table, start, scale):  # type: ignore[no-untyped-def]
        calls.append((q.shape[1], start))
        return real(q, kv_layer, table, start, scale)

    monkeypatch.setattr(cpu_attention, "attend", counted)
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("KVRELAY_CPU_ATTENTION", switch)
        rows = [Sequence(f"r{i}", p[:n]) for i, (p, n) in enumerate(zip(prompts, held))]
        runner.prefill(rows)
        for seq, p in zip(rows, prompts):
            seq.token_ids = list(p)
        results[switch] = runner.prefill(rows)
        for seq in rows:
            runner.free(seq)
    assert calls[-3:] == [(53, 37), (13, 48), (40, 100)]
    assert len(calls) == 3 * config.num_layers
    torch.testing.assert_close(results["1"], results["0"], atol=1e-4, rtol=0)
    with torch.inference_mode():
        for got, p in zip(results["1"], prompts):
            torch.testing.assert_close(got, hf(torch.tensor([p])).logits[0, -1], atol=1e-4, rtol=0)


@needs_kernel
def test_decode_steps_run_it_and_give_the_reference_logits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows sharing a held prefix (a group), a row of its own and a mixed pass decode
    through the step kernel and give transformers' logits and the PyTorch path's."""
    hf, config, model = _pair()
    runner = ModelRunner((config, model), num_blocks=96, block_size=BS)
    gen = torch.Generator().manual_seed(9)
    prefix = torch.randint(0, 256, (BS * MIN_SHARED_BLOCKS + 5,), generator=gen).tolist()
    tails = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 20, 1, 40)]
    calls: list[tuple[int, int]] = []
    real = cpu_attention.attend_steps

    def counted(q, kv_layer, layout, scale):  # type: ignore[no-untyped-def]
        calls.append((q.shape[0], layout.grp_keys.numel()))
        return real(q, kv_layer, layout, scale)

    monkeypatch.setattr(cpu_attention, "attend_steps", counted)
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("KVRELAY_CPU_ATTENTION", switch)
        holder = Sequence("h", prefix)
        runner.prefill([holder])
        rows = []
        for i, tail in enumerate(tails):
            seq = Sequence(f"r{i}", (prefix if i < 3 else []) + tail)
            if i < 3:  # three rows share the holder's full blocks
                runner.adopt_blocks(seq, holder.block_table[:MIN_SHARED_BLOCKS])
            rows.append(seq)
        runner.prefill(rows)
        got = []
        for step in range(3):
            for i, seq in enumerate(rows):
                seq.token_ids.append(7 * step + i)
            got.append(runner.decode(rows))
        newcomer = Sequence("n", prefix + tails[0])  # a prompt joining a step's pass
        rows[0].token_ids.append(99)
        got.append(runner.prefill_and_decode([newcomer], rows[:1])[1])
        results[switch] = (got, [list(seq.token_ids) for seq in rows])
        for seq in (holder, newcomer, *rows):
            runner.free(seq)
    assert calls[:config.num_layers] == [(4, 1)] * config.num_layers  # one group
    assert calls[-1] == (1, 0) and len(calls) == 4 * config.num_layers
    got, tokens = results["1"]
    for step_logits, off_logits in zip(got, results["0"][0]):
        torch.testing.assert_close(step_logits, off_logits, atol=1e-4, rtol=0)
    with torch.inference_mode():
        for i, ids in enumerate(tokens):
            want = hf(torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(got[-1][0] if i == 0 else got[2][i], want, atol=1e-4, rtol=0)


@pytest.mark.usefixtures("no_c_compiler")
def test_without_a_compiler_it_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_attention, "_kernel", [])
    assert cpu_attention.kernel() is None
    assert not cpu_attention.usable(torch.float32, HD, torch.device("cpu"))
