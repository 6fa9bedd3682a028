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

log = logging.getLogger("kvrelay.server")


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Explicit gRPC limits on received and sent message sizes (no KV ever crosses gRPC)."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def build_server(lifecycle: Lifecycle, service_names: list[str], max_message_bytes: int,
                 register: Callable[[grpc.aio.Server], None]) -> grpc.aio.Server:
    """A server whose services are added by ``register``, plus health and reflection."""
    server = grpc.aio.server(
        interceptors=[LifecycleInterceptor(lifecycle), ErrorInterceptor()],
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


async def serve(server: grpc.aio.Server, lifecycle: Lifecycle, address: str, grace_s: float,
                warm_up: Callable[[], Awaitable[None]], on_stop: Callable[[], None]) -> None:
    """Listen on ``address`` (NOT_SERVING), warm up, serve; on a signal drain and stop."""
    stop = _stop_event()
    if not server.add_insecure_port(address):
        raise OSError(f"cannot listen on {address}")
    await lifecycle.loading()
    await server.start()
    log.info("listening", extra={"address": address})
    await warm_up()
    await lifecycle.serving()
    log.info("serving", extra={"address": address})
    await stop.wait()
    log.info("draining", extra={"in_flight": lifecycle.in_flight, "grace_s": grace_s})
    await lifecycle.drain(grace_s)
    await server.stop(1.0)
    on_stop()
    log.info("stopped")
