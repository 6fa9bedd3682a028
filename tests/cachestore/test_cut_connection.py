"""A connection cut in the middle of a value: the partial value is never loaded."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from cachestore.codec import BlockSpec
from cachestore.kvstore import PrefixCache
from cachestore.redis_store import RedisBlockStore
from tests.cachestore.conftest import Collect, make_payloads
from tests.support.redis_server import RedisServer


class CuttingProxy:
    """Relays one TCP connection to Redis and cuts it after ``limit`` reply bytes."""

    def __init__(self, upstream_port: int, limit: int) -> None:
        self.limit = limit
        self._upstream = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        client, _ = self._listener.accept()
        server = socket.create_connection(("127.0.0.1", self._upstream))
        threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
        self._pipe(server, client, self.limit)
        for sock in (client, server):
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @staticmethod
    def _pipe(source: socket.socket, dest: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while limit is None or sent < limit:
                chunk = source.recv(65536 if limit is None else min(65536, limit - sent))
                if not chunk:
                    return
                dest.sendall(chunk)
                sent += len(chunk)
        except OSError:
            return

    def close(self) -> None:
        self._listener.close()
        self._thread.join(timeout=5)


@pytest.fixture
def published(redis_server: RedisServer, spec: BlockSpec) -> Iterator[list]:
    cache = PrefixCache(RedisBlockStore.from_url(redis_server.url()), spec)
    hashes = cache.block_hashes(list(range(16)))
    cache.publish(hashes, list(make_payloads(spec, len(hashes))))
    cache.store.close()
    yield hashes


def test_value_cut_midway_is_never_handed_to_the_sink(redis_server: RedisServer,
                                                      spec: BlockSpec, published: list) -> None:
    handshake_bytes = 64  # more than redis-py's connection handshake replies
    # the first GET reply arrives whole, the second is cut 300-odd bytes in
    proxy = CuttingProxy(redis_server.port, handshake_bytes + spec.value_nbytes + 300)
    try:
        cache = PrefixCache(RedisBlockStore.from_url(f"redis://127.0.0.1:{proxy.port}/0"),
                            spec)
        sink = Collect()
        assert cache.fetch_prefix(published, sink) == 1
        assert [index for index, _ in sink.blocks] == [0]
        assert cache.stats.errors("connection") == 1
        assert cache.stats.snapshot()["integrity"] == {}
    finally:
        proxy.close()
