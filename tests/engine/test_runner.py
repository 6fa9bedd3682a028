"""ModelRunner: batched prefill over held prefixes, batched decode, KV import/export, cache off."""

from __future__ import annotations

import pytest
import torch

from engine.kv import OutOfBlocks
from engine.model import build_model
from engine.runner import MIN_SHARED_BLOCKS, ModelRunner
from engine.sequence import Sequence
from tests.engine.conftest import ModelPair, prompts

TOL: dict[str, float] = {"atol": 1e-5, "rtol": 0.0}


def _full_prefill_logits(pair: ModelPair, prompt: list[int]) -> torch.Tensor:
    return pair.runner(use_cache=False).prefill([Sequence("ref", prompt)])[0]


def test_batched_prefill_on_top_of_different_held_prefixes(llama_pair: ModelPair) -> None:
    runner = llama_pair.runner(block_size=4)
    batch = prompts(4, seed=11)
    held = [0, 3, 8, 17]  # tokens already computed per sequence
    seqs = []
    for i, (prompt, n) in enumerate(zip(batch, held)):
        seq = Sequence(str(i), prompt[:n] if n else prompt)
        if n:
            runner.prefill([seq])
            seq.token_ids += prompt[n:]
        seqs.append(seq)
    logits = runner.prefill(seqs)
    for prompt, got in zip(batch, logits):
        torch.testing.assert_close(got, _full_prefill_logits(llama_pair, prompt), **TOL)
    assert all(s.num_computed == len(s.token_ids) for s in seqs)


@pytest.mark.parametrize("batch_size", [4, 16])  # 16 rows: a measured matmul bucket
def test_batched_decode_of_different_lengths_matches_each_alone(llama_pair: ModelPair,
                                                                batch_size: int) -> None:
    batch = prompts(batch_size, seed=12)
    runner = llama_pair.runner()
    seqs = [Sequence(str(i), p) for i, p in enumerate(batch)]
    runner.prefill(seqs)
    for seq, token in zip(seqs, range(1, batch_size + 1)):
        seq.token_ids.append(token)
    logits = runner.decode(seqs)
    for seq, got in zip(seqs, logits):
        torch.testing.assert_close(got, _full_prefill_logits(llama_pair, seq.token_ids), **TOL)


def test_cache_off_recomputes_the_whole_sequence_and_holds_nothing(llama_pair: ModelPair) -> None:
    runner = llama_pair.runner(use_cache=False)
    seq = Sequence("s", prompts(1, seed=13)[0])
    runner.prefill([seq])
    seq.token_ids.append(7)
    got = runner.decode([seq])[0]
    torch.testing.assert_close(got, llama_pair.runner().prefill([Sequence("r", seq.token_ids)])[0],
                               **TOL)
    assert seq.block_table == [] and runner.kv is None


def test_imported_blocks_then_tail_prefill_match_a_cold_prefill(llama_pair: ModelPair) -> None:
    prompt = prompts(1, seed=14, lengths=(22,))[0]
    source = llama_pair.runner(block_size=4)
    cold = Sequence("cold", prompt)
    cold_logits = source.prefill([cold])[0]
    payloads = [source.export_block(cold, i).numpy().tobytes() for i in range(5)]
    target = llama_pair.runner(block_size=4)
    warm = Sequence("warm", prompt)
    target.import_blocks(warm, payloads)
    assert warm.num_computed == 20 and len(warm.block_table) == 5
    torch.testing.assert_close(target.prefill([warm])[0], cold_logits, **TOL)
    cold.token_ids.append(9)
    warm.token_ids.append(9)
    torch.testing.assert_close(target.decode([warm]), source.decode([cold]), **TOL)


def test_fully_imported_prompt_still_computes_its_last_token(llama_pair: ModelPair) -> None:
    prompt = prompts(1, seed=15, lengths=(8,))[0]
    source = llama_pair.runner(block_size=4)
    cold = Sequence("cold", prompt)
    expected = source.prefill([cold])[0]
    target = llama_pair.runner(block_size=4)
    warm = Sequence("warm", prompt)
    target.import_blocks(warm, [source.export_block(cold, i) for i in range(2)])
    torch.testing.assert_close(target.prefill([warm])[0], expected, **TOL)


def test_shared_prefix_blocks_are_held_once_and_survive_the_first_holder(
        llama_pair: ModelPair) -> None:
    runner = llama_pair.runner(num_blocks=16, block_size=4)
    prompt = prompts(1, seed=16, lengths=(13,))[0]
    first = Sequence("a", prompt)
    runner.prefill([first])
    second = Sequence("b", prompt[:12] + [5, 6])
    second.block_table = first.block_table[:3]
    runner.allocator.incref(second.block_table)
    second.num_computed = 12
    free_before = runner.allocator.num_free
    runner.free(first)
    assert runner.allocator.num_free == free_before + 1  # only the unshared block came back
    torch.testing.assert_close(runner.prefill([second])[0],
                               _full_prefill_logits(llama_pair, second.token_ids), **TOL)


def test_import_is_refused_off_a_block_boundary_or_with_a_bad_payload(llama_pair: ModelPair) -> None:
    runner = llama_pair.runner(num_blocks=8, block_size=4)
    seq = Sequence("s", prompts(1, seed=17, lengths=(10,))[0])
    good = runner.kv.export_block(0).clone()
    with pytest.raises(ValueError):
        runner.import_blocks(seq, [good, b"short"])
    assert runner.allocator.num_free == 8 and seq.num_computed == 0 and seq.block_table == []
    with pytest.raises(ValueError):
        runner.import_blocks(seq, [good] * 3)  # 12 tokens > 10
    seq.num_computed = 2
    with pytest.raises(ValueError):
        runner.import_blocks(seq, [good])


def test_export_of_a_block_not_yet_full_is_refused(llama_pair: ModelPair) -> None:
    runner = llama_pair.runner(block_size=4)
    seq = Sequence("s", prompts(1, seed=18, lengths=(6,))[0])
    runner.prefill([seq])
    assert runner.export_block(seq, 0).shape == (2, 2, 4, 2, 16)
    with pytest.raises(IndexError):
        runner.export_block(seq, 1)


def test_free_returns_every_block_and_a_full_pool_raises(llama_pair: ModelPair) -> None:
    runner = llama_pair.runner(num_blocks=3, block_size=4)
    seq = Sequence("s", prompts(1, seed=19, lengths=(9,))[0])
    runner.prefill([seq])
    assert runner.allocator.num_free == 0
    seq.token_ids += [1, 2, 3, 4]
    with pytest.raises(OutOfBlocks):
        runner.prefill([seq])
    runner.free(seq)
    assert runner.allocator.num_free == 3 and seq.num_computed == 0


def test_decode_needs_exactly_one_new_token(llama_pair: ModelPair) -> None:
    runner = llama_pair.runner()
    seq = Sequence("s", prompts(1, seed=20)[0])
    runner.prefill([seq])
    seq.token_ids += [1, 2]
    with pytest.raises(ValueError):
        runner.decode([seq])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_a_pool_of_that_dtype_and_close_logits(
        llama_pair: ModelPair, dtype: torch.dtype) -> None:
    model = build_model(llama_pair.config, dtype=dtype)
    model.load_state_dict(llama_pair.hf.state_dict())
    runner = ModelRunner((llama_pair.config, model), num_blocks=32, block_size=4)
    assert runner.kv is not None and runner.kv.tensor.dtype == dtype
    seq = Sequence("s", prompts(1, seed=21)[0])
    first = runner.prefill([seq])[0]
    seq.token_ids.append(int(first.argmax()))
    got = runner.decode([seq])[0]
    expected = _full_prefill_logits(llama_pair, seq.token_ids)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_on_prefill_sees_every_prompt_block_before_a_one_token_request_frees_them(
        llama_pair: ModelPair) -> None:
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams

    runner = llama_pair.runner(block_size=4)
    engine = LLMEngine(runner)
    prompt = list(range(3, 13))  # 2 full blocks and a partial one
    seen: list[tuple[str, int, list[torch.Tensor]]] = []
    engine.on_prefill = lambda seqs: seen.extend(
        (s.seq_id, s.num_computed, [runner.export_block(s, i).clone() for i in range(2)])
        for s in seqs)
    engine.add(Sequence("one", list(prompt), SamplingParams(max_new_tokens=1)))
    engine.step()
    assert [(seq_id, n) for seq_id, n, _ in seen] == [("one", 10)]
    assert runner.allocator.num_free == runner.allocator.num_blocks  # freed after the hook
    reference = Sequence("ref", list(prompt))
    runner.prefill([reference])
    for i, block in enumerate(seen[0][2]):
        torch.testing.assert_close(block, runner.export_block(reference, i), **TOL)


def test_prefill_and_decode_in_one_pass_match_each_in_a_pass_of_its_own(
        llama_pair: ModelPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """New prompts (one fresh, one on a held prefix) packed with a decode step whose rows
    share leading blocks: every row's logits equal a full recompute, and the pass is one."""
    runner = llama_pair.runner(num_blocks=128, block_size=4)
    prefix = prompts(1, seed=41, lengths=(4 * MIN_SHARED_BLOCKS,))[0]
    holder = Sequence("holder", prefix)
    runner.prefill([holder])
    decode = []
    for i, tail in enumerate(prompts(3, seed=42, lengths=(2, 7, 5))):
        seq = Sequence(f"d{i}", (prefix if i < 2 else []) + tail)
        if i < 2:
            runner.adopt_blocks(seq, holder.block_table)
        runner.prefill([seq])
        seq.token_ids.append(20 + i)
        decode.append(seq)
    fresh, held = prompts(2, seed=43, lengths=(9, 14))
    on_prefix = Sequence("p1", held[:6])
    runner.prefill([on_prefix])
    on_prefix.token_ids += held[6:]
    prefill = [Sequence("p0", fresh), on_prefix]

    passes: list[tuple[int, ...]] = []
    model_forward = type(runner.model).forward

    def counted(self, ids, *args):  # type: ignore[no-untyped-def]
        passes.append(tuple(ids.shape))
        return model_forward(self, ids, *args)

    monkeypatch.setattr(type(runner.model), "forward", counted)
    prefill_logits, decode_logits = runner.prefill_and_decode(prefill, decode)
    assert passes == [(1, 2 * 9 + 3)]  # 2 prompt rows padded to 9 new tokens, 3 decode rows
    monkeypatch.undo()
    for seq, got in zip([*prefill, *decode], [*prefill_logits, *decode_logits]):
        torch.testing.assert_close(got, _full_prefill_logits(llama_pair, seq.token_ids), **TOL)
        assert seq.num_computed == len(seq.token_ids)


def test_between_layers_runs_between_every_two_layers_of_every_pass(llama_pair: ModelPair) -> None:
    """The hook a worker sharing its cores hands them over in: called once between each two
    decoder layers of a prefill, a decode and a mixed pass, and the logits do not change."""
    runner = llama_pair.runner(num_blocks=64, block_size=4)
    layers = runner.config.num_layers
    calls: list[int] = []
    runner.between_layers = lambda: calls.append(1)
    a, b = prompts(2, seed=51, lengths=(11, 6))
    first = Sequence("a", a)
    runner.prefill([first])
    assert len(calls) == layers - 1
    first.token_ids.append(3)
    got = runner.decode([first])[0]
    assert len(calls) == 2 * (layers - 1)
    torch.testing.assert_close(got, _full_prefill_logits(llama_pair, first.token_ids), **TOL)
    first.token_ids.append(4)
    runner.prefill_and_decode([Sequence("b", b)], [first])
    assert len(calls) == 3 * (layers - 1)
