"""RELIABILITY.md section G, load: a shared-prefix workload at sustained concurrency, with the
cache and without it (every request its own salt), printing its figures."""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor

from bench.chaos import process_usage
from kvrelay.serving.worker_config import WorkerConfig
from tests.reliability.conftest import BLOCK_SIZE, Reference, Spawned, generate, request

GROUPS, PER_GROUP, CONCURRENCY = 4, 6, 4
STORE_THREADS = WorkerConfig().store_threads  # the workers run with the default
SYSTEMS = [f"System prompt {g}: you are the help desk of library {g}. " * 40 for g in range(GROUPS)]
PROMPTS = [s + f"Question {q}: when do you open?" for s in SYSTEMS for q in range(PER_GROUP)]


def _round(decode: Spawned, salts: list[str]) -> list:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(lambda ps: generate(decode, request(*ps)), zip(PROMPTS, salts)))


def test_shared_prefixes_hit_the_cache_and_cut_ttft_with_flat_resources(
        shared_pair: tuple[Spawned, Spawned], reference: Reference) -> None:
    _, decode = shared_pair
    ids = [reference.tokenizer.encode(p) for p in PROMPTS]
    expected = [reference.greedy(i, 8) for i in ids]
    _round(decode, [f"warm-up-{i}" for i in range(len(PROMPTS))])
    before = process_usage(decode.process.pid)
    cold = _round(decode, [f"alone-{i}" for i in range(len(PROMPTS))])
    _round(decode, ["shared"] * len(PROMPTS))  # fills the store, one group at a time
    warm = _round(decode, ["shared"] * len(PROMPTS))
    after = process_usage(decode.process.pid)

    assert [list(r.token_ids) for r in cold + warm] == expected * 2
    shared_tokens = [len(i) // BLOCK_SIZE * BLOCK_SIZE for i in ids]
    hit_rate = sum(r.usage.cached_prompt_tokens for r in warm) / sum(shared_tokens)
    ttft_cold = statistics.median(r.timings.time_to_first_token_ms for r in cold)
    ttft_warm = statistics.median(r.timings.time_to_first_token_ms for r in warm)
    print(f"\nload: {len(PROMPTS)} requests x 2 at concurrency {CONCURRENCY}, "
          f"{statistics.mean(map(len, ids)):.0f} prompt tokens; hit rate {hit_rate:.2f}; "
          f"TTFT median {ttft_cold:.1f} ms without cache, {ttft_warm:.1f} ms with; "
          f"decode fds {before['fds']} -> {after['fds']}, "
          f"RSS {before['rss_kib'] / 1024:.1f} -> {after['rss_kib'] / 1024:.1f} MiB")
    assert hit_rate == 1.0
    assert all(r.usage.cached_prompt_tokens == 0 for r in cold)
    assert ttft_warm < 0.7 * ttft_cold
    # the store's connection pool may still grow to one connection per store thread (how
    # many calls overlapped in the warm-up is timing); a leak would grow with the requests
    assert after["fds"] <= before["fds"] + STORE_THREADS + 2
    assert after["rss_kib"] < before["rss_kib"] + 64 * 1024
