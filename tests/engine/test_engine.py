"""LLMEngine on the built-in tiny model: streaming text, stop conditions, continuous
batching, abort, preemption, imported KV and input checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.engine import LLMEngine, StepOutput
from engine.loader import LoadedModel, load_model
from engine.runner import ModelRunner
from engine.sampling import InvalidRequest, SamplingParams
from engine.sequence import Sequence

PROMPTS = ["Once upon a time", "The quick brown fox", "kvrelay serves"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir))


def make_engine(loaded: LoadedModel, *, num_blocks: int = 64, block_size: int = 4,
                **kwargs: object) -> LLMEngine:
    runner = ModelRunner(loaded, num_blocks=num_blocks, block_size=block_size)
    return LLMEngine(runner, loaded.tokenizer, **kwargs)  # type: ignore[arg-type]


def run(engine: LLMEngine, seqs: list[Sequence]) -> dict[str, list[StepOutput]]:
    outs: dict[str, list[StepOutput]] = {s.seq_id: [] for s in seqs}
    for seq in seqs:
        engine.add(seq)
    for _ in range(1000):
        if not engine.has_unfinished:
            return outs
        for out in engine.step():
            outs.setdefault(out.seq_id, []).append(out)
    raise AssertionError("engine did not finish")


def greedy(n: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(loaded: LoadedModel) -> list[list[int]]:
    """Greedy 20-token continuations of PROMPTS, each run alone."""
    engine = make_engine(loaded)
    return [engine.generate([p], greedy(20))[0].token_ids for p in PROMPTS]


def test_streamed_text_deltas_concatenate_to_the_decoded_output(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    seq = Sequence("s", loaded.tokenizer.encode(PROMPTS[0]), greedy(24))
    outs = run(engine, [seq])["s"]
    assert [o.token_id for o in outs] == seq.output_ids and len(outs) == 24
    assert "".join(o.text for o in outs) == loaded.tokenizer.decode(seq.output_ids)
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert not any(o.finished for o in outs[:-1])


def test_stop_string_cuts_the_text_before_it(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    full = engine.generate([PROMPTS[1]], greedy(24))[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    result = engine.generate([PROMPTS[1]], greedy(24, stop=(stop,)))[0]
    assert result.finish_reason == "stop"
    assert result.text == full[:full.index(stop)]


def test_stop_token_and_eos_end_generation_unless_eos_is_ignored(
        loaded: LoadedModel, reference: list[list[int]]) -> None:
    engine = make_engine(loaded)
    target = reference[0][5]
    cut = reference[0].index(target) + 1
    by_stop_id = engine.generate([PROMPTS[0]], greedy(20, stop_token_ids=(target,)))[0]
    assert by_stop_id.token_ids == reference[0][:cut] and by_stop_id.finish_reason == "stop"
    engine.eos_token_ids = frozenset({target})
    by_eos = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=20))[0]
    assert by_eos.token_ids == reference[0][:cut] and by_eos.finish_reason == "stop"
    ignored = engine.generate([PROMPTS[0]], greedy(20))[0]
    assert ignored.token_ids == reference[0] and ignored.finish_reason == "length"


def test_batched_generation_matches_each_prompt_alone(loaded: LoadedModel,
                                                      reference: list[list[int]]) -> None:
    results = make_engine(loaded).generate(PROMPTS, greedy(20))
    assert [r.token_ids for r in results] == reference


def test_a_sequence_joining_mid_run_does_not_change_the_others(
        loaded: LoadedModel, reference: list[list[int]]) -> None:
    engine = make_engine(loaded)
    tok = loaded.tokenizer
    first = Sequence("a", tok.encode(PROMPTS[0]), greedy(20))
    engine.add(first)
    for _ in range(5):
        engine.step()
    late = Sequence("b", tok.encode(PROMPTS[2]), greedy(20))
    run(engine, [late])
    assert first.output_ids == reference[0] and late.output_ids == reference[2]


def test_preemption_under_a_small_pool_gives_the_same_tokens(
        loaded: LoadedModel, reference: list[list[int]]) -> None:
    engine = make_engine(loaded, num_blocks=12, block_size=4)
    seqs = [Sequence(str(i), loaded.tokenizer.encode(p), greedy(20)) for i, p in enumerate(PROMPTS)]
    run(engine, seqs)
    assert [s.output_ids for s in seqs] == reference
    assert engine.runner.allocator.num_free == 12


def test_abort_frees_kv_at_once(loaded: LoadedModel) -> None:
    engine = make_engine(loaded, num_blocks=32)
    running = Sequence("r", loaded.tokenizer.encode(PROMPTS[0]), greedy(50))
    waiting = Sequence("w", loaded.tokenizer.encode(PROMPTS[1]), greedy(50))
    engine.add(running)
    engine.step()
    engine.add(waiting)
    assert engine.runner.allocator.num_free < 32
    assert engine.abort("r") and engine.abort("w") and not engine.abort("missing")
    assert engine.runner.allocator.num_free == 32 and not engine.has_unfinished
    assert running.finish_reason == "abort"


def test_sequence_arriving_with_imported_kv_continues_identically(
        loaded: LoadedModel, reference: list[list[int]]) -> None:
    prompt = loaded.tokenizer.encode(PROMPTS[1])
    producer = ModelRunner(loaded, num_blocks=16, block_size=2)
    cold = Sequence("cold", prompt)
    producer.prefill([cold])
    engine = make_engine(loaded, block_size=2)
    warm = Sequence("warm", prompt, greedy(20))
    full = len(prompt) // 2
    engine.runner.import_blocks(warm, [producer.export_block(cold, i).numpy() for i in range(full)])
    run(engine, [warm])
    assert warm.output_ids == reference[1]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(loaded: LoadedModel) -> None:
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=1234,
                            ignore_eos=True)
    alone = make_engine(loaded).generate([PROMPTS[0]], params)[0].token_ids
    others = SamplingParams(max_new_tokens=16, temperature=1.2, seed=99, ignore_eos=True)
    engine = make_engine(loaded)
    tok = loaded.tokenizer
    seqs = [Sequence("x", tok.encode(PROMPTS[1]), others), Sequence("me", tok.encode(PROMPTS[0]), params),
            Sequence("y", tok.encode(PROMPTS[2]), greedy(16))]
    run(engine, seqs)
    assert seqs[1].output_ids == alone


@pytest.mark.parametrize(("field", "token_ids", "params"), [
    ("prompt", [], SamplingParams()),
    ("prompt", [10**6], SamplingParams()),
    ("prompt", [1] * 10_000, SamplingParams()),
    ("max_new_tokens", [1, 2, 3], SamplingParams(max_new_tokens=10**5)),
    ("temperature", [1, 2, 3], SamplingParams(temperature=float("nan"))),
])
def test_invalid_requests_are_refused_naming_the_field(loaded: LoadedModel, field: str,
                                                       token_ids: list[int],
                                                       params: SamplingParams) -> None:
    engine = make_engine(loaded, num_blocks=8)
    with pytest.raises(InvalidRequest) as err:
        engine.add(Sequence("bad", token_ids, params))
    assert err.value.field == field
    assert not engine.has_unfinished


LONG_PROMPT = " ".join(PROMPTS * 6)


def _prompt_tokens_per_pass(engine: LLMEngine) -> list[tuple[int, int]]:
    """Record (prompt tokens computed, decode rows) of every pass the engine runs."""
    passes: list[tuple[int, int]] = []
    inner = engine.runner.prefill_and_decode

    def counted(prefill, decode):  # type: ignore[no-untyped-def]
        passes.append((sum(len(s.token_ids) - s.num_computed for s in prefill), len(decode)))
        return inner(prefill, decode)

    engine.runner.prefill_and_decode = counted  # type: ignore[method-assign]
    return passes


@pytest.mark.parametrize("chunk", [8, 12])
def test_a_long_prompt_joins_running_streams_a_chunk_per_step_with_the_same_tokens(
        loaded: LoadedModel, chunk: int) -> None:
    tok = loaded.tokenizer
    long_ids = tok.encode(LONG_PROMPT)
    assert len(long_ids) > 3 * chunk
    alone = make_engine(loaded)
    expected_long = alone.generate([long_ids], greedy(12))[0].token_ids
    expected_first = alone.generate([PROMPTS[0]], greedy(30))[0].token_ids

    engine = make_engine(loaded, block_size=4, prefill_chunk_tokens=chunk)
    passes = _prompt_tokens_per_pass(engine)
    published: list[tuple[str, int]] = []
    engine.on_prefill = lambda seqs: published.extend((s.seq_id, s.num_computed) for s in seqs)
    first = Sequence("a", tok.encode(PROMPTS[0]), greedy(30))
    engine.add(first)
    engine.step()  # alone: its prompt goes in whole
    late = Sequence("b", long_ids, greedy(12))
    outs = run(engine, [late])  # runs both to the end
    assert late.output_ids == expected_long and first.output_ids == expected_first
    # while "a" streamed, no step computed more than a chunk of prompt tokens, whole blocks
    # at a time, and "b" produced no token before its last chunk
    joined = [p for p in passes[1:] if p[1] > 0 and p[0] > 0]
    assert len(joined) >= 3 and all(n <= chunk for n, _ in joined), passes
    chunks = [n for sid, n in published if sid == "b"]
    assert chunks == sorted(chunks) and all(n % 4 == 0 for n in chunks[:-1])
    assert chunks[-1] == len(long_ids) and len(chunks) == len(joined)
    assert len(outs["b"]) == 12
    assert engine.runner.allocator.num_free == 64


def test_with_nothing_running_a_long_prompt_goes_in_whole(loaded: LoadedModel) -> None:
    engine = make_engine(loaded, prefill_chunk_tokens=8)
    passes = _prompt_tokens_per_pass(engine)
    long_ids = loaded.tokenizer.encode(LONG_PROMPT)
    engine.generate([long_ids], greedy(2))
    assert passes[0] == (len(long_ids), 0)


def test_aborting_a_prompt_between_its_chunks_frees_its_blocks(loaded: LoadedModel) -> None:
    engine = make_engine(loaded, num_blocks=64, prefill_chunk_tokens=8)
    first = Sequence("a", loaded.tokenizer.encode(PROMPTS[0]), greedy(40))
    engine.add(first)
    engine.step()
    late = Sequence("b", loaded.tokenizer.encode(LONG_PROMPT), greedy(4))
    engine.add(late)
    engine.step()
    assert 0 < late.num_computed < len(late.token_ids) and late.block_table  # mid-prompt
    assert engine.abort("b")
    assert engine.abort("a")
    assert engine.runner.allocator.num_free == 64 and not engine.has_unfinished


def test_a_negative_chunk_is_refused(loaded: LoadedModel) -> None:
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        make_engine(loaded, prefill_chunk_tokens=-1)


def test_a_small_pool_with_chunked_prompts_waiting_still_finishes_every_sequence(
        loaded: LoadedModel) -> None:
    """Streams that outgrow a small pool while chunked prompts hold blocks: streams are
    preempted, chunks' blocks are reclaimed when nothing else can run, and every sequence
    still ends with the tokens it gets alone."""
    tok = loaded.tokenizer
    prompts = [tok.encode(PROMPTS[0]), tok.encode(LONG_PROMPT)[:70], tok.encode(LONG_PROMPT)[5:60]]
    alone = make_engine(loaded, num_blocks=64)
    expected = [alone.generate([p], greedy(30))[0].token_ids for p in prompts]
    engine = make_engine(loaded, num_blocks=30, block_size=4, prefill_chunk_tokens=8)
    seqs = [Sequence(str(i), p, greedy(30)) for i, p in enumerate(prompts)]
    engine.add(seqs[0])
    engine.step()
    run(engine, seqs[1:])
    assert [s.output_ids for s in seqs] == expected
    assert engine.runner.allocator.num_free == 30


def test_reclaim_frees_a_waiting_sequence_behind_the_first(loaded: LoadedModel) -> None:
    """With nothing running, the first waiting prompt needs more room than is free while a
    prompt behind it holds imported blocks: those go (it is recomputed later), the first
    is admitted, and both end with the tokens they get alone."""
    tok = loaded.tokenizer
    first_ids, second_ids = tok.encode(LONG_PROMPT)[:64], tok.encode(PROMPTS[1])
    alone = make_engine(loaded, num_blocks=64)
    expected = [alone.generate([p], greedy(4))[0].token_ids for p in (first_ids, second_ids)]
    producer = ModelRunner(loaded, num_blocks=16, block_size=4)
    donor = Sequence("donor", second_ids)
    producer.prefill([donor])
    engine = make_engine(loaded, num_blocks=18, block_size=4)
    first, second = Sequence("a", first_ids, greedy(4)), Sequence("b", second_ids, greedy(4))
    engine.add(first)
    held = len(second_ids) // 4
    engine.runner.import_blocks(second, [producer.export_block(donor, i).numpy()
                                         for i in range(held)])
    engine.add(second)
    assert engine.runner.allocator.num_free < 17  # the first (64 tokens) does not fit
    run(engine, [])
    assert [first.output_ids, second.output_ids] == expected
    assert engine.runner.allocator.num_free == 18
