"""Build a grpc.aio server with kvrelay's interceptors, health and reflection, and run it
until SIGTERM or SIGINT, then drain.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvrelay.serving.errors import ErrorInterceptor
from kvrelay.serving.lifecycle import Lifecycle, LifecycleInterceptor
from kvrelay.serving.tls import server_credentials
from kvrelay.serving.worker_config import WorkerConfig

log = logging.getLogger("kvrelay.server")


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Explicit gRPC limits on received and sent message sizes (no KV ever crosses gRPC)."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def build_server(lifecycle: Lifecycle, service_names: list[str], max_message_bytes: int,
                 register: Callable[[grpc.aio.Server], None],
                 auth: grpc.aio.ServerInterceptor | None = None) -> grpc.aio.Server:
    """A server whose services are added by ``register``, plus health and reflection;
    ``auth`` (API keys) runs first when given."""
    gates = [auth] if auth else []
    server = grpc.aio.server(
        interceptors=[*gates, LifecycleInterceptor(lifecycle), ErrorInterceptor()],
        options=message_size_options(max_message_bytes))
    register(server)
    health_pb2_grpc.add_HealthServicer_to_server(lifecycle.health, server)
    reflection.enable_server_reflection(
        [*service_names, "grpc.health.v1.Health", reflection.SERVICE_NAME], server)
    return server


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def listen(server: grpc.aio.Server, config: WorkerConfig) -> None:
    """Bind ``config.address``, over TLS when a certificate is configured."""
    if config.tls:
        port = server.add_secure_port(config.address, server_credentials(
            config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file))
    else:
        port = server.add_insecure_port(config.address)
    if not port:
        raise OSError(f"cannot listen on {config.address}")


async def serve(server: grpc.aio.Server, lifecycle: Lifecycle, config: WorkerConfig,
                warm_up: Callable[[], Awaitable[None]],
                on_stop: Callable[[], Awaitable[None]]) -> None:
    """Listen (NOT_SERVING), warm up, serve; on SIGTERM/SIGINT drain and stop."""
    stop = _stop_event()
    address, grace_s = config.address, config.drain_grace_s
    listen(server, config)
    await lifecycle.loading()
    await server.start()
    log.info("listening", extra={"address": address, "tls": config.tls})
    await warm_up()
    await lifecycle.serving()
    log.info("serving", extra={"address": address})
    await stop.wait()
    log.info("draining", extra={"in_flight": lifecycle.in_flight, "grace_s": grace_s})
    await lifecycle.drain(grace_s)
    await server.stop(1.0)
    await on_stop()
    log.info("stopped")
