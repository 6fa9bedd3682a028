"""Prometheus metrics of one worker, on their own registry, served over HTTP.

Latencies are histograms observed by the services; the store's own counters (bytes,
seconds, errors by kind, integrity failures by reason: ``cachestore.stats.CacheStats``)
are read at scrape time by ``StoreStatsCollector``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class StoreStatsCollector(Collector):
    """Exports a ``CacheStats`` snapshot: bytes, seconds, errors and integrity failures."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[CounterMetricFamily]:
        snap = self._snapshot()
        families = [
            ("kvrelay_store_bytes", "bytes moved to/from the store", "op",
             {"get": snap["counts"].get("bytes_read", 0),
              "put": snap["counts"].get("bytes_written", 0)}),
            ("kvrelay_store_seconds", "seconds spent in store calls", "op", snap["seconds"]),
            ("kvrelay_store_errors", "store errors (each a miss or a dropped write)", "kind",
             snap["errors"]),
            ("kvrelay_store_integrity_failures", "stored values that failed verification",
             "reason", snap["integrity"]),
        ]
        for name, doc, label, values in families:
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            yield family


class WorkerMetrics:
    """Every metric a kvrelay worker exports (unused ones simply stay at zero)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("kvrelay_time_to_first_token_seconds", "arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("kvrelay_inter_token_latency_seconds",
                                     "time between consecutive tokens of a request",
                                     buckets=_TOKEN_BUCKETS, registry=r)
        self.request_latency = Histogram("kvrelay_request_latency_seconds", "whole request",
                                         ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queried_tokens = Counter("kvrelay_prefix_cache_queried_tokens",
                                      "prompt tokens looked up in the prefix cache", registry=r)
        self.hit_tokens = Counter("kvrelay_prefix_cache_hit_tokens",
                                  "prompt tokens found in the prefix cache", registry=r)
        self.pool_shared_tokens = Counter(
            "kvrelay_kv_pool_shared_tokens",
            "prompt tokens whose blocks the KV pool already held, for a running request or "
            "kept from a finished one (shared, not fetched; counted in the hits too)", registry=r)
        self.store_call = Histogram("kvrelay_store_call_seconds", "one batched store call",
                                    ["op"], buckets=_LATENCY_BUCKETS, registry=r)
        self.fallbacks = Counter("kvrelay_local_prefill_fallbacks",
                                 "prompts prefilled locally because the prefill worker failed",
                                 ["reason"], registry=r)
        self.computed_tokens = Counter("kvrelay_prefill_computed_tokens",
                                       "prompt tokens whose K/V this worker computed", registry=r)
        self.published_blocks = Counter("kvrelay_published_blocks",
                                        "blocks this worker wrote to the store", registry=r)
        self.gate_wait = Counter("kvrelay_compute_gate_wait_seconds",
                                 "seconds forward passes waited for the compute gate "
                                 "(another worker on these cores was computing)", registry=r)
        self.gate_bypasses = Counter("kvrelay_compute_gate_bypasses",
                                     "waits for the compute gate given up (it was held too "
                                     "long): passes ran without it", registry=r)
        self.gate_pauses = Counter("kvrelay_compute_gate_pauses",
                                   "long forward passes that let another worker compute "
                                   "between two of their layers", registry=r)
        self.running = Gauge("kvrelay_running_requests", "requests in the running batch", registry=r)
        self.waiting = Gauge("kvrelay_waiting_requests", "requests admitted, not yet running",
                             registry=r)
        self.kv_used = Gauge("kvrelay_kv_pool_used_blocks", "KV blocks in use", registry=r)
        self.kv_total = Gauge("kvrelay_kv_pool_blocks", "KV blocks in the pool", registry=r)
        self.kv_kept = Gauge("kvrelay_kv_pool_kept_blocks", "free KV blocks still holding a "
                             "finished prompt's prefix (the local prefix cache)", registry=r)

    def watch_store(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Export the store's counters from ``snapshot`` at every scrape."""
        self.registry.register(StoreStatsCollector(snapshot))

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread (port 0: don't)."""
        if port:
            start_http_server(port, addr=host, registry=self.registry)
