"""Which redis-py connection pool serves which key: one server, or a cluster's masters."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.cluster import ClusterNode, RedisCluster

from cachestore.pipeline import Route

if TYPE_CHECKING:
    from cachestore.redis_store import StoreConfig


class StandaloneRouter:
    """One server: one blocking pool, every key in one pipeline."""

    def __init__(self, config: StoreConfig) -> None:
        self._pool = redis.BlockingConnectionPool.from_url(
            config.url, max_connections=config.max_connections, timeout=config.timeout_s,
            **config.redis_kwargs())

    def route(self, keys: Sequence[bytes]) -> Route:
        return [(self._pool, list(range(len(keys))))]

    def reset(self) -> None:
        """After a failure: drop idle connections (new ones are made on demand)."""
        self._pool.disconnect(inuse_connections=False)

    def close(self) -> None:
        self._pool.disconnect()


class ClusterRouter:
    """A Redis Cluster: keys grouped by the master that owns their slot."""

    def __init__(self, config: StoreConfig) -> None:
        self._config = config
        self._client: RedisCluster | None = None
        self._known: list[ClusterNode] = []  # every master seen, to rediscover from
        self._lock = threading.Lock()

    def _cluster(self) -> RedisCluster:
        with self._lock:
            if self._client is None:
                self._client = RedisCluster.from_url(
                    self._config.url, startup_nodes=list(self._known),
                    **self._config.redis_kwargs())
                self._known = [ClusterNode(n.host, n.port) for n in self._client.get_nodes()]
            return self._client

    def route(self, keys: Sequence[bytes]) -> Route:
        client = self._cluster()
        groups: dict[str, tuple[Any, list[int]]] = {}
        for index, key in enumerate(keys):
            node = client.get_node_from_key(key)
            pool = client.get_redis_connection(node).connection_pool
            groups.setdefault(node.name, (pool, []))[1].append(index)
        return list(groups.values())

    def reset(self) -> None:
        """After a failure or a MOVED reply: forget the slot map; the next call rebuilds it
        from every master seen so far."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def close(self) -> None:
        self.reset()
