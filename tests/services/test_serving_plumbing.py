"""The shared gRPC plumbing, in-process: error mapping, lifecycle gate, settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrelay.serving import settings
from kvrelay.serving.errors import invalid_argument
from kvrelay.serving.lifecycle import Lifecycle
from kvrelay.serving.server import build_server
from kvrelay.serving.worker_config import WorkerConfig
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc

SECRET = "secret detail of a bug"


class _Failing(pb_grpc.GenerationServicer):
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> pb.GenerateResponse:
        if request.prompt == "bad":
            raise invalid_argument("prompt", "is bad")
        raise KeyError(SECRET)

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        yield pb.GenerateStreamResponse(text="one")
        raise RuntimeError(SECRET)


async def _with_server(lifecycle: Lifecycle, body) -> None:  # type: ignore[no-untyped-def]
    server = build_server(lifecycle, ["kvrelay.v1.Generation"], 1 << 20,
                          lambda s: pb_grpc.add_GenerationServicer_to_server(_Failing(), s))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(channel)
    finally:
        await server.stop(None)


def _run(body, serving: bool = True) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        lifecycle = Lifecycle(["kvrelay.v1.Generation"])
        await (lifecycle.serving() if serving else lifecycle.loading())
        await _with_server(lifecycle, body)
    asyncio.run(main())


def test_unexpected_errors_are_internal_with_a_logged_id(caplog: pytest.LogCaptureFixture) -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.GenerationStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Generate(pb.GenerateRequest(prompt="x"), timeout=5)
        call = stub.GenerateStream(pb.GenerateRequest(prompt="x"), timeout=5)
        assert (await call.read()).text == "one"
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            await call.read()
        for err in (unary.value, stream.value):
            assert err.code() == grpc.StatusCode.INTERNAL
            assert SECRET not in err.details()
            error_id = err.details().split("error id ")[1].rstrip(")")
            assert any(getattr(r, "error_id", None) == error_id for r in caplog.records)

    with caplog.at_level(logging.ERROR, logger="kvrelay.errors"):
        _run(body)


def test_documented_errors_keep_their_status() -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(prompt="bad"), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "prompt: is bad"

    _run(body)


def test_a_loading_worker_is_not_serving_and_refuses_work() -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="kvrelay.v1.Generation"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(prompt="x"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    _run(body, serving=False)


def test_health_watch_streams_the_status() -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="kvrelay.v1.Generation"), timeout=5)
        assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
        call.cancel()

    _run(body)


def test_messages_over_the_size_limit_are_resource_exhausted() -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(prompt="x" * (2 << 20)), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    _run(body)


@dataclass(frozen=True)
class _Example:
    port: int = settings.setting(1, "a port")
    name: str | None = settings.setting(None, "a name")
    on: bool = settings.setting(False, "a switch")


def _parse(argv: list[str], env: dict[str, str]) -> _Example:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, _Example)
    return settings.from_args(_Example, parser.parse_args(argv), env)


def test_settings_take_flags_over_environment_over_defaults() -> None:
    assert _parse([], {}) == _Example()
    assert _parse([], {"KVRELAY_PORT": "7", "KVRELAY_ON": "true"}) == _Example(port=7, on=True)
    assert _parse(["--port", "9"], {"KVRELAY_PORT": "7"}).port == 9
    assert _parse(["--name", "x"], {}).name == "x"
    with pytest.raises(ValueError):
        _parse([], {"KVRELAY_ON": "maybe"})


def test_plaintext_is_refused_off_loopback_unless_allowed() -> None:
    assert WorkerConfig().host == "127.0.0.1"
    with pytest.raises(ValueError, match="plaintext"):
        WorkerConfig(host="0.0.0.0")
    assert WorkerConfig(host="0.0.0.0", allow_plaintext=True).address == "0.0.0.0:50051"
    assert WorkerConfig(host="10.0.0.5", tls_cert_file="c.pem", tls_key_file="k.pem").tls
    with pytest.raises(ValueError, match="together"):
        WorkerConfig(tls_cert_file="c.pem")
