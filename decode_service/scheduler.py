"""The continuous batch on its own thread, so the grpc.aio event loop never blocks.

One dedicated compute thread owns the ``LLMEngine`` and its ``ModelRunner``. The event
loop talks to it only by messages: ``submit`` (an admission: import fetched blocks, join
the batch), ``abort`` (leave now, freeing KV). Between
two engine steps the thread applies every pending message, so requests join and leave
between steps. Results go back to each request's ``asyncio.Queue``. An admission that
finds the KV pool full waits (in arrival order) until running requests free blocks.
What is missing of a prompt is computed by the engine's batched prefill, in one pass with
the other new requests; full blocks that pass computed are exported (engine hook
``on_prefill``, before a request that ends on its first token frees them) and published.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cachestore.hashing import BlockHash
from engine.engine import LLMEngine, StepOutput
from engine.kv import OutOfBlocks
from engine.sequence import Sequence
from kvrelay.serving.gate import ComputeGate, NoGate
from kvrelay.serving.kvblocks import export_blocks, used_blocks
from kvrelay.serving.metrics import WorkerMetrics

log = logging.getLogger("kvrelay.scheduler")
Publish = Callable[[list[BlockHash], list[np.ndarray]], None]


@dataclass
class Admission:
    """A request ready to join the batch: its prompt blocks' hashes and its fetched prefix,
    ``landed`` (pool blocks already holding it, ``kvblocks.BlockLanding``; the admission
    owns one reference to each until it is admitted or dropped) then ``payloads``."""

    seq: Sequence
    hashes: list[BlockHash]
    payloads: list[bytes]
    events: asyncio.Queue[Any]
    landed: list[int] = field(default_factory=list)

    @property
    def fetched(self) -> int:
        return len(self.landed) + len(self.payloads)


@dataclass(frozen=True)
class Admitted:
    """First event of a request: when work on it (importing its blocks) started."""

    started: float


class BatchScheduler:
    """Runs ``engine`` on one thread; ``publish`` gets blocks computed by local prefill."""

    def __init__(self, engine: LLMEngine, metrics: WorkerMetrics, publish: Publish | None,
                 gate: ComputeGate | NoGate | None = None) -> None:
        self.engine = engine
        self._gate = gate or NoGate()
        self._metrics = metrics
        self._publish = publish
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._deferred: deque[Admission] = deque()
        self._hashes: dict[str, list[BlockHash]] = {}  # admitted prompts' block hashes
        self._unpublished: dict[str, int] = {}  # first block not published yet
        engine.on_prefill = self._after_prefill
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._running: Future[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop, executor: Executor | None = None) -> None:
        """Run the batch loop on ``executor`` (the runtime's compute thread, which loaded
        the model: ``kvrelay.serving.runtime``), or on a new thread when None."""
        self._loop = loop
        if executor is None:
            self._running = Future()
            threading.Thread(target=self._run_to, args=(self._running,), name="compute",
                             daemon=True).start()
        else:
            self._running = executor.submit(self._run)

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(lambda: None)
        if self._running is not None:
            wait([self._running], timeout=10)

    def _run_to(self, done: Future[None]) -> None:
        try:
            self._run()
        finally:
            done.set_result(None)

    def submit(self, admission: Admission) -> None:
        """Queue ``admission``; its events arrive on ``admission.events``."""
        self._inbox.put(lambda: self._admit(admission))

    def abort(self, seq_id: str) -> None:
        """Drop the sequence and free its KV before the next step."""
        self._inbox.put(lambda: self._abort(seq_id))

    # -- on the compute thread ---------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._iterate()
            except Exception as exc:  # the thread must outlive any one failure
                log.exception("batch thread error; failing the requests in flight")
                self._fail_all(exc)

    def _iterate(self) -> None:
        self._apply_messages(block=not self.engine.has_unfinished)
        self._retry_deferred()
        if self.engine.has_unfinished:
            self._step()

    def _apply_messages(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            message()
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _send(self, events: asyncio.Queue[Any], item: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(events.put_nowait, item)

    def _admit(self, a: Admission) -> None:
        started = time.monotonic()
        runner = self.engine.runner
        try:
            if a.landed:
                runner.adopt_blocks(a.seq, a.landed)
            runner.import_blocks(a.seq, a.payloads)
            self.engine.add(a.seq)
        except OutOfBlocks as exc:
            runner.free(a.seq)
            if self.engine.has_unfinished:  # running requests will free blocks: retry then
                self._deferred.append(a)
            else:
                self._drop(a, exc)
            return
        except Exception as exc:  # noqa: BLE001 - the request gets it, the batch goes on
            runner.free(a.seq)
            self._drop(a, exc)
            return
        if a.hashes:
            self._hashes[a.seq.seq_id] = a.hashes
            runner.allocator.name(zip(a.seq.block_table[:a.fetched], a.hashes[:a.fetched]))
            if self._publish is not None and a.fetched < len(a.hashes):
                self._unpublished[a.seq.seq_id] = a.fetched
        self._release_landed(a)  # the sequence holds its own references now
        self._queues[a.seq.seq_id] = a.events
        self._send(a.events, Admitted(started))

    def _release_landed(self, a: Admission) -> None:
        if a.landed:
            self.engine.runner.allocator.free(a.landed)
            a.landed = []

    def _drop(self, a: Admission, exc: Exception) -> None:
        """End an admission that will not run: free what it holds, tell its request."""
        self._release_landed(a)
        self._send(a.events, exc)

    def _after_prefill(self, seqs: list[Sequence]) -> None:
        """Engine hook after a prefill pass: name the full prompt blocks it computed (so
        later requests with the same prefix share them in the pool), and publish those not
        published yet (a prompt computed in chunks: after each chunk)."""
        runner = self.engine.runner
        for seq in seqs:
            hashes = self._hashes.get(seq.seq_id)
            if not hashes:
                continue
            full = min(len(hashes), seq.num_computed // runner.block_size)
            runner.allocator.name(zip(seq.block_table[:full], hashes[:full]))
            first = self._unpublished.pop(seq.seq_id, None)
            if self._publish is not None and first is not None and full > first:
                self._publish(hashes[first:full], export_blocks(runner, seq, first, full))
            if first is not None and seq.num_computed < len(seq.token_ids):
                self._unpublished[seq.seq_id] = max(first, full)  # a chunk: more to come

    def _retry_deferred(self) -> None:
        """Admit deferred requests in arrival order until one still does not fit."""
        for _ in range(len(self._deferred)):
            waiting = len(self._deferred)
            self._admit(self._deferred.popleft())
            if len(self._deferred) == waiting:  # deferred again, now at the back: restore order
                self._deferred.rotate(1)
                return

    def _abort(self, seq_id: str) -> None:
        deferred = [a for a in self._deferred if a.seq.seq_id == seq_id]
        for admission in deferred:
            self._deferred.remove(admission)
            self._release_landed(admission)
        self._unpublished.pop(seq_id, None)
        self._hashes.pop(seq_id, None)
        if self._queues.pop(seq_id, None) is not None:
            self.engine.abort(seq_id)
            self._pool_gauges()

    def _pool_gauges(self) -> None:
        runner = self.engine.runner
        self._metrics.kv_used.set(used_blocks(runner))
        self._metrics.kv_kept.set(runner.allocator.num_retained)

    def _step(self) -> None:
        with self._gate.turn():  # a step is one forward pass (kvrelay.serving.gate)
            outputs: list[StepOutput] = self.engine.step()
        self._pool_gauges()
        deliveries: list[tuple[asyncio.Queue[Any], StepOutput]] = []
        for out in outputs:
            events = self._queues.get(out.seq_id)
            if events is not None:
                deliveries.append((events, out))
            if out.finished:
                self._queues.pop(out.seq_id, None)
                self._hashes.pop(out.seq_id, None)
        if deliveries:  # one wake-up of the event loop per step, not one per request
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_deliver, deliveries)

    def _fail_all(self, exc: Exception) -> None:
        for seq_id, events in list(self._queues.items()):
            self.engine.abort(seq_id)
            self._send(events, exc)
        self._queues.clear()
        self._unpublished.clear()
        self._hashes.clear()
        while self._deferred:
            self._drop(self._deferred.popleft(), exc)


def _deliver(deliveries: list[tuple[asyncio.Queue[Any], StepOutput]]) -> None:
    for events, out in deliveries:
        events.put_nowait(out)
