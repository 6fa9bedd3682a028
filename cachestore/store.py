"""The block store interface and its in-memory implementation.

A store maps block keys to immutable values. Every method is batched, synchronous,
thread-safe and bounded in time, and none raises a store error into a request: an
error, a timeout or an unreachable server turns into misses (or dropped writes) that are
counted in ``stats`` by kind and logged without flooding. ``RedisBlockStore`` (in
``cachestore.redis_store``) is the real one; ``MemoryBlockStore`` is for unit tests and
``NullBlockStore`` for workers run without a store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from cachestore.arena import Arena, Landed, LandingArena
from cachestore.stats import CacheStats

if TYPE_CHECKING:
    from typing_extensions import Buffer

Parts = Sequence["Buffer"]
PutItem = tuple[str, "Parts | Callable[[], Parts]"]
"""A key and the parts of its value (header, payload), sent without joining them; or a
function making them, called once when the value is about to be sent (so that encoding,
a checksum over the payload, overlaps the sending of the values before it)."""


def parts_of(item: PutItem) -> Parts:
    """The value parts of ``item``, made now if they were deferred."""
    parts = item[1]
    return parts() if callable(parts) else parts


Visit = Callable[[int, "memoryview | Landed | None"], bool]
"""Receives ``(key index, value or None)`` in key order; returns False to stop. A value
read through a ``LandingArena`` arrives as ``Landed`` (header and payload apart)."""


class BlockStore(Protocol):
    """Batched access to block values; see the module docstring for the error contract."""

    stats: CacheStats

    def lookup_prefix(self, keys: Sequence[str]) -> int:
        """How many leading keys are present (stops at the first absent one)."""
        ...

    def get_many(self, keys: Sequence[str], *, arena: Arena | None = None
                 ) -> list[memoryview | None]:
        """Each key's value, or None when absent or unreadable; large values land in
        ``arena`` when one is given (valid until its next reset)."""
        ...

    def get_each(self, keys: Sequence[str], visit: Visit, *,
                 arena: Arena | LandingArena | None = None,
                 max_value_bytes: int | None = None) -> None:
        """Stream the values to ``visit`` in key order, each as soon as it has arrived,
        until ``visit`` returns False. A value is valid only during its ``visit`` call
        (its memory is reused for the next one). A failed call ends the visits early.
        A value longer than ``max_value_bytes`` is never buffered: it is visited as None
        and counted as the integrity failure ``too_large``."""
        ...

    def put_many(self, items: Sequence[PutItem], ttl_s: int | None = None) -> int:
        """Write values that are not there yet (SET NX, optional TTL); returns how many
        were written. Existing keys are left as they are."""
        ...

    def close(self) -> None:
        """Release connections; the store may not be used afterwards."""
        ...


class MemoryBlockStore:
    """A dict-backed store with the same semantics (NX writes, TTLs) for unit tests.

    ``values`` is the raw key -> bytes mapping, exposed so tests can inject faults.
    """

    def __init__(self, stats: CacheStats | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stats = stats or CacheStats()
        self.values: dict[str, bytes] = {}
        self._expiry: dict[str, float] = {}
        self._clock = clock
        self._lock = threading.Lock()

    def _live(self, key: str) -> bytes | None:
        if self._expiry.get(key, float("inf")) <= self._clock():
            self.values.pop(key, None)
            self._expiry.pop(key, None)
        return self.values.get(key)

    def lookup_prefix(self, keys: Sequence[str]) -> int:
        with self._lock:
            for count, key in enumerate(keys):
                if self._live(key) is None:
                    return count
            return len(keys)

    def get_many(self, keys: Sequence[str], *, arena: Arena | None = None
                 ) -> list[memoryview | None]:
        with self._lock:
            found = [self._live(key) for key in keys]
        self.stats.add("bytes_read", sum(len(v) for v in found if v is not None))
        return [None if v is None else memoryview(v) for v in found]

    def get_each(self, keys: Sequence[str], visit: Visit, *,
                 arena: Arena | LandingArena | None = None,
                 max_value_bytes: int | None = None) -> None:
        for index, value in enumerate(self.get_many(keys)):
            if value is not None and max_value_bytes is not None and (
                    value.nbytes > max_value_bytes):
                self.stats.integrity("too_large", keys[index])
                value = None
            if not visit(index, value):
                return

    def put_many(self, items: Sequence[PutItem], ttl_s: int | None = None) -> int:
        written = 0
        with self._lock:
            for item in items:
                key = item[0]
                if self._live(key) is not None:
                    continue
                self.values[key] = b"".join(parts_of(item))
                if ttl_s:
                    self._expiry[key] = self._clock() + ttl_s
                written += 1
                self.stats.add("bytes_written", len(self.values[key]))
        self.stats.add("blocks_written", written)
        return written

    def close(self) -> None:
        with self._lock:
            self.values.clear()


class NullBlockStore:
    """The store of a worker run without Redis: every lookup misses, every write drops."""

    def __init__(self, stats: CacheStats | None = None) -> None:
        self.stats = stats or CacheStats()

    def lookup_prefix(self, keys: Sequence[str]) -> int:
        return 0

    def get_many(self, keys: Sequence[str], *, arena: Arena | None = None
                 ) -> list[memoryview | None]:
        return [None] * len(keys)

    def get_each(self, keys: Sequence[str], visit: Visit, *,
                 arena: Arena | LandingArena | None = None,
                 max_value_bytes: int | None = None) -> None:
        if keys:
            visit(0, None)

    def put_many(self, items: Sequence[PutItem], ttl_s: int | None = None) -> int:
        return 0

    def close(self) -> None:
        """Nothing to release."""
