"""A TCP fault proxy on 127.0.0.1 for fault tests: relays to an upstream port and, when told,
adds latency, cuts each connection after some reply bytes, or black-holes traffic.

It runs an asyncio loop on its own thread; the fault settings are plain attributes that a
test changes at any time and that apply to the bytes relayed from then on.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass


@dataclass
class Faults:
    """What the proxy does to relayed bytes now."""

    latency_s: float = 0.0  # delay before relaying each chunk, both directions
    cut_after_bytes: int | None = None  # close a connection after this many reply bytes
    blackhole: bool = False  # accept and read, relay nothing


class FaultProxy:
    """Listens on ``port`` (127.0.0.1) and relays to ``127.0.0.1:upstream_port``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.faults = Faults()
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer, reply=False),
                             self._pipe(up_reader, writer, reply=True), return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _pipe(self, source: asyncio.StreamReader, dest: asyncio.StreamWriter,
                    reply: bool) -> None:
        relayed = 0
        try:
            while chunk := await source.read(65536):
                if self.faults.blackhole:
                    continue
                if self.faults.latency_s:
                    await asyncio.sleep(self.faults.latency_s)
                limit = self.faults.cut_after_bytes if reply else None
                if limit is not None and relayed + len(chunk) >= limit:
                    dest.write(chunk[:max(0, limit - relayed)])
                    await dest.drain()
                    raise ConnectionResetError("cut by the fault proxy")
                dest.write(chunk)
                await dest.drain()
                relayed += len(chunk)
        finally:
            dest.close()

    def drop_connections(self) -> None:
        """Close every relayed connection now (both sides)."""
        def close_all() -> None:
            for w in list(self._writers):
                w.close()
        self._loop.call_soon_threadsafe(close_all)

    def close(self) -> None:
        def stop() -> None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            self._loop.stop()
        self._loop.call_soon_threadsafe(stop)
        self._thread.join(5)
