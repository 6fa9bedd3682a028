"""What a worker holds once warm: the model, its runner, the prefix cache and the
compute thread. Both workers build it the same way from their ``WorkerConfig``
(``start_runtime``).

Every torch computation of a worker runs on its one compute thread, loading the model
included. With GNU OpenMP (torch's CPU build), each thread that runs a parallel op gets
a team of worker threads of its own that lives as long as the process; once a process
has more such threads than cores, every team's workers stop spinning between parallel
regions and sleep after a few hundred spins, so each of the ~600 small parallel ops of a
decode step pays a wake-up. Loading on an event-loop helper thread and computing on
another one did exactly that: SmolLM2-135M decoded one sequence at 60-77 ms/token in the
worker against 30-33 ms/token with everything on one thread (2-core Xeon, torch 2.13).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from cachestore.codec import CODEC_VERSION, LAYOUT, BlockSpec
from cachestore.fingerprint import model_fingerprint
from cachestore.kvstore import PrefixCache
from cachestore.redis_store import RedisBlockStore
from cachestore.store import BlockStore, NullBlockStore
from engine.loader import LoadedModel, default_model_path, load_model
from engine.runner import ModelRunner
from kvrelay.serving.gate import ComputeGate, NoGate, open_gate
from kvrelay.serving.metrics import WorkerMetrics
from kvrelay.serving.worker_config import WorkerConfig

log = logging.getLogger("kvrelay.runtime")
T = TypeVar("T")


def kv_dtype_name(runner: ModelRunner) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(runner.dtype).removeprefix("torch.")


def block_spec(loaded: LoadedModel, runner: ModelRunner, wire_dtype: str = "native") -> BlockSpec:
    """The shape and fingerprint of this worker's KV blocks, whose payload is ``wire_dtype``
    ("native": the pool's dtype)."""
    cfg = loaded.config
    kv_dtype = kv_dtype_name(runner)
    wire = kv_dtype if wire_dtype == "native" else wire_dtype
    fingerprint = model_fingerprint(cfg.canonical_json(), loaded.weights_digest, kv_dtype,
                                    runner.block_size, LAYOUT, CODEC_VERSION, wire)
    return BlockSpec(fingerprint, wire, cfg.num_layers, runner.block_size,
                     cfg.num_kv_heads, cfg.head_dim)


def set_wire_dtype(runner: ModelRunner, spec: BlockSpec) -> None:
    """Make the runner's pool read and write blocks in the spec's payload dtype."""
    if runner.kv is not None:
        runner.kv.wire_dtype = getattr(torch, spec.kv_dtype)


def apply_thread_settings(config: WorkerConfig) -> None:
    """The process-wide thread settings of ``config``: the GIL switch interval, torch's threads."""
    sys.setswitchinterval(config.switch_interval_s)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)


def open_store(config: WorkerConfig) -> BlockStore:
    """The shared block store named by ``config.redis_url`` (a null store when empty)."""
    if not config.redis_url:
        log.warning("no redis_url: running without the shared prefix store")
        return NullBlockStore()
    return RedisBlockStore.from_url(config.redis_url, cluster=config.redis_cluster,
                                    timeout_s=config.store_timeout_s,
                                    ttl_s=config.block_ttl_s or None,
                                    tls_ca_file=config.redis_tls_ca_file or None,
                                    tls_cert_file=config.redis_tls_cert_file or None,
                                    tls_key_file=config.redis_tls_key_file or None)


class ComputeThread(Executor):
    """One daemon thread running submitted calls in order: the worker's compute thread.

    A daemon, unlike ``ThreadPoolExecutor``'s threads, so that a call that never returns
    (the decode batch loop) cannot hold the interpreter's exit.
    """

    def __init__(self, name: str = "compute") -> None:
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = \
            queue.SimpleQueue()
        self._closed = False
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError("the compute thread is shut down")
        future: Future[T] = Future()
        self._calls.put((future, lambda: fn(*args, **kwargs)))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop after the calls already queued (or cancel those not started yet)."""
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._calls.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._calls.put(None)
        if wait and threading.current_thread() is not self.thread:
            self.thread.join()

    def _work(self) -> None:
        while (item := self._calls.get()) is not None:
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on it
                future.set_exception(exc)


@dataclass
class Runtime:
    """A warm worker's model, runner and prefix cache, and the threads that use them."""

    loaded: LoadedModel
    runner: ModelRunner
    cache: PrefixCache
    compute: Executor
    """The worker's compute thread (``ComputeThread``), which loaded the model."""
    store_io: ThreadPoolExecutor
    metrics: WorkerMetrics
    gate: ComputeGate | NoGate = field(default_factory=NoGate)
    """Turns at the cores shared with other workers, taken around every forward pass
    (``kvrelay.serving.gate``; off unless ``compute_gate`` names a file)."""

    @property
    def spec(self) -> BlockSpec:
        return self.cache.spec

    async def on_store(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call on the store thread pool, timing it as ``op``."""
        started = time.monotonic()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.store_io, fn, *args)
        finally:
            self.metrics.store_call.labels(op).observe(time.monotonic() - started)

    def close(self) -> None:
        self.compute.shutdown(wait=False, cancel_futures=True)
        self.store_io.shutdown(wait=False, cancel_futures=True)
        self.cache.store.close()
        # The gate stays open: the compute thread may be inside a turn, and closing its
        # files then would wait for that pass; the process's exit releases the lock.


async def start_runtime(config: WorkerConfig, metrics: WorkerMetrics) -> Runtime:
    """``build_runtime`` on a new compute thread, which the runtime then keeps as its own."""
    compute = ComputeThread()
    try:
        return await asyncio.get_running_loop().run_in_executor(
            compute, build_runtime, config, metrics, compute)
    except BaseException:
        compute.shutdown(wait=False)
        raise


def build_runtime(config: WorkerConfig, metrics: WorkerMetrics,
                  compute: Executor | None = None) -> Runtime:
    """Load the model and connect the store (blocking). Run it on ``compute``, the thread
    that will run every later torch computation (module docstring); without one, a new
    ``ComputeThread`` is made (and then the model was loaded on another thread)."""
    started = time.monotonic()
    apply_thread_settings(config)
    loaded = load_model(config.model or default_model_path(), dtype=config.dtype,
                        device=config.device)
    runner = ModelRunner(loaded, num_blocks=config.num_blocks, block_size=config.block_size)
    store = open_store(config)
    spec = block_spec(loaded, runner, config.kv_wire_dtype)
    set_wire_dtype(runner, spec)
    cache = PrefixCache(store, spec, ttl_s=config.block_ttl_s or None)
    metrics.watch_store(store.stats.snapshot)
    metrics.kv_total.set(config.num_blocks)
    log.info("model loaded", extra={"model": loaded.name, "fingerprint": cache.spec.fingerprint,
                                    "seconds": round(time.monotonic() - started, 2)})
    gate = open_gate(config.compute_gate, config.compute_gate_wait_s,
                     metrics.gate_wait.inc, metrics.gate_bypasses.inc,
                     config.compute_gate_slice_s, metrics.gate_pauses.inc)
    if config.compute_gate and config.compute_gate_slice_s:  # else no call per layer at all
        runner.between_layers = gate.pause_point
    return Runtime(loaded, runner, cache, compute or ComputeThread(),
                   ThreadPoolExecutor(config.store_threads, thread_name_prefix="store"), metrics,
                   gate)
