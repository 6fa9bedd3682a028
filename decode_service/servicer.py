"""``kvrelay.v1.Generation``: protobuf in, one call into ``DecodeWorker``, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from decode_service.convert import to_request, to_response, to_stream_message
from decode_service.requests import GenerationRequest
from decode_service.worker import DecodeWorker
from kvrelay.serving.auth import current_tenant, tenant_salt
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc


class GenerationServicer(pb_grpc.GenerationServicer):
    """Translates Generation calls for a ``DecodeWorker`` (set once the worker is warm)."""

    def __init__(self) -> None:
        self.worker: DecodeWorker | None = None

    def _worker(self) -> DecodeWorker:
        assert self.worker is not None, "the lifecycle interceptor admits no call before warm-up"
        return self.worker

    def _request(self, request: pb.GenerateRequest) -> GenerationRequest:
        cfg = self._worker().config
        req = to_request(request, max_new_tokens_limit=cfg.max_new_tokens_limit,
                         max_prompt_chars=cfg.max_prompt_chars)
        tenant = current_tenant()
        if tenant is None:
            return req
        return replace(req, cache_salt=tenant_salt(tenant, req.cache_salt))

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return to_response(await self._worker().generate(self._request(request),
                                                         context.time_remaining()))

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        req = self._request(request)
        async for item in self._worker().stream(req, context.time_remaining()):
            yield to_stream_message(req.request_id, item)
