"""``kvrelay.v1.Prefill``: protobuf in, one call into ``PrefillWorker``, protobuf out."""

from __future__ import annotations

import grpc

from prefill_service.worker import PrefillJob, PrefillResult, PrefillWorker
from protos.kvrelay.v1 import prefill_pb2 as pb
from protos.kvrelay.v1 import prefill_pb2_grpc as pb_grpc


def to_job(request: pb.PrefillRequest) -> PrefillJob:
    return PrefillJob(token_ids=list(request.token_ids), cache_salt=request.cache_salt,
                      block_hashes=list(request.block_hashes),
                      fingerprint=request.model_fingerprint, request_id=request.request_id)


def to_response(result: PrefillResult) -> pb.PrefillResponse:
    return pb.PrefillResponse(stored_prompt_tokens=result.stored_prompt_tokens,
                              computed_tokens=result.computed_tokens,
                              published_blocks=result.published_blocks,
                              compute_ms=result.compute_ms)


class PrefillServicer(pb_grpc.PrefillServicer):
    """Translates Prefill calls for a ``PrefillWorker`` (set once the worker is warm)."""

    def __init__(self) -> None:
        self.worker: PrefillWorker | None = None

    async def Prefill(self, request: pb.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        assert self.worker is not None, "the lifecycle interceptor admits no call before warm-up"
        return to_response(await self.worker.prefill(to_job(request)))
