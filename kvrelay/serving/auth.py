"""API keys, tenants and per-tenant stream limits for the gRPC services.

A key file has one ``<tenant> <key>`` pair per line (``#`` starts a comment). A caller
sends ``authorization: Bearer <key>``; a missing or unknown key is answered
UNAUTHENTICATED before any handler runs. Keys are compared as SHA-256 digests with
``hmac.compare_digest`` against every known key, so the time taken says nothing about
which key, or how much of one, matched. Health and reflection stay open for probes.

The tenant of the call is available to handlers through ``current_tenant()``; decode
derives the request's cache salt from it (``tenant_salt``), so the prefix cache is
never shared between tenants whatever salt a client sends.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import grpc

_OPEN = ("/grpc.health.v1.", "/grpc.reflection.")
_BEARER = "bearer "
_tenant: ContextVar[str | None] = ContextVar("kvrelay_tenant", default=None)


def current_tenant() -> str | None:
    """The authenticated tenant of the call being handled (None when keys are off)."""
    return _tenant.get()


def tenant_salt(tenant: str, cache_salt: str) -> str:
    """The salt a tenant's request hashes with: length-prefixed, so no tenant's salt can
    spell another tenant's."""
    return f"tenant:{len(tenant)}:{tenant}:{cache_salt}"


def parse_key_file(text: str) -> dict[str, str]:
    """``{key: tenant}`` from ``<tenant> <key>`` lines; ValueError names a bad line."""
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2 or len(fields[1]) < 16:
            raise ValueError(f"key file line {number}: expected '<tenant> <key of 16+ characters>'")
        tenant, key = fields
        if key in keys:
            raise ValueError(f"key file line {number}: key already given to another tenant")
        keys[key] = tenant
    if not keys:
        raise ValueError("key file holds no keys")
    return keys


def read_key_file(path: str) -> dict[str, str]:
    """``parse_key_file`` of the file at ``path``."""
    return parse_key_file(Path(path).read_text())


def read_token(path: str) -> str:
    """The one token in the file at ``path`` (surrounding whitespace dropped)."""
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"{path} holds no token")
    return token


def bearer(key: str) -> tuple[tuple[str, str]]:
    """Call metadata presenting ``key``."""
    return (("authorization", f"Bearer {key}"),)


class KeyRing:
    """Known keys by digest; ``tenant_of`` takes the same time whichever key is presented."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._digests = [(hashlib.sha256(k.encode()).digest(), t) for k, t in keys.items()]

    def tenant_of(self, presented: str) -> str | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for known, tenant in self._digests:
            if hmac.compare_digest(digest, known):
                found = tenant
        return found


def _presented_key(context: grpc.aio.ServicerContext) -> str:
    for name, value in context.invocation_metadata() or ():
        if name == "authorization" and isinstance(value, str) and value.lower().startswith(_BEARER):
            return value[len(_BEARER):].strip()
    return ""


class _Gate:
    """Authenticates a call and holds one of its tenant's stream slots while it runs."""

    def __init__(self, ring: KeyRing, max_streams_per_tenant: int) -> None:
        self._ring = ring
        self._limit = max_streams_per_tenant
        self._open: Counter[str] = Counter()

    async def enter(self, context: grpc.aio.ServicerContext) -> str:
        tenant = self._ring.tenant_of(_presented_key(context))
        if tenant is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")
        assert tenant is not None
        if self._limit and self._open[tenant] >= self._limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"more than {self._limit} concurrent requests for this tenant")
        self._open[tenant] += 1
        _tenant.set(tenant)
        return tenant

    def leave(self, tenant: str) -> None:
        self._open[tenant] -= 1
        if not self._open[tenant]:
            del self._open[tenant]


def _guarded(behavior: Callable[..., Any], gate: _Gate) -> Callable[..., Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = await gate.enter(context)
        try:
            return await behavior(request, context)
        finally:
            gate.leave(tenant)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = await gate.enter(context)
        try:
            async for item in behavior(request, context):
                yield item
        finally:
            gate.leave(tenant)

    return stream if inspect.isasyncgenfunction(behavior) else unary


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a known key; RESOURCE_EXHAUSTED past a tenant's stream limit."""

    def __init__(self, keys: Mapping[str, str], max_streams_per_tenant: int = 0) -> None:
        self._gate = _Gate(KeyRing(keys), max_streams_per_tenant)

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN) or handler.request_streaming:
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _guarded(handler.unary_unary, self._gate),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.unary_stream_rpc_method_handler(
            _guarded(handler.unary_stream, self._gate),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def auth_interceptor(api_keys_file: str, max_streams_per_tenant: int = 0) -> AuthInterceptor | None:
    """The interceptor for a worker's ``api_keys_file`` setting (None when it is empty)."""
    if not api_keys_file:
        return None
    return AuthInterceptor(read_key_file(api_keys_file), max_streams_per_tenant)


class _ClientKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <key>`` to every call of a client channel."""

    def __init__(self, key: str) -> None:
        self._metadata = bearer(key)

    def _with_key(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(  # type: ignore[attr-defined]
            metadata=[*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)


def with_api_key(channel: grpc.Channel, key: str) -> grpc.Channel:
    """``channel`` presenting ``key`` on every call (a sync client channel)."""
    return grpc.intercept_channel(channel, _ClientKey(key))
