"""The prefill worker's settings (``kvrelay prefill --help`` lists them)."""

from __future__ import annotations

from dataclasses import dataclass

from kvrelay.serving.settings import setting
from kvrelay.serving.worker_config import WorkerConfig


@dataclass(frozen=True)
class PrefillConfig(WorkerConfig):
    """A prefill worker: computes prompt K/V and publishes it to the store."""

    port: int = setting(50052, "gRPC port")
    metrics_port: int = setting(9400, "Prometheus /metrics HTTP port (0: no metrics server)")
    fault_exit_after_blocks: int = setting(
        0, "fault injection for tests: publish only this many blocks of the first call that "
           "computes more, then exit at once (0: off)")
