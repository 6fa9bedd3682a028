"""Run a prefill worker: load the model, serve ``kvrelay.v1.Prefill`` until SIGTERM."""

from __future__ import annotations

import logging

import grpc

from kvrelay.serving.auth import auth_interceptor
from kvrelay.serving.lifecycle import Lifecycle
from kvrelay.serving.metrics import WorkerMetrics
from kvrelay.serving.runtime import start_runtime
from kvrelay.serving.server import build_server, serve
from prefill_service.config import PrefillConfig
from prefill_service.servicer import PrefillServicer
from prefill_service.worker import PrefillWorker
from protos.kvrelay.v1 import prefill_pb2, prefill_pb2_grpc

log = logging.getLogger("kvrelay.prefill")
SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name


async def run(config: PrefillConfig) -> None:
    """Serve until SIGTERM/SIGINT, then drain within ``config.drain_grace_s``."""
    metrics = WorkerMetrics()
    metrics.serve(config.host, config.metrics_port)
    lifecycle = Lifecycle([SERVICE_NAME])
    servicer = PrefillServicer()

    def register(server: grpc.aio.Server) -> None:
        prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, server)

    server = build_server(lifecycle, [SERVICE_NAME], config.max_message_bytes, register,
                          auth_interceptor(config.api_keys_file))

    async def warm_up() -> None:
        runtime = await start_runtime(config, metrics)
        servicer.worker = PrefillWorker(runtime, config.max_requests,
                                        config.fault_exit_after_blocks)
        await servicer.worker.warm()

    async def on_stop() -> None:
        if servicer.worker is not None:
            servicer.worker.runtime.close()

    await serve(server, lifecycle, config, warm_up, on_stop)
