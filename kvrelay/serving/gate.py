"""A compute gate: workers that share one machine's cores take turns at forward passes.

A prefill worker and a decode worker on the same cores (``kvrelay up``, the benchmark's
local cluster, a single-node deployment) each run torch with one OpenMP thread per core.
When both compute at once, every parallel region of one is preempted by the other's
threads and waits at its barrier for a thread that is not running: on a 2-core Xeon three
concurrent 544-token prompts, batched into one prefill pass, took ~3 s in the prefill
worker while the decode worker stepped another request, against 1.53-1.76 s for the same
pass alone. The cores are better used one worker at a time, each with all of them, the way
kernels of two processes take turns on one GPU.

``ComputeGate`` is that turn-taking: an exclusive ``flock`` on a file every co-located
worker names (``--compute-gate``), taken around each forward pass. Two locks make it
fair: a worker first takes the *turnstile*, then the gate, and lets the turnstile go
once it holds the gate. A worker that finishes a pass and wants the next one therefore
queues behind a worker already waiting for the gate instead of taking it straight back
(with a single lock, a decode loop that re-locks at once can keep the gate for as long as
it has work). ``flock`` locks go with the process: a worker that dies, however it dies,
holds nothing.

A turn is one forward pass, but a long pass does not keep the cores to itself: between
its decoder layers (``ModelRunner.between_layers``) a worker that has held the gate for
``slice_s`` and sees another one waiting (the turnstile is taken) lets the gate go, waits
its turn like any other worker, and goes on with the next layer (``pause_point``). A decode
step then waits for at most a slice and a layer of a prefill pass, not the whole pass
(seconds for a batch of long prompts), which is what bounds the running requests'
inter-token latency; passes shorter than a slice (decode steps) are never cut.

A stopped or hung worker could hold the gate for ever, so a wait is bounded: after
``max_wait_s`` a worker computes without it (counted, logged once) and keeps doing so,
without waiting again, until the gate is free once more. Nothing is ever blocked for good;
a bypass only costs what sharing the cores costs without a gate.

Off (no path) the gate does nothing. Workers with cores of their own (separate machines,
containers with CPU limits, one GPU each) should leave it off.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("kvrelay.gate")

POLL_S = 0.0005
"""How often a waiting worker tries the lock again (a non-blocking ``flock`` each time,
so that the wait can be bounded); the most a handover adds to a pass."""


class ComputeGate:
    """Exclusive turns at the cores between processes that open the same ``path``."""

    def __init__(self, path: str, max_wait_s: float = 5.0,
                 on_wait: Callable[[float], None] | None = None,
                 on_bypass: Callable[[], None] | None = None,
                 slice_s: float = 0.5, on_pause: Callable[[], None] | None = None) -> None:
        if max_wait_s <= 0:
            raise ValueError("max_wait_s must be positive")
        if slice_s < 0:
            raise ValueError("slice_s must be >= 0 (0: passes are never cut)")
        self.path = path
        self.max_wait_s = max_wait_s
        self.slice_s = slice_s
        self._on_wait = on_wait
        self._on_bypass = on_bypass
        self._on_pause = on_pause
        self._lock = threading.Lock()  # one pass at a time within this process too
        self._gate = _open(path)
        self._turnstile = _open(path + ".turnstile")
        self._bypassing = False
        self._held = False  # by the pass now in its turn, on thread _owner
        self._held_since = 0.0
        self._owner = 0
        self.turns = 0
        self.bypasses = 0
        self.pauses = 0

    @contextlib.contextmanager
    def turn(self) -> Iterator[bool]:
        """Hold the gate for the block; yields whether it is held at the start (False:
        bypassed). ``pause_point`` may let it go and take it again inside the block."""
        with self._lock:
            self._owner = threading.get_ident()
            self._take()
            try:
                yield self._held
            finally:
                self._owner = 0
                if self._held:
                    self._held = False
                    fcntl.flock(self._gate, fcntl.LOCK_UN)

    def pause_point(self) -> None:
        """Inside a turn, between two layers of a pass: when this turn has held the gate
        for ``slice_s`` and another worker waits for it, let that worker have its turn,
        then take the gate back (a wait bounded like any other) before going on. Only the
        thread in the turn calls this; it does nothing outside one or with ``slice_s`` 0."""
        if not self._held or not self.slice_s or threading.get_ident() != self._owner:
            return
        if time.monotonic() - self._held_since < self.slice_s:
            return
        if _try(self._turnstile):  # nobody is waiting for the gate
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
            return
        self._held = False
        fcntl.flock(self._gate, fcntl.LOCK_UN)
        self.pauses += 1
        if self._on_pause is not None:
            self._on_pause()
        self._take()

    def _take(self) -> None:
        self._held = self._acquire()
        self._held_since = time.monotonic()

    def _acquire(self) -> bool:
        started = time.monotonic()
        if self._bypassing:
            # Bypassing until the gate is free again: one try, never a wait.
            if not _try(self._gate):
                return False
            self._bypassing = False
            log.warning("compute gate free again: taking turns", extra={"gate": self.path})
            self.turns += 1
            return True
        deadline = started + self.max_wait_s
        if not self._wait(self._turnstile, deadline):
            return self._bypass()
        try:
            if not self._wait(self._gate, deadline):
                return self._bypass()
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        if self._on_wait is not None:
            self._on_wait(time.monotonic() - started)
        self.turns += 1
        return True

    @staticmethod
    def _wait(fd: int, deadline: float) -> bool:
        while not _try(fd):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
        return True

    def _bypass(self) -> bool:
        self._bypassing = True
        self.bypasses += 1
        log.warning("compute gate held for over %.1f s by another worker: computing without "
                    "it until it is free", self.max_wait_s, extra={"gate": self.path})
        if self._on_bypass is not None:
            self._on_bypass()
        return False

    def close(self) -> None:
        with self._lock:
            os.close(self._gate)
            os.close(self._turnstile)


class NoGate:
    """The gate switched off: every turn is taken at once."""

    path = ""

    @contextlib.contextmanager
    def turn(self) -> Iterator[bool]:
        yield True

    def pause_point(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_gate(path: str, max_wait_s: float = 5.0,
              on_wait: Callable[[float], None] | None = None,
              on_bypass: Callable[[], None] | None = None,
              slice_s: float = 0.5,
              on_pause: Callable[[], None] | None = None) -> ComputeGate | NoGate:
    """A ``ComputeGate`` on ``path``, or ``NoGate`` when ``path`` is empty."""
    if not path:
        return NoGate()
    return ComputeGate(path, max_wait_s, on_wait, on_bypass, slice_s, on_pause)


def _open(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
