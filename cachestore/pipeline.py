"""One pipelined exchange over one connection per node, replies handed over in key order.

Every node's commands are written first (so all nodes work at once), then the replies
are read in the callers' key order, each from the connection of the node that owns the
key: a reply is handed to ``on_reply`` as soon as it has arrived, while later replies are
still on the wire. When ``on_reply`` returns False the rest is read and dropped, leaving
every connection clean for reuse. Any exception leaves the connections disconnected.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from cachestore.arena import Arena, LandingArena
from cachestore.resp import Reply, ReplyReader, send_buffers

if TYPE_CHECKING:
    from typing_extensions import Buffer

OnReply = Callable[[int, Reply], bool]
"""Receives ``(command index, reply)``; returns False to stop receiving replies."""

Route = list[tuple[Any, list[int]]]
"""(redis-py connection pool, indices of the commands for that node) per node."""


def run_pipeline(route: Route, commands: Sequence[Sequence[Buffer]], on_reply: OnReply,
                 arena: Arena | LandingArena | None, deadline: float, socket_timeout: float,
                 max_bulk: int | None = None) -> None:
    """Send ``commands`` over the pools in ``route`` and hand over replies in order
    (bulk replies over ``max_bulk`` bytes arrive as ``TooLarge``)."""
    leased: list[tuple[Any, Any]] = []
    try:
        readers = []
        for pool, indices in route:
            conn = pool.get_connection()
            leased.append((pool, conn))
            sock = conn._sock  # redis-py has connected and authenticated it
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            send_buffers(sock, itertools.chain.from_iterable(commands[i] for i in indices))
            readers.append(ReplyReader(sock, deadline, max_bulk))
        _read_in_order(route, readers, len(commands), on_reply, arena)
        for _, conn in leased:
            conn._sock.settimeout(socket_timeout)
    except BaseException:
        for _, conn in leased:
            conn.disconnect()  # the stream is in an unknown state
        raise
    finally:
        for pool, conn in leased:
            pool.release(conn)


def _read_in_order(route: Route, readers: list[ReplyReader], count: int, on_reply: OnReply,
                   arena: Arena | LandingArena | None) -> None:
    node_of = [0] * count
    for node, (_, indices) in enumerate(route):
        for index in indices:
            node_of[index] = node
    wanted = True
    scratch = Arena()
    for index in range(count):
        if wanted:
            wanted = on_reply(index, readers[node_of[index]].read(arena))
        else:
            readers[node_of[index]].read(scratch)
            scratch.reset()
