"""Counters and rate-limited error logging shared by a store and its prefix cache.

The services export these numbers as Prometheus metrics; here they are plain ints,
floats and dicts guarded by one lock, so any thread may update or read them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

logger = logging.getLogger("kvrelay.cachestore")


class CacheStats:
    """Hits, misses, bytes, seconds, store errors by kind and integrity failures by reason."""

    def __init__(self, log_interval_s: float = 30.0) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._seconds: dict[str, float] = {}
        self._errors: Counter[str] = Counter()
        self._integrity: Counter[str] = Counter()
        self._log = _RateLimitedLog(log_interval_s)

    def add(self, name: str, n: int = 1) -> None:
        """Add to a plain counter (hits, misses, bytes_read, bytes_written, ...)."""
        with self._lock:
            self._counts[name] += n

    def add_seconds(self, op: str, seconds: float) -> None:
        with self._lock:
            self._seconds[op] = self._seconds.get(op, 0.0) + seconds

    def error(self, kind: str, detail: object, count: int = 1) -> None:
        """Count a store error (a miss or a dropped write) and log it without flooding."""
        with self._lock:
            self._errors[kind] += count
        self._log.emit(f"store error {kind}", detail)

    def integrity(self, reason: str, key: str) -> None:
        """Count a value that failed verification; it was treated as a miss."""
        with self._lock:
            self._integrity[reason] += 1
        self._log.emit(f"integrity failure {reason}", key)

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy: ``{"counts", "seconds", "errors", "integrity"}`` dicts."""
        with self._lock:
            return {"counts": dict(self._counts), "seconds": dict(self._seconds),
                    "errors": dict(self._errors), "integrity": dict(self._integrity)}

    def count(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def errors(self, kind: str) -> int:
        with self._lock:
            return self._errors[kind]

    def integrity_failures(self, reason: str) -> int:
        with self._lock:
            return self._integrity[reason]


class _RateLimitedLog:
    """Logs the first event of each kind at once, then at most one line per interval."""

    def __init__(self, interval_s: float) -> None:
        self._interval = interval_s
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def emit(self, what: str, detail: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(what, 0.0):
                self._suppressed[what] += 1
                return
            self._next[what] = now + self._interval
            suppressed = self._suppressed.pop(what, 0)
        logger.warning("%s: %s (%d more since the last report)", what, detail, suppressed)
