"""Reusable receive memory for bulk replies (no page faults, no allocation per value)."""

from __future__ import annotations

from collections.abc import Callable


class Arena:
    """Hands out views of one preallocated buffer; ``reset()`` recycles all of them.

    A view stays valid until the next ``reset()``; after that its bytes are overwritten.
    When a round needs more than the buffer holds, the overflow gets fresh memory and
    the next ``reset()`` grows the buffer to the largest round seen. One arena belongs to
    one thread at a time.
    """

    def __init__(self, capacity: int = 0) -> None:
        self._buffer = bytearray(capacity)
        self._offset = 0
        self._wanted = capacity

    def take(self, nbytes: int) -> memoryview:
        """A writable view of ``nbytes`` bytes."""
        end = self._offset + nbytes
        self._wanted = max(self._wanted, end)
        if end > len(self._buffer):
            self._offset = end
            return memoryview(bytearray(nbytes))
        view = memoryview(self._buffer)[self._offset:end]
        self._offset = end
        return view

    def reset(self) -> None:
        """Recycle every view handed out so far."""
        if self._wanted > len(self._buffer):
            self._buffer = bytearray(self._wanted)
        self._offset = 0

    @property
    def capacity(self) -> int:
        return len(self._buffer)


class Landed:
    """A bulk reply received in two places: its first bytes (the block header) in an arena,
    the rest straight into memory the caller chose (``LandingArena``)."""

    __slots__ = ("header", "payload")

    def __init__(self, header: memoryview, payload: memoryview) -> None:
        self.header = header
        self.payload = payload

    @property
    def nbytes(self) -> int:
        return self.header.nbytes + self.payload.nbytes


class LandingArena:
    """An ``Arena`` that lets values of one known size skip it: the reader asks
    ``take_split`` first, and a value of ``header_nbytes + payload_nbytes`` bytes is read
    with its header into the arena and its payload straight into ``dest(index)`` (a pool
    block, say), where ``index`` counts the values asked for so far from ``first`` on.
    ``dest`` returning None, or a value of another size, falls back to the arena.
    """

    def __init__(self, inner: Arena, header_nbytes: int, payload_nbytes: int,
                 dest: Callable[[int], memoryview | None], first: int = 0) -> None:
        self._inner = inner
        self._header_nbytes = header_nbytes
        self._payload_nbytes = payload_nbytes
        self._dest = dest
        self._next = first

    def take(self, nbytes: int) -> memoryview:
        return self._inner.take(nbytes)

    def take_split(self, nbytes: int) -> tuple[memoryview, memoryview] | None:
        index = self._next
        self._next += 1
        if nbytes != self._header_nbytes + self._payload_nbytes:
            return None
        dest = self._dest(index)
        if dest is None or dest.nbytes != self._payload_nbytes:
            return None
        return self._inner.take(self._header_nbytes), dest

    def reset(self) -> None:
        self._inner.reset()
