"""Reusable receive memory for bulk replies (no page faults, no allocation per value)."""

from __future__ import annotations


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
