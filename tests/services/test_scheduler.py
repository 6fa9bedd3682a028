"""The batch thread with a fake engine: failures reach the request, the thread lives on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from decode_service.scheduler import Admission, Admitted, BatchScheduler
from engine.engine import StepOutput
from engine.sequence import Sequence
from kvrelay.serving.metrics import WorkerMetrics


@dataclass
class _Allocator:
    num_blocks: int = 8
    num_free: int = 8
    num_retained: int = 0


@dataclass
class _Runner:
    allocator: _Allocator = field(default_factory=_Allocator)
    block_size: int = 4

    def import_blocks(self, seq: Sequence, payloads: list[bytes]) -> None:
        assert not payloads

    def free(self, seq: Sequence) -> None:
        seq.block_table = []


class _Engine:
    """Finishes every sequence in one step; the first step raises when ``fail_first``."""

    def __init__(self, fail_first: bool) -> None:
        self.runner = _Runner()
        self.running: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self._fail = fail_first

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> bool:
        self.waiting = [s for s in self.waiting if s.seq_id != seq_id]
        return True

    def step(self) -> list[StepOutput]:
        if self._fail:
            self._fail = False
            raise RuntimeError("a bug in a forward pass")
        done, self.waiting = self.waiting, []
        return [StepOutput(s.seq_id, 7, None, "x", True, "length") for s in done]


async def _submit(scheduler: BatchScheduler, seq_id: str) -> list[object]:
    events: asyncio.Queue[object] = asyncio.Queue()
    scheduler.submit(Admission(Sequence(seq_id, [1, 2, 3]), [], [], events))
    got = [await asyncio.wait_for(events.get(), 5)]
    if isinstance(got[0], Admitted):
        got.append(await asyncio.wait_for(events.get(), 5))
    return got


def test_a_failed_step_fails_its_requests_and_the_batch_goes_on() -> None:
    async def main() -> None:
        scheduler = BatchScheduler(_Engine(fail_first=True), WorkerMetrics(), None)  # type: ignore[arg-type]
        scheduler.start(asyncio.get_running_loop())
        try:
            first = await _submit(scheduler, "a")
            second = await _submit(scheduler, "b")
        finally:
            await asyncio.to_thread(scheduler.stop)
        assert isinstance(first[1], RuntimeError)
        assert isinstance(second[1], StepOutput) and second[1].seq_id == "b"

    asyncio.run(main())
