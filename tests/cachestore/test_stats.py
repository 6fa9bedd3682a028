from __future__ import annotations

import logging

import pytest

from cachestore.stats import CacheStats


def test_errors_are_counted_each_time_but_logged_once_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    stats = CacheStats(log_interval_s=60.0)
    with caplog.at_level(logging.WARNING, logger="kvrelay.cachestore"):
        for _ in range(100):
            stats.error("connection", "refused")
        stats.integrity("wrong_checksum", "kvrelay:v1:x:y")
    assert stats.errors("connection") == 100
    assert stats.integrity_failures("wrong_checksum") == 1
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "store error connection", "integrity failure wrong_checksum"]


def test_snapshot_is_a_copy() -> None:
    stats = CacheStats()
    stats.add("hits", 3)
    stats.add_seconds("get", 0.5)
    snapshot = stats.snapshot()
    stats.add("hits")
    assert snapshot == {"counts": {"hits": 3}, "seconds": {"get": 0.5}, "errors": {},
                        "integrity": {}}
