"""One error interceptor: documented failures keep their status, the rest become INTERNAL.

Request bytes that do not parse are answered INVALID_ARGUMENT before any handler runs.

Domain code raises ``ServiceError`` (or ``invalid_argument``) for failures with a
documented status code. Anything else is logged with a fresh error id and answered with
INTERNAL and a generic message naming only that id: exception text never reaches a client.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger("kvrelay.errors")


class ServiceError(Exception):
    """A request failure with a documented gRPC status code and a client-safe message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_argument(field: str, problem: str) -> ServiceError:
    """INVALID_ARGUMENT naming the request field that is wrong."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, exc.message)
    error_id = uuid.uuid4().hex[:16]
    log.error("unexpected error in %s", method, exc_info=exc, extra={"error_id": error_id})
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (error id {error_id})")


class _Malformed:
    """Stands for request bytes that did not parse; the handler answers INVALID_ARGUMENT."""


MALFORMED = _Malformed()


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # noqa: BLE001 - any parse failure is the client's malformed input
            return MALFORMED
    return parse


async def _reject_malformed(request: Any, context: grpc.aio.ServicerContext) -> None:
    if request is MALFORMED:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid protobuf message")


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _reject_malformed(request, context)
        try:
            return await behavior(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - the one place that maps every error
            await _abort_for(exc, context, method)
    return unary


def _wrap_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):  # writes with context.write (health Watch)
        return _wrap_unary(behavior, method)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _reject_malformed(request, context)
        try:
            async for item in behavior(request, context):
                yield item
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort_for(exc, context, method)
    return stream


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions of unary-unary and unary-stream handlers to status codes."""

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        method = details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream, method),
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer)
