from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from cachestore import resp
from cachestore.arena import Arena
from cachestore.resp import (
    ReplyError,
    ReplyReader,
    TooLarge,
    _small_ones_joined,
    pack_command,
    pack_set,
    send_buffers,
)
from tests.support.timing import Stopwatch


def _joined(buffers: list) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def test_pack_command() -> None:
    assert pack_command(b"GET", b"k1") == b"*2\r\n$3\r\nGET\r\n$2\r\nk1\r\n"


def test_pack_set_frames_parts_without_copying_large_ones() -> None:
    big = bytearray(b"x" * 100_000)
    buffers = pack_set(b"key", [b"head", big], 60)
    assert _joined(buffers) == (b"*6\r\n$3\r\nSET\r\n$3\r\nkey\r\n$100004\r\nhead" + bytes(big)
                                + b"\r\n$2\r\nNX\r\n$2\r\nEX\r\n$2\r\n60\r\n")
    assert any(isinstance(b, memoryview) and b.obj is big for b in buffers)


def test_pack_set_without_ttl() -> None:
    assert _joined(pack_set(b"k", [b"v"], None)) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$2\r\nNX\r\n")


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    return a, b


def test_send_buffers_delivers_every_byte_in_order() -> None:
    a, b = _pair()
    parts: list[bytes | memoryview] = [b"abc", memoryview(bytearray(b"z" * 3_000_000)), b"",
                                       b"end"] * 3
    received = bytearray()

    def drain() -> None:
        while len(received) < sum(len(p) for p in parts):
            received.extend(b.recv(1 << 20))

    reader = threading.Thread(target=drain)
    reader.start()
    send_buffers(a, parts)
    reader.join(timeout=10)
    assert bytes(received) == _joined(parts)
    a.close()
    b.close()


class _SlowSocket:
    """Takes at most ``chunk`` bytes per sendmsg, like a socket whose buffer drains slowly."""

    def __init__(self, chunk: int, events: list[str]) -> None:
        self.chunk, self.events, self.data = chunk, events, bytearray()

    def sendmsg(self, buffers: list[memoryview]) -> int:
        taken = 0
        for buf in buffers:
            part = bytes(buf[:self.chunk - taken])
            self.data += part
            taken += len(part)
            if taken == self.chunk:
                break
        self.events.append("send")
        return taken


def test_send_buffers_makes_buffers_as_the_socket_takes_them(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setattr(resp, "_SEND_AHEAD", 3000)
    events: list[str] = []
    values = [bytes([i]) * 1000 for i in range(12)]

    def made() -> Iterator[bytes]:  # values encoded on demand, as publish does
        for value in values:
            events.append("make")
            yield value

    sock = _SlowSocket(1000, events)
    send_buffers(sock, made())  # type: ignore[arg-type]
    assert bytes(sock.data) == b"".join(values)
    # never more than ~3000 bytes made ahead of what was sent: makes and sends interleave
    assert events[:4] == ["make"] * 3 + ["send"] and events.count("make") == 12
    made_ahead = 0
    for event in events:
        made_ahead += 1000 if event == "make" else -1000
        assert made_ahead <= 3000


def test_reader_parses_resp2_and_resp3_replies_into_the_arena() -> None:
    a, b = _pair()
    big = b"v" * 70_000
    a.sendall(b"+OK\r\n:1\r\n$-1\r\n_\r\n-NOPERM no rights\r\n$3\r\nabc\r\n"
              b"$%d\r\n%s\r\n!5\r\nERR x\r\n" % (len(big), big))
    reader = ReplyReader(b, time.monotonic() + 5)
    arena = Arena(1 << 20)
    replies = [reader.read(arena) for _ in range(8)]
    assert replies[:4] == [b"OK", 1, None, None]
    assert isinstance(replies[4], ReplyError) and replies[4].kind == "noperm"
    assert replies[5] == b"abc"
    assert isinstance(replies[6], memoryview) and replies[6].obj is arena._buffer
    assert bytes(replies[6]) == big
    assert isinstance(replies[7], ReplyError) and replies[7].message == "ERR x"
    a.close()
    b.close()


def test_reader_drops_an_oversized_bulk_without_buffering_it() -> None:
    a, b = _pair()
    huge = b"h" * 300_000

    def send() -> None:
        a.sendall(b"$%d\r\n%s\r\n$2\r\nok\r\n" % (len(huge), huge))

    sender = threading.Thread(target=send)
    sender.start()
    reader = ReplyReader(b, time.monotonic() + 5, max_bulk=1000)
    arena = Arena()
    too_large = reader.read(arena)
    assert isinstance(too_large, TooLarge) and too_large.nbytes == len(huge)
    assert arena.capacity == 0 and len(reader._buf) <= 64 * 1024
    assert reader.read(arena) == b"ok"
    sender.join(timeout=5)
    a.close()
    b.close()


def test_reader_gives_up_at_its_deadline() -> None:
    a, b = _pair()
    a.sendall(b"$10\r\nabc")
    reader = ReplyReader(b, time.monotonic() + 0.2)
    watch = Stopwatch()
    with pytest.raises(TimeoutError):
        reader.read()
    assert watch.within(1.0), watch
    a.close()
    b.close()


def test_reader_reports_a_closed_connection() -> None:
    a, b = _pair()
    a.sendall(b"$10\r\nabc")
    a.close()
    with pytest.raises(ConnectionError):
        ReplyReader(b, time.monotonic() + 5).read()
    b.close()


def test_arena_recycles_and_grows() -> None:
    arena = Arena(8)
    first = arena.take(6)
    overflow = arena.take(6)
    assert first.obj is not overflow.obj
    arena.reset()
    assert arena.capacity == 12
    assert arena.take(12).obj is arena.take(0).obj


def test_small_buffers_are_joined_for_tls_and_large_ones_kept() -> None:
    big = bytearray(b"b" * 100_000)
    out = list(_small_ones_joined([b"a", b"b", memoryview(big), b"c"]))
    assert [bytes(o) for o in out] == [b"ab", bytes(big), b"c"]
    assert isinstance(out[1], memoryview) and out[1].obj is big
