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
