"""A Prefill call replies once its own passes and publishes are over, not after the passes
other calls queued on the worker's one compute thread meanwhile; a call cancelled while its
pass waits frees its blocks only after that pass has run."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

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


def test_a_call_replies_without_waiting_for_passes_queued_after_its_own(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate, second_running = threading.Event(), threading.Event()
    real_pass = worker_module.prefill_full_blocks

    def gated(runner, seq, last):  # type: ignore[no-untyped-def]
        if seq.seq_id == "second":
            second_running.set()
            assert gate.wait(60)
        return real_pass(runner, seq, last)

    monkeypatch.setattr(worker_module, "prefill_full_blocks", gated)

    async def run() -> None:
        config = WorkerConfig(model=str(tiny_model_dir), block_size=BLOCK_SIZE, num_blocks=64)
        runtime = await start_runtime(config, WorkerMetrics())
        real_publish = runtime.cache.publish

        def slow_publish(hashes, views):  # type: ignore[no-untyped-def]
            time.sleep(0.5)  # the second call's pass gets queued meanwhile
            return real_publish(hashes, views)

        runtime.cache.publish = slow_publish  # type: ignore[method-assign]
        worker = PrefillWorker(runtime, max_requests=4)
        try:
            first = asyncio.create_task(worker.prefill(_job(runtime, "first", 0)))
            await asyncio.sleep(0.1)
            second = asyncio.create_task(worker.prefill(_job(runtime, "second", 100)))
            await asyncio.wait_for(asyncio.to_thread(second_running.wait, 30), 40)
            result = await asyncio.wait_for(first, 30)  # while the second pass still holds the thread
            assert result.computed_tokens == 2 * BLOCK_SIZE and not second.done()
            gate.set()
            assert (await asyncio.wait_for(second, 30)).computed_tokens == 2 * BLOCK_SIZE
            assert runtime.runner.allocator.num_free == 64  # both calls' blocks are back
        finally:
            gate.set()
            runtime.close()

    asyncio.run(run())


def test_a_call_cancelled_while_its_pass_waits_frees_its_blocks_after_the_pass(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate, running = threading.Event(), threading.Event()
    blocks_during_pass: list[int] = []
    real_pass = worker_module.prefill_full_blocks

    def gated(runner, seq, last):  # type: ignore[no-untyped-def]
        running.set()
        assert gate.wait(60)
        out = real_pass(runner, seq, last)
        blocks_during_pass.append(len(seq.block_table))
        return out

    monkeypatch.setattr(worker_module, "prefill_full_blocks", gated)

    async def run() -> None:
        config = WorkerConfig(model=str(tiny_model_dir), block_size=BLOCK_SIZE, num_blocks=64)
        runtime = await start_runtime(config, WorkerMetrics())
        worker = PrefillWorker(runtime, max_requests=4)
        try:
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
        finally:
            gate.set()
            runtime.close()

    asyncio.run(run())
