"""Health and draining: NOT_SERVING while loading, SERVING when warm, NOT_SERVING while draining.

``Lifecycle`` owns the worker's standard ``grpc.health.v1`` status and counts requests in
flight. ``LifecycleInterceptor`` refuses new work with UNAVAILABLE unless the worker is
serving; health and reflection calls always pass, so probes keep answering while draining.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

_ALWAYS_OPEN = ("/grpc.health.v1.", "/grpc.reflection.")


class Lifecycle:
    """The serving state of one worker, published through the health service."""

    def __init__(self, service_names: list[str]) -> None:
        self.health = health.aio.HealthServicer()
        self._names = ["", *service_names]
        self._serving = False
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def _publish(self, status: int) -> None:
        for name in self._names:
            await self.health.set(name, status)

    async def loading(self) -> None:
        """Report NOT_SERVING until ``serving`` is called."""
        await self._publish(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def serving(self) -> None:
        """The worker is warm: report SERVING and accept requests."""
        self._serving = True
        await self._publish(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, grace_s: float) -> None:
        """Report NOT_SERVING, refuse new requests, wait up to ``grace_s`` for in-flight ones."""
        self._draining = True
        await self._publish(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + grace_s
        while self._in_flight and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self._idle.wait(), deadline - time.monotonic())
            except TimeoutError:
                break

    def refusal(self) -> str | None:
        """Why a new request must be refused now, or None to accept it."""
        if self._draining:
            return "worker is draining"
        if not self._serving:
            return "worker is still loading"
        return None

    def enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()


def _gated(behavior: Callable[..., Any], lifecycle: Lifecycle, streaming: bool) -> Callable[..., Any]:
    async def refuse(context: grpc.aio.ServicerContext) -> None:
        reason = lifecycle.refusal()
        if reason:
            await context.abort(grpc.StatusCode.UNAVAILABLE, reason)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse(context)
        lifecycle.enter()
        try:
            return await behavior(request, context)
        finally:
            lifecycle.leave()

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse(context)
        lifecycle.enter()
        try:
            async for item in behavior(request, context):
                yield item
        finally:
            lifecycle.leave()

    return stream if streaming and inspect.isasyncgenfunction(behavior) else unary


class LifecycleInterceptor(grpc.aio.ServerInterceptor):
    """UNAVAILABLE for new work while loading or draining; counts requests in flight."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_ALWAYS_OPEN) or handler.request_streaming:
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _gated(handler.unary_unary, self._lifecycle, streaming=False),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.unary_stream_rpc_method_handler(
            _gated(handler.unary_stream, self._lifecycle, streaming=True),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
