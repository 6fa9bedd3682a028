"""Run a decode worker: load the model, start the batch thread, serve ``kvrelay.v1.Generation``."""

from __future__ import annotations

import asyncio
import logging

import grpc

from decode_service.config import DecodeConfig
from decode_service.prefill_client import PrefillClient
from decode_service.requests import GenerationRequest
from decode_service.servicer import GenerationServicer
from decode_service.worker import DecodeWorker
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from kvrelay.serving.auth import auth_interceptor, read_token
from kvrelay.serving.lifecycle import Lifecycle
from kvrelay.serving.metrics import WorkerMetrics
from kvrelay.serving.runtime import Runtime, start_runtime
from kvrelay.serving.server import build_server, serve
from kvrelay.serving.tls import channel_credentials
from protos.kvrelay.v1 import generation_pb2, generation_pb2_grpc

log = logging.getLogger("kvrelay.decode")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


def build_worker(config: DecodeConfig, runtime: Runtime) -> DecodeWorker:
    """The worker and its batch loop, started on the runtime's compute thread."""
    runtime.runner.allocator.retain_named = config.local_prefix_cache
    engine = LLMEngine(runtime.runner, runtime.loaded.tokenizer,
                       max_batch_size=config.max_batch_size,
                       prefill_chunk_tokens=config.prefill_chunk_tokens)
    prefill = None
    if config.prefill_addr:
        credentials = channel_credentials(config.prefill_tls_ca_file, config.prefill_tls_cert_file,
                                          config.prefill_tls_key_file) \
            if config.prefill_tls_ca_file else None
        api_key = read_token(config.prefill_api_key_file) if config.prefill_api_key_file else ""
        prefill = PrefillClient(config.prefill_addr, config.max_message_bytes, credentials, api_key)
    worker = DecodeWorker(runtime, config, engine, prefill)
    worker.scheduler.start(asyncio.get_running_loop(), runtime.compute)
    return worker


async def warm(worker: DecodeWorker) -> None:
    """One short generation through the batch thread, so the first request pays no warm-up."""
    request = GenerationRequest(request_id="warm-up", input_field="token_ids",
                                params=SamplingParams(max_new_tokens=2), token_ids=(1, 2, 3))
    await worker.generate(request, None)


async def run(config: DecodeConfig) -> None:
    """Serve until SIGTERM/SIGINT, then drain within ``config.drain_grace_s``."""
    metrics = WorkerMetrics()
    metrics.serve(config.host, config.metrics_port)
    lifecycle = Lifecycle([SERVICE_NAME])
    servicer = GenerationServicer()

    def register(server: grpc.aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)

    auth = auth_interceptor(config.api_keys_file, config.max_streams_per_tenant)
    server = build_server(lifecycle, [SERVICE_NAME], config.max_message_bytes, register, auth)

    async def warm_up() -> None:
        runtime = await start_runtime(config, metrics)
        servicer.worker = build_worker(config, runtime)
        await warm(servicer.worker)

    async def on_stop() -> None:
        if servicer.worker is not None:
            await servicer.worker.close()

    await serve(server, lifecycle, config, warm_up, on_stop)
