"""A Prefill call replies once its own passes and publishes are over, not after the passes
other calls queued on the worker's one compute thread meanwhile; calls whose chunks wait
together are computed in one batched pass; a call cancelled while its pass runs frees its
blocks only after that pass."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.sequence import Sequence
from kvrelay.serving.metrics import WorkerMetrics
from kvrelay.serving.runtime import Runtime, start_runtime
from kvrelay.serving.worker_config import WorkerConfig
from prefill_service import worker as worker_module
from prefill_service.worker import PrefillJob, PrefillWorker

BLOCK_SIZE = 16


def _job(runtime: Runtime, name: str, first_id: int) -> PrefillJob:
    ids = [(first_id + i) % 200 + 1 for i in range(2 * BLOCK_SIZE + 3)]  # 2 full blocks
    hashes = [bytes(h) for h in runtime.cache.block_hashes(ids, "")]
    return PrefillJob(ids, "", hashes, runtime.spec.fingerprint, name)


@contextlib.asynccontextmanager
async def _runtime(model_dir: Path, gate: threading.Event) -> AsyncIterator[Runtime]:
    """A prefill runtime on the tiny model, without a store; ``gate`` is opened before it
    closes, so that no pass stays blocked on it."""
    config = WorkerConfig(model=str(model_dir), block_size=BLOCK_SIZE, num_blocks=64)
    runtime = await start_runtime(config, WorkerMetrics())
    try:
        yield runtime
    finally:
        gate.set()
        runtime.close()


def test_a_call_replies_without_waiting_for_passes_queued_after_its_own(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate, second_running = threading.Event(), threading.Event()
    real_pass = worker_module.prefill_full_blocks_batch

    def gated(runner, items):  # type: ignore[no-untyped-def]
        if any(seq.seq_id == "second" for seq, _ in items):
            second_running.set()
            assert gate.wait(60)
        return real_pass(runner, items)

    monkeypatch.setattr(worker_module, "prefill_full_blocks_batch", gated)

    async def run() -> None:
        async with _runtime(tiny_model_dir, gate) as runtime:
            real_publish = runtime.cache.publish

            def slow_publish(hashes, views):  # type: ignore[no-untyped-def]
                time.sleep(0.5)  # the second call's pass gets queued meanwhile
                return real_publish(hashes, views)

            runtime.cache.publish = slow_publish  # type: ignore[method-assign]
            worker = PrefillWorker(runtime, max_requests=4)
            first = asyncio.create_task(worker.prefill(_job(runtime, "first", 0)))
            await asyncio.sleep(0.1)
            second = asyncio.create_task(worker.prefill(_job(runtime, "second", 100)))
            await asyncio.wait_for(asyncio.to_thread(second_running.wait, 30), 40)
            result = await asyncio.wait_for(first, 30)  # while the second pass still holds the thread
            assert result.computed_tokens == 2 * BLOCK_SIZE and not second.done()
            gate.set()
            assert (await asyncio.wait_for(second, 30)).computed_tokens == 2 * BLOCK_SIZE
            assert runtime.runner.allocator.num_free == 64  # both calls' blocks are back

    asyncio.run(run())


def test_a_call_cancelled_while_its_pass_runs_frees_its_blocks_after_the_pass(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate, running = threading.Event(), threading.Event()
    blocks_during_pass: list[int] = []
    real_pass = worker_module.prefill_full_blocks_batch

    def gated(runner, items):  # type: ignore[no-untyped-def]
        running.set()
        assert gate.wait(60)
        out = real_pass(runner, items)
        blocks_during_pass.extend(len(seq.block_table) for seq, _ in items)
        return out

    monkeypatch.setattr(worker_module, "prefill_full_blocks_batch", gated)

    async def run() -> None:
        async with _runtime(tiny_model_dir, gate) as runtime:
            worker = PrefillWorker(runtime, max_requests=4)
            call = asyncio.create_task(worker.prefill(_job(runtime, "cancelled", 0)))
            await asyncio.wait_for(asyncio.to_thread(running.wait, 30), 40)
            call.cancel()
            await asyncio.sleep(0.2)
            gate.set()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.wrap_future(runtime.compute.submit(lambda: None))  # the queue is drained
            assert blocks_during_pass == [2]  # the pass ran on blocks still its own
            assert runtime.runner.allocator.num_free == 64

    asyncio.run(run())


def test_chunks_waiting_together_are_computed_in_one_pass(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    passes: list[list[str]] = []
    real_pass = worker_module.prefill_full_blocks_batch

    def recorded(runner, items):  # type: ignore[no-untyped-def]
        passes.append([seq.seq_id for seq, _ in items])
        return real_pass(runner, items)

    monkeypatch.setattr(worker_module, "prefill_full_blocks_batch", recorded)

    async def run() -> None:
        hold = threading.Event()
        async with _runtime(tiny_model_dir, hold) as runtime:
            batcher = worker_module.PassBatcher(runtime)
            runtime.compute.submit(hold.wait, 60)  # the compute thread is busy meanwhile
            seqs = [Sequence(name, _job(runtime, name, 40 * i).token_ids)
                    for i, name in enumerate("abc")]
            tasks = [asyncio.create_task(batcher.compute(seq, 2)) for seq in seqs]
            await asyncio.sleep(0.1)  # every chunk is waiting
            hold.set()
            assert await asyncio.wait_for(asyncio.gather(*tasks), 30) == [2 * BLOCK_SIZE] * 3
            assert passes == [["a", "b", "c"]]
            assert all(s.num_computed == 2 * BLOCK_SIZE and len(s.block_table) == 2 for s in seqs)

    asyncio.run(run())


def test_a_batch_takes_chunks_in_order_that_fill_it_and_drops_cancelled_ones() -> None:
    batcher = worker_module.PassBatcher(SimpleNamespace(runner=SimpleNamespace(  # type: ignore[arg-type]
        block_size=BLOCK_SIZE)))
    loop = asyncio.new_event_loop()
    try:
        def chunk(name: str, blocks: int, held: int = 0):  # type: ignore[no-untyped-def]
            seq = Sequence(name, [1] * (blocks * BLOCK_SIZE + 1))
            seq.num_computed = held
            return (seq, blocks, loop.create_future())

        items = [chunk("a", 32), chunk("cancelled", 32), chunk("b", 30), chunk("short", 2),
                 chunk("c", 34, held=32), *(chunk(name, 32) for name in "defghi")]
        items[1][2].cancel()
        batcher._waiting = list(items)
        taken = [seq.seq_id for seq, _, _ in batcher._take()]
        # 512 new tokens a row ("c" holds 32 of its 544): 8 rows fill BATCH_TOKENS, the 9th
        # waits; "short" (32 tokens) would leave too much of the batch padding and waits too
        assert (worker_module.BATCH_TOKENS, worker_module.BATCH_FILL) == (4096, 0.75)
        assert taken == ["a", "b", "c", "d", "e", "f", "g", "h"]
        assert [seq.seq_id for seq, _, _ in batcher._waiting] == ["short", "i"]
    finally:
        loop.close()
