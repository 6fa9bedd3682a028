"""A worker's process-wide thread settings: the GIL switch interval and torch's threads."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch

from kvrelay.serving.runtime import apply_thread_settings
from kvrelay.serving.worker_config import WorkerConfig


@pytest.fixture
def restored() -> Iterator[None]:
    interval, threads = sys.getswitchinterval(), torch.get_num_threads()
    yield
    sys.setswitchinterval(interval)
    torch.set_num_threads(threads)


def test_a_worker_shortens_the_switch_interval_by_default(restored: None) -> None:
    apply_thread_settings(WorkerConfig())
    assert sys.getswitchinterval() == pytest.approx(WorkerConfig().switch_interval_s)
    assert WorkerConfig().switch_interval_s < 0.005  # Python's own default


def test_torch_threads_are_set_only_when_asked(restored: None) -> None:
    before = torch.get_num_threads()
    apply_thread_settings(WorkerConfig(switch_interval_s=0.001))
    assert sys.getswitchinterval() == pytest.approx(0.001)
    assert torch.get_num_threads() == before
    apply_thread_settings(WorkerConfig(torch_threads=1))
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("field", [{"switch_interval_s": 0.0}, {"torch_threads": -1}])
def test_thread_settings_out_of_range_are_refused(field: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="switch_interval_s|torch_threads"):
        WorkerConfig(**field)  # type: ignore[arg-type]


def test_the_compute_thread_runs_calls_in_order_on_one_daemon_thread() -> None:
    import threading

    from kvrelay.serving.runtime import ComputeThread

    compute = ComputeThread("compute-test")
    seen: list[tuple[int, str]] = []
    futures = [compute.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
               for i in range(5)]
    failing = compute.submit(lambda: 1 / 0)
    for f in futures:
        f.result(timeout=5)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=5)
    assert seen == [(i, "compute-test") for i in range(5)]
    assert compute.thread.daemon
    gate, started = threading.Event(), threading.Event()
    def block() -> bool:
        started.set()
        return gate.wait()

    blocker = compute.submit(block)
    assert started.wait(5)
    pending = compute.submit(lambda: "never")
    compute.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert blocker.result(timeout=5) is True
    assert pending.cancelled()
    compute.thread.join(timeout=5)
    assert not compute.thread.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        compute.submit(lambda: None)


def test_the_model_loads_and_the_decode_batch_runs_on_the_runtime_compute_thread(
        tiny_model_dir, monkeypatch: pytest.MonkeyPatch, restored: None) -> None:  # type: ignore[no-untyped-def]
    """One thread for all torch work: a second OpenMP team halves decode speed (runtime.py)."""
    import asyncio
    import threading

    from decode_service.config import DecodeConfig
    from decode_service.server import build_worker
    from kvrelay.serving import runtime as runtime_module
    from kvrelay.serving.metrics import WorkerMetrics

    loaded_on: list[threading.Thread] = []
    real_load = runtime_module.load_model

    def recording_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        loaded_on.append(threading.current_thread())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(runtime_module, "load_model", recording_load)
    config = DecodeConfig(model=str(tiny_model_dir), redis_url="", num_blocks=64)

    async def main() -> tuple[threading.Thread, threading.Thread]:
        rt = await runtime_module.start_runtime(config, WorkerMetrics())
        worker = build_worker(config, rt)
        batch_thread = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def report() -> None:
            loop.call_soon_threadsafe(batch_thread.set_result, threading.current_thread())

        worker.scheduler._inbox.put(report)
        try:
            return rt.compute.thread, await asyncio.wait_for(batch_thread, 10)  # type: ignore[attr-defined]
        finally:
            await worker.close()

    compute, batch = asyncio.run(main())
    assert loaded_on == [compute] and batch is compute
