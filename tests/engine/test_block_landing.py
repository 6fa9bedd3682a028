"""Fetched blocks landing straight in the KV pool (``kvblocks.BlockLanding``), adopted by
a sequence (``ModelRunner.adopt_blocks``), and the thread-safe allocator under them."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.kv import BlockAllocator
from engine.runner import ModelRunner
from engine.sequence import Sequence
from kvrelay.serving.kvblocks import BlockLanding
from tests.engine.conftest import ModelPair, prompts

TOL: dict[str, float] = {"atol": 1e-5, "rtol": 0.0}
PROMPT = prompts(1, seed=21, lengths=(22,))[0]  # 5 full blocks of 4 and 2 tokens


def _source(pair: ModelPair) -> tuple[torch.Tensor, list[memoryview]]:
    """A cold prefill's last logits and its 5 full blocks as wire payloads."""
    runner = pair.runner(block_size=4)
    cold = Sequence("cold", PROMPT)
    logits = runner.prefill([cold])[0]
    return logits, [memoryview(runner.export_block(cold, i).numpy().tobytes()) for i in range(5)]


def _land(landing: BlockLanding, payloads: list[memoryview], reserve: int) -> None:
    landing.reserve(reserve)
    for i, payload in enumerate(payloads):
        landing.put(i, payload)
    landing.settle()


def test_landed_blocks_adopted_then_tail_prefill_match_a_cold_prefill(
        llama_pair: ModelPair) -> None:
    expected, payloads = _source(llama_pair)
    target = llama_pair.runner(num_blocks=16, block_size=4)
    landing = BlockLanding(target)
    _land(landing, payloads, reserve=5)
    assert len(landing.blocks) == 5 and landing.payloads == []
    warm = Sequence("warm", PROMPT)
    target.adopt_blocks(warm, landing.blocks)
    landing.release()  # the sequence holds its own references
    assert warm.num_computed == 20 and target.allocator.num_free == 11
    assert all(target.allocator.ref_count(b) == 1 for b in warm.block_table)
    torch.testing.assert_close(target.prefill([warm])[0], expected, **TOL)
    target.free(warm)
    assert target.allocator.num_free == 16


def test_blocks_beyond_the_room_in_the_pool_are_kept_as_bytes_in_order(
        llama_pair: ModelPair) -> None:
    expected, payloads = _source(llama_pair)
    target = llama_pair.runner(num_blocks=12, block_size=4)
    landing = BlockLanding(target, headroom=9)  # 12 free, 9 kept: room for 3 of 5
    _land(landing, payloads, reserve=5)
    assert len(landing.blocks) == 3
    assert landing.payloads == [bytes(p) for p in payloads[3:]]
    landing.reserve(5)  # room again, but the prefix already continues as bytes
    assert target.allocator.num_free == 9
    warm = Sequence("warm", PROMPT)
    target.adopt_blocks(warm, landing.blocks)
    target.import_blocks(warm, landing.payloads)
    landing.release()
    torch.testing.assert_close(target.prefill([warm])[0], expected, **TOL)


def test_no_room_at_all_keeps_every_block_as_bytes(llama_pair: ModelPair) -> None:
    _, payloads = _source(llama_pair)
    target = llama_pair.runner(num_blocks=8, block_size=4)
    landing = BlockLanding(target, headroom=8)
    _land(landing, payloads, reserve=5)
    assert landing.blocks == [] and len(landing.payloads) == 5
    assert target.allocator.num_free == 8
    assert len(BlockLanding(None).payloads) == 0  # no runner: bytes only


def test_unused_reservations_and_released_blocks_go_back_to_the_pool(
        llama_pair: ModelPair) -> None:
    _, payloads = _source(llama_pair)
    target = llama_pair.runner(num_blocks=16, block_size=4)
    landing = BlockLanding(target)
    _land(landing, payloads[:2], reserve=5)  # the fetch stopped after 2 blocks
    assert len(landing.blocks) == 2 and target.allocator.num_free == 14
    landing.release()
    landing.release()
    assert target.allocator.num_free == 16 and landing.blocks == []


def test_out_of_order_or_wrong_size_payloads_are_refused(llama_pair: ModelPair) -> None:
    _, payloads = _source(llama_pair)
    target = llama_pair.runner(num_blocks=16, block_size=4)
    landing = BlockLanding(target)
    landing.reserve(2)
    with pytest.raises(ValueError, match="block 1 arrived, block 0 was next"):
        landing.put(1, payloads[1])
    with pytest.raises(ValueError, match="bytes, a pool block"):
        landing.put(0, payloads[0][:100])
    landing.settle()
    assert landing.blocks == [] and target.allocator.num_free == 16


def test_adopt_checks_the_block_boundary_and_the_prompt_length(llama_pair: ModelPair) -> None:
    runner: ModelRunner = llama_pair.runner(num_blocks=16, block_size=4)
    blocks = runner.allocator.allocate(6)
    with pytest.raises(ValueError, match="more tokens than the sequence has"):
        runner.adopt_blocks(Sequence("s", PROMPT), blocks)  # 24 tokens > 22
    seq = Sequence("s", PROMPT)
    seq.num_computed = 2
    with pytest.raises(ValueError, match="block boundary"):
        runner.adopt_blocks(seq, blocks[:1])
    assert all(runner.allocator.ref_count(b) == 1 for b in blocks)  # nothing was taken


def test_the_allocator_stays_consistent_under_two_threads() -> None:
    allocator = BlockAllocator(64)
    errors: list[BaseException] = []

    def churn(keep_free: int) -> None:
        try:
            for _ in range(2000):
                blocks = allocator.allocate_up_to(3, keep_free)
                if blocks:
                    allocator.incref(blocks)
                    allocator.free(blocks)
                    allocator.free(blocks)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(k,)) for k in (0, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert allocator.num_free == 64
    assert sorted(allocator.allocate(64)) == list(range(64))  # each id exactly once


def test_allocate_up_to_keeps_the_headroom() -> None:
    allocator = BlockAllocator(10)
    first = allocator.allocate_up_to(4, keep_free=7)
    assert len(first) == 3 and allocator.num_free == 7
    assert allocator.allocate_up_to(4, keep_free=7) == []
    assert len(allocator.allocate_up_to(20)) == 7 and allocator.num_free == 0
    assert all(allocator.ref_count(b) == 1 for b in range(10))


def test_the_scheduler_gives_landed_blocks_to_the_sequence_or_frees_them(
        llama_pair: ModelPair) -> None:
    import asyncio

    from decode_service.scheduler import Admission, Admitted, BatchScheduler
    from engine.engine import LLMEngine, StepOutput
    from engine.sampling import SamplingParams
    from kvrelay.serving.metrics import WorkerMetrics

    _, payloads = _source(llama_pair)
    runner = llama_pair.runner(num_blocks=16, block_size=4)
    scheduler = BatchScheduler(LLMEngine(runner), WorkerMetrics(), None)

    async def admit(prompt: list[int], landed: int) -> list[object]:
        landing = BlockLanding(runner)
        _land(landing, payloads[:landed], reserve=landed)
        events: asyncio.Queue[object] = asyncio.Queue()
        seq = Sequence(f"s{landed}-{len(prompt)}", prompt, SamplingParams(max_new_tokens=1))
        scheduler.submit(Admission(seq, [], landing.payloads, events, landing.blocks))
        got = [await asyncio.wait_for(events.get(), 10)]
        if isinstance(got[0], Admitted):
            got.append(await asyncio.wait_for(events.get(), 10))
        return got

    async def main() -> None:
        scheduler.start(asyncio.get_running_loop())
        try:
            ok = await admit(PROMPT, 5)
            assert isinstance(ok[1], StepOutput) and ok[1].finished
            refused = await admit(PROMPT[:10], 5)  # 5 blocks are 20 tokens: more than 10
            assert isinstance(refused[0], ValueError)
        finally:
            await asyncio.to_thread(scheduler.stop)

    asyncio.run(main())
    assert runner.allocator.num_free == 16  # finished and refused requests hold nothing


def test_named_blocks_are_shared_by_name_while_held_and_forgotten_when_freed() -> None:
    allocator = BlockAllocator(8)
    blocks = allocator.allocate(3)
    allocator.name(zip(blocks, [b"h0", b"h1", b"h2"]))
    allocator.name([(blocks[0], b"other"), (allocator.allocate(1)[0], b"h1")])  # both ignored
    assert allocator.share_named([b"h0", b"h1", b"x", b"h2"]) == blocks[:2]
    assert [allocator.ref_count(b) for b in blocks] == [2, 2, 1]
    allocator.free(blocks[:2])
    allocator.free(blocks)  # h0..h2 now free: their names go with them
    assert allocator.share_named([b"h0"]) == []
    assert allocator.num_free == 7


def test_a_request_shares_the_prefix_blocks_a_running_request_holds(
        llama_pair: ModelPair) -> None:
    import asyncio

    from cachestore.hashing import hash_block_chain
    from decode_service.scheduler import Admission, Admitted, BatchScheduler
    from engine.engine import LLMEngine, StepOutput
    from engine.sampling import SamplingParams
    from kvrelay.serving.metrics import WorkerMetrics

    _, payloads = _source(llama_pair)
    hashes = hash_block_chain(PROMPT, 4, "ab" * 16, "")  # 5 full blocks
    runner = llama_pair.runner(num_blocks=32, block_size=4)
    scheduler = BatchScheduler(LLMEngine(runner), WorkerMetrics(), None)
    reference = LLMEngine(llama_pair.runner(num_blocks=32, block_size=4))
    other = PROMPT[:20] + [5, 6, 7]  # the same 5 full blocks, another tail
    expected = [c.token_ids for c in reference.generate([PROMPT, other],
                                                         SamplingParams(max_new_tokens=12))]

    async def run(prompt: list[int], landing: BlockLanding, name: str) -> list[int]:
        events: asyncio.Queue[object] = asyncio.Queue()
        seq = Sequence(name, prompt, SamplingParams(max_new_tokens=12))
        scheduler.submit(Admission(seq, hashes, landing.payloads, events, landing.blocks))
        tokens: list[int] = []
        while True:
            event = await asyncio.wait_for(events.get(), 10)
            if isinstance(event, Admitted):
                continue
            assert isinstance(event, StepOutput)
            tokens.append(event.token_id)
            if event.finished:
                return tokens

    async def main() -> tuple[list[int], list[int], int]:
        scheduler.start(asyncio.get_running_loop())
        try:
            first = BlockLanding(runner)
            _land(first, payloads, reserve=5)
            running = asyncio.create_task(run(PROMPT, first, "first"))
            while not scheduler.engine.running:
                await asyncio.sleep(0.001)
            second = BlockLanding(runner)
            shared = second.share(hashes)
            return await running, await run(other, second, "second"), shared
        finally:
            await asyncio.to_thread(scheduler.stop)

    first_tokens, second_tokens, shared = asyncio.run(main())
    assert shared == 5  # every prefix block came from the pool, none fetched or copied
    assert [first_tokens, second_tokens] == expected
    assert runner.allocator.num_free == 32
    assert runner.allocator.share_named(hashes) == []  # nothing held, no name left


def test_a_converting_pool_takes_payloads_as_bytes(llama_pair: ModelPair) -> None:
    _, payloads = _source(llama_pair)
    target = llama_pair.runner(num_blocks=16, block_size=4)
    assert target.kv is not None and target.kv.lands_in_place
    target.kv.wire_dtype = torch.bfloat16  # payloads would need converting on import
    assert not target.kv.lands_in_place
    with pytest.raises(ValueError, match="import_block"):
        target.kv.landing_bytes(0)
    landing = BlockLanding(target)
    _land(landing, payloads, reserve=5)
    assert landing.blocks == [] and len(landing.payloads) == 5
    assert target.allocator.num_free == 16


def test_payloads_received_where_land_says_are_taken_without_a_copy(
        llama_pair: ModelPair) -> None:
    expected, payloads = _source(llama_pair)
    target = llama_pair.runner(num_blocks=16, block_size=4)
    landing = BlockLanding(target)
    landing.reserve(5)
    assert landing.land(1) is None  # only the next block has a place
    for i, payload in enumerate(payloads):
        dest = landing.land(i)
        assert dest is not None and dest.nbytes == payload.nbytes
        dest[:] = payload  # what the socket does
        landing.put(i, dest)
    landing.settle()
    assert len(landing.blocks) == 5 and landing.land(5) is None
    warm = Sequence("warm", PROMPT)
    target.adopt_blocks(warm, landing.blocks)
    landing.release()
    torch.testing.assert_close(target.prefill([warm])[0], expected, **TOL)
