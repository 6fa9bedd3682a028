"""The redis-server helpers in tests.support, which other packages' tests use too."""

from __future__ import annotations

import contextlib

import pytest

from tests.support.redis_server import RedisServer, ServerExitedEarly, start_redis


def test_a_taken_port_is_reported_not_mistaken_for_our_server(redis_server: RedisServer
                                                              ) -> None:
    with pytest.raises(ServerExitedEarly):
        start_redis(port=redis_server.port)


def test_restart_keeps_the_port_and_loses_the_data(redis_server: RedisServer) -> None:
    with contextlib.closing(redis_server.client()) as client:
        client.set("k", "v")
    old_pid = redis_server.pid
    redis_server.restart()
    assert redis_server.pid != old_pid
    with contextlib.closing(redis_server.client()) as client:
        assert client.get("k") is None


def test_stop_ends_the_process_and_removes_its_directory() -> None:
    server = start_redis(["--maxmemory", "10mb"])
    server.stop()
    assert server.process.returncode is not None
    assert not server.workdir.exists()
