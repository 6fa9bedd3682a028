"""Just enough RESP to pipeline SET/GET/EXISTS without copying block values.

redis-py's command packer (and hiredis's) joins every argument into one new bytes object
per command, so each value is copied before it is sent; its reply parser copies each
bulk reply at least twice more. Here a SET is framed as a few small byte strings around
the value's own buffers, which go to the kernel with ``sendmsg`` (scatter-gather) or
``sendall`` (TLS), and bulk replies are read with ``recv_into`` straight into an
``Arena``. Both RESP2 and RESP3 replies are understood.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from cachestore.arena import Arena, Landed, LandingArena

if TYPE_CHECKING:
    from typing_extensions import Buffer

_IOV_MAX = 512
_SMALL = 16 * 1024
_SEND_AHEAD = 4 * 1024 * 1024
"""Bytes ``send_buffers`` holds ready beyond what the socket has taken: about a loopback
socket's send buffer, so the next buffers (a value encoded on demand) are made while the
server drains the ones before."""
_READ_CHUNK = 64 * 1024


class ReplyError:
    """An error reply (``-ERR ...``); returned in place of a value, never raised."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    @property
    def kind(self) -> str:
        """The error's first word, lowercased: ``noperm``, ``oom``, ``moved``, ..."""
        return self.message.split(" ", 1)[0].lower()

    def __repr__(self) -> str:
        return f"ReplyError({self.message!r})"


class TooLarge:
    """A bulk reply longer than the reader's ``max_bulk``: its bytes were read and dropped."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


Reply = int | bytes | memoryview | Landed | ReplyError | TooLarge | None


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def pack_command(*args: bytes) -> bytes:
    """A small command (``GET key``, ``EXISTS key``) as one byte string."""
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


def pack_set(key: bytes, value_parts: Sequence[Buffer], ttl_s: int | None) -> list[Buffer]:
    """``SET key value NX [EX ttl]`` as buffers; large value parts are not copied."""
    views = [memoryview(p).cast("B") for p in value_parts]
    tail = [b"NX"] + ([b"EX", b"%d" % ttl_s] if ttl_s else [])
    head = b"*%d\r\n" % (3 + len(tail)) + _bulk(b"SET") + _bulk(key)
    head += b"$%d\r\n" % sum(v.nbytes for v in views)
    out: list[Buffer] = []
    for view in views:
        if view.nbytes <= _SMALL:
            head += view
        else:
            out += [head, view]
            head = b""
    out.append(head + b"\r\n" + b"".join(_bulk(t) for t in tail))
    return out


def send_buffers(sock: socket.socket, buffers: Iterable[Buffer]) -> None:
    """Send every buffer in order without joining large ones (plain TCP: one syscall per
    ~512 buffers; TLS, which has no scatter-gather: small buffers are joined into one
    record, large ones are encrypted straight from their memory)."""
    if isinstance(sock, ssl.SSLSocket):
        for buf in _small_ones_joined(buffers):
            sock.sendall(buf)
        return
    source = iter(buffers)
    pending: list[memoryview] = []
    queued = 0
    more = True
    while True:
        while more and queued < _SEND_AHEAD:  # take buffers (made on demand) as room frees
            taken = next(source, None)
            if taken is None:
                more = False
            else:
                pending.append(memoryview(taken).cast("B"))
                queued += pending[-1].nbytes
        if not pending:
            return
        sent = sock.sendmsg(pending[:_IOV_MAX])
        queued -= sent
        pending = _advance(pending, sent)


def _small_ones_joined(buffers: Iterable[Buffer]) -> Iterator[Buffer]:
    small: list[memoryview] = []
    for buf in buffers:
        view = memoryview(buf).cast("B")
        if view.nbytes <= _SMALL:
            small.append(view)
            continue
        if small:
            yield b"".join(small)
            small = []
        yield view
    if small:
        yield b"".join(small)


def _advance(pending: list[memoryview], sent: int) -> list[memoryview]:
    index = 0
    while index < len(pending) and sent >= pending[index].nbytes:
        sent -= pending[index].nbytes
        index += 1
    rest = pending[index:]
    if rest and sent:
        rest[0] = rest[0][sent:]
    return rest


class ReplyReader:
    """Reads replies from one socket; bulk values land in an ``Arena`` when given one.

    Every receive is bounded by what is left of ``deadline`` (``time.monotonic()``);
    running past it raises ``TimeoutError``, and the connection must then be dropped.
    A bulk reply longer than ``max_bulk`` is never buffered: it is read through a small
    window, dropped, and returned as ``TooLarge`` (untrusted values cannot make the
    reader allocate more than what it expects).
    """

    def __init__(self, sock: socket.socket, deadline: float, max_bulk: int | None = None
                 ) -> None:
        self._sock = sock
        self._deadline = deadline
        self._max_bulk = max_bulk
        self._buf = bytearray(_READ_CHUNK)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def read(self, arena: Arena | LandingArena | None = None) -> Reply:
        """The next reply: int, bytes/memoryview (bulk), ReplyError, or None (nil)."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b":":
            return int(rest)
        if kind == b"-":
            return ReplyError(rest.decode(errors="replace"))
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            if self._max_bulk is not None and length > self._max_bulk:
                self._skip(length + 2)
                return TooLarge(length)
            return self._bulk(length, arena)
        if kind == b"!":
            return ReplyError(bytes(self._exactly_then_crlf(int(rest))).decode(errors="replace"))
        if kind == b"_":
            return None
        raise ConnectionError(f"unexpected reply type {kind!r}")

    def _bulk(self, length: int, arena: Arena | LandingArena | None
              ) -> bytes | memoryview | Landed:
        value: bytes | memoryview
        parts = arena.take_split(length) if isinstance(arena, LandingArena) and \
            length > _SMALL else None
        if parts is not None:  # header into the arena, payload straight where it belongs
            for part in parts:
                self._fill_into(part)
            self._exactly(2)
            return Landed(*parts)
        if arena is None or length <= _SMALL:
            value = bytes(self._exactly(length))
        else:
            value = arena.take(length)
            self._fill_into(value)
        self._exactly(2)
        return value

    def _exactly_then_crlf(self, length: int) -> bytes:
        value = bytes(self._exactly(length))
        self._exactly(2)
        return value

    def _fill_into(self, dest: memoryview) -> None:
        have = min(self._end - self._start, dest.nbytes)
        dest[:have] = self._view[self._start:self._start + have]
        self._start += have
        while have < dest.nbytes:
            have += self._recv(dest[have:])

    def _skip(self, n: int) -> None:
        buffered = min(self._end - self._start, n)
        self._start += buffered
        n -= buffered
        if self._start == self._end:
            self._start = self._end = 0
        while n:
            n -= self._recv(self._view[:min(n, len(self._buf))])

    def _exactly(self, n: int) -> memoryview:
        while self._end - self._start < n:
            self._more(n)
        out = self._view[self._start:self._start + n]
        self._start += n
        return out

    def _line(self) -> bytes:
        while (pos := self._buf.find(b"\r\n", self._start, self._end)) < 0:
            self._more(self._end - self._start + 1)
        line = bytes(self._view[self._start:pos])
        self._start = pos + 2
        return line

    def _more(self, needed: int) -> None:
        if self._start:
            size = self._end - self._start
            self._view[:size] = self._view[self._start:self._end]
            self._start, self._end = 0, size
        if needed > len(self._buf):
            self._grow(needed)
        self._end += self._recv(self._view[self._end:])

    def _grow(self, needed: int) -> None:
        bigger = bytearray(max(needed, 2 * len(self._buf)))
        bigger[:self._end] = self._view[:self._end]
        self._buf, self._view = bigger, memoryview(bigger)

    def _recv(self, into: memoryview) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("store call ran past its deadline")
        self._sock.settimeout(left)
        n = self._sock.recv_into(into)
        if n == 0:
            raise ConnectionError("connection closed by the server")
        return n
