"""``bench.cachestore`` runs end to end on a small workload and reports every client.

No timing is asserted: the figures are the benchmark's output, not a test's. What is checked
is that each client really moves the bytes (the store holds every block afterwards), that
the two redis-py references are the configurations they claim to be, and that every figure
the JSON promises is there.
"""

from __future__ import annotations

import contextlib

import pytest
from redis.connection import HiredisRespSerializer, PythonRespSerializer

from bench import cachestore as bench
from tests.support.redis_server import RedisServer


def test_redis_py_references_use_the_packers_they_name(redis_server: RedisServer) -> None:
    pytest.importorskip("hiredis")
    for hiredis, packer in ((True, HiredisRespSerializer), (False, PythonRespSerializer)):
        client = bench.redis_py_client(redis_server.port, hiredis=hiredis)
        with contextlib.closing(client):
            assert client.ping()
            conn = client.connection_pool.get_connection()
            try:
                assert isinstance(conn._command_packer, packer)
            finally:
                client.connection_pool.release(conn)


def test_measure_reports_every_client_on_a_small_workload(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("hiredis")
    monkeypatch.setattr(bench, "TOKENS", 64)
    monkeypatch.setattr(bench, "SMOLLM2_135M", {"num_layers": 2, "num_kv_heads": 1, "head_dim": 8})
    work = bench.make_workload(redis_server.url(), "bfloat16", 16)
    try:
        rows = bench.measure(work, redis_server, repeat=1)
    finally:
        work.cache.store.close()
    assert [r["op"] for r in rows] == ["put", "get"]
    for row in rows:
        assert row["blocks"] == 4 and row["payload_bytes"] == work.payload_bytes
        for client in bench.CLIENTS:
            assert float(row[f"{client}_mb_s"]) > 0  # type: ignore[arg-type]
        assert {"kvrelay_vs_redis_py", "kvrelay_vs_redis_py_pure"} <= row.keys()
    assert "r-py pure" in bench._table(rows)
