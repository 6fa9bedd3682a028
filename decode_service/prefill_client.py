"""Decode's client of ``kvrelay.v1.Prefill``: failures come back as a reason, never raised.

Decode prefills locally whenever this returns no result (worker down, hung past the
deadline, overloaded, a different model), and counts it by that reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import grpc

from kvrelay.serving.auth import bearer
from kvrelay.serving.server import message_size_options
from protos.kvrelay.v1 import prefill_pb2 as pb
from protos.kvrelay.v1 import prefill_pb2_grpc as pb_grpc

log = logging.getLogger("kvrelay.prefill_client")
_LOG_INTERVAL_S = 30.0


class PrefillClient:
    """One channel (TLS when given credentials) to one prefill worker, made on the running loop."""

    def __init__(self, addr: str, max_message_bytes: int,
                 credentials: grpc.ChannelCredentials | None = None, api_key: str = "") -> None:
        self.addr = addr
        self._metadata = bearer(api_key) if api_key else None
        self._quiet_until: dict[str, float] = {}
        options = message_size_options(max_message_bytes)
        self._channel = grpc.aio.secure_channel(addr, credentials, options=options) \
            if credentials else grpc.aio.insecure_channel(addr, options=options)
        self._stub = pb_grpc.PrefillStub(self._channel)

    async def prefill(self, token_ids: Sequence[int], cache_salt: str, block_hashes: Sequence[bytes],
                      fingerprint: str, request_id: str, timeout_s: float) -> tuple[int | None, str]:
        """``(stored prompt tokens, "")`` on success, ``(None, reason)`` on any failure."""
        request = pb.PrefillRequest(token_ids=token_ids, cache_salt=cache_salt,
                                    block_hashes=[bytes(h) for h in block_hashes],
                                    model_fingerprint=fingerprint, request_id=request_id)
        try:
            reply = await self._stub.Prefill(request, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            reason = err.code().name.lower()
            self._log_failure(reason, err.details() or "")
            return None, reason
        return reply.stored_prompt_tokens, ""

    def _log_failure(self, reason: str, details: str) -> None:
        """Warn at once, then at most every ``_LOG_INTERVAL_S`` per reason."""
        now = time.monotonic()
        if now < self._quiet_until.get(reason, 0.0):
            return
        self._quiet_until[reason] = now + _LOG_INTERVAL_S
        log.warning("Prefill call failed; prefilling locally (logged at most every %.0f s)",
                    _LOG_INTERVAL_S, extra={"prefill_addr": self.addr, "reason": reason,
                                            "details": details[:200]})

    async def close(self) -> None:
        await self._channel.close()
