"""Wall-time bounds for tests that check a timeout or deadline is honoured.

Such a test times a call that must give up after a fraction of a second and asserts an
upper bound. On an oversubscribed virtual machine (CPU steal: threads woken up to a
second or more late, in bursts) every wait in the timed path can end late, and a fixed
bound fails although the code gave up on time. ``Stopwatch`` therefore also measures
how long the machine stalled while it ran: a sampling thread sleeps 10 ms at a time and
adds up how late it wakes. The bound is the named one plus that stall (capped). On a
quiet machine the stall is ~0 and nothing changes; a call that ignores its deadline
(waits out a 2-8 s pause, or hangs) still fails.
"""

from __future__ import annotations

import threading
import time

MAX_STALL_S = 5.0
_NAP_S = 0.01
_JITTER_S = 0.002  # ordinary wake-up jitter, not counted as a stall


class Stopwatch:
    """Starts on creation; ``within(seconds)`` stops it and checks the bound."""

    def __init__(self) -> None:
        self.stalled_s = 0.0
        self.elapsed_s = 0.0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="stall-sampler", daemon=True)
        self._started = time.monotonic()
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            before = time.monotonic()
            time.sleep(_NAP_S)
            late = time.monotonic() - before - _NAP_S
            if late > _JITTER_S:
                self.stalled_s += late

    def stop(self) -> float:
        """Seconds since creation (the first call fixes it)."""
        if not self._stop.is_set():
            self.elapsed_s = time.monotonic() - self._started
            self._stop.set()
            self._sampler.join()
        return self.elapsed_s

    def within(self, seconds: float) -> bool:
        """Whether the timed part took less than ``seconds`` plus the machine's stall."""
        return self.stop() < seconds + min(MAX_STALL_S, self.stalled_s)

    def __repr__(self) -> str:
        return f"Stopwatch(elapsed {self.elapsed_s:.2f} s, machine stalled {self.stalled_s:.2f} s)"
