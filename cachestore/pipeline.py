"""One pipelined exchange over one connection per node, replies handed over in key order.

Every node's commands are written first (so all nodes work at once), then the replies
are read in the callers' key order, each from the connection of the node that owns the
key: a reply is handed to ``on_reply`` as soon as it has arrived, while later replies are
still on the wire. When ``on_reply`` returns False the rest is read and dropped, leaving
every connection clean for reuse. Any exception leaves the connections disconnected.

With ``ahead``, at most that many commands are on the wire at once: the first ``ahead``
are written, and each time half of them have been answered the next half goes out, so a
node always has work queued and never more than ``ahead`` replies built. Redis builds a
whole batch of GET replies (a copy of every value) before it writes the first byte, so a
32 MB batch sent at once first has the server copy 32 MB through memory that no longer
fits the caches, while the client waits; with a few MB in flight the copies stay in
cache and overlap the client's reading. ``RedisBlockStore`` sets ``ahead`` for block
fetches (``FETCH_AHEAD_BYTES`` gives the figures).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from cachestore.arena import Arena, LandingArena
from cachestore.resp import Reply, ReplyReader, send_buffers

if TYPE_CHECKING:
    from typing_extensions import Buffer

OnReply = Callable[[int, Reply], bool]
"""Receives ``(command index, reply)``; returns False to stop receiving replies."""

Route = list[tuple[Any, list[int]]]
"""(redis-py connection pool, indices of the commands for that node) per node."""


def run_pipeline(route: Route, commands: Sequence[Iterable[Buffer]], on_reply: OnReply,
                 arena: Arena | LandingArena | None, deadline: float, socket_timeout: float,
                 max_bulk: int | None = None, ahead: int | None = None) -> None:
    """Send ``commands`` over the pools in ``route`` and hand over replies in order
    (bulk replies over ``max_bulk`` bytes arrive as ``TooLarge``); with ``ahead``, at
    most that many commands are unanswered at a time. Each command's buffers are iterated
    once, only as it is sent (a generator may make them then)."""
    leased: list[tuple[Any, Any]] = []
    try:
        readers = []
        for pool, _ in route:
            conn = pool.get_connection()
            leased.append((pool, conn))
            sock = conn._sock  # redis-py has connected and authenticated it
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            readers.append(ReplyReader(sock, deadline, max_bulk))
        sender = _Sender(route, [conn._sock for _, conn in leased], commands)
        _read_in_order(route, readers, len(commands), on_reply, arena, sender,
                       len(commands) if ahead is None else max(2, ahead))
        for _, conn in leased:
            conn._sock.settimeout(socket_timeout)
    except BaseException:
        for _, conn in leased:
            conn.disconnect()  # the stream is in an unknown state
        raise
    finally:
        for pool, conn in leased:
            pool.release(conn)


class _Sender:
    """Writes the commands of ``route`` up to a command index, each node's in its order."""

    def __init__(self, route: Route, socks: list[Any], commands: Sequence[Iterable[Buffer]]
                 ) -> None:
        self._route, self._socks, self._commands = route, socks, commands
        self._next = [0] * len(route)  # per node: position in its indices of the next to send
        self.sent = 0  # every command below this index has been written

    def send_below(self, end: int) -> None:
        for node, (_, indices) in enumerate(self._route):
            start = stop = self._next[node]
            while stop < len(indices) and indices[stop] < end:
                stop += 1
            if stop > start:
                send_buffers(self._socks[node], itertools.chain.from_iterable(
                    self._commands[i] for i in indices[start:stop]))
                self._next[node] = stop
        self.sent = max(self.sent, end)


def _read_in_order(route: Route, readers: list[ReplyReader], count: int, on_reply: OnReply,
                   arena: Arena | LandingArena | None, sender: _Sender, ahead: int) -> None:
    node_of = [0] * count
    for node, (_, indices) in enumerate(route):
        for index in indices:
            node_of[index] = node
    wanted = True
    scratch = Arena()
    sender.send_below(min(count, ahead))
    for index in range(count):
        if index >= sender.sent:
            break  # stopped: nothing later was sent, so nothing later is to be read
        if wanted and sender.sent < count and sender.sent - index <= ahead // 2:
            sender.send_below(min(count, index + ahead))
        if wanted:
            wanted = on_reply(index, readers[node_of[index]].read(arena))
        else:
            readers[node_of[index]].read(scratch)
            scratch.reset()
