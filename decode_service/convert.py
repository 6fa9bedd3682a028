"""Protobuf <-> decode domain: request checks that need no model, and the replies.

Every check raises INVALID_ARGUMENT naming the proto field (``sampling.top_p``...).
"""

from __future__ import annotations

import math
import uuid

from decode_service.requests import ChatTurn, Completion, GenerationRequest, TokenDelta
from engine.sampling import SamplingParams
from kvrelay.serving.errors import invalid_argument
from protos.kvrelay.v1 import generation_pb2 as pb

MAX_SALT_BYTES = 256
MAX_REQUEST_ID_CHARS = 128
MAX_MESSAGES = 1024
DEFAULT_MAX_NEW_TOKENS = 64
_FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def _check(ok: bool, field: str, problem: str) -> None:
    if not ok:
        raise invalid_argument(field, problem)


def _sampling(s: pb.SamplingParams, max_new_tokens_limit: int) -> SamplingParams:
    max_new = s.max_new_tokens if s.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
    _check(1 <= max_new <= max_new_tokens_limit, "sampling.max_new_tokens",
           f"must be in [1, {max_new_tokens_limit}]")
    temperature = s.temperature if s.HasField("temperature") else 0.0
    _check(math.isfinite(temperature) and temperature >= 0, "sampling.temperature",
           "must be a finite number >= 0")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    _check(math.isfinite(top_p) and 0 < top_p <= 1, "sampling.top_p", "must be in (0, 1]")
    top_k = s.top_k if s.HasField("top_k") else 0
    _check(top_k >= 0, "sampling.top_k", "must be >= 0")
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=s.seed if s.HasField("seed") else None,
                          stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
                          logprobs=s.logprobs, ignore_eos=s.ignore_eos)


def _input(request: pb.GenerateRequest, max_prompt_chars: int) -> dict[str, object]:
    kind = request.WhichOneof("input")
    _check(kind is not None, "input", "set one of prompt, token_ids or messages")
    if kind == "prompt":
        _check(bool(request.prompt), "prompt", "must not be empty")
        _check(len(request.prompt) <= max_prompt_chars, "prompt",
               f"longer than {max_prompt_chars} characters")
        return {"text": request.prompt}
    if kind == "token_ids":
        _check(len(request.token_ids.ids) > 0, "token_ids", "must not be empty")
        return {"token_ids": tuple(request.token_ids.ids)}
    turns = request.messages.messages
    _check(0 < len(turns) <= MAX_MESSAGES, "messages", f"give 1 to {MAX_MESSAGES} messages")
    _check(all(t.role for t in turns), "messages.role", "must not be empty")
    _check(sum(len(t.content) for t in turns) <= max_prompt_chars, "messages",
           f"longer than {max_prompt_chars} characters")
    return {"messages": tuple(ChatTurn(t.role, t.content) for t in turns)}


def to_request(request: pb.GenerateRequest, *, max_new_tokens_limit: int,
               max_prompt_chars: int) -> GenerationRequest:
    """A checked ``GenerationRequest``; INVALID_ARGUMENT naming the first bad field."""
    inputs = _input(request, max_prompt_chars)
    _check(len(request.cache_salt.encode()) <= MAX_SALT_BYTES, "cache_salt",
           f"longer than {MAX_SALT_BYTES} bytes")
    _check(len(request.request_id) <= MAX_REQUEST_ID_CHARS, "request_id",
           f"longer than {MAX_REQUEST_ID_CHARS} characters")
    return GenerationRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        input_field=request.WhichOneof("input") or "",
        params=_sampling(request.sampling, max_new_tokens_limit),
        cache_salt=request.cache_salt, **inputs)  # type: ignore[arg-type]


def _usage(c: Completion) -> pb.Usage:
    return pb.Usage(prompt_tokens=c.usage.prompt_tokens,
                    cached_prompt_tokens=c.usage.cached_prompt_tokens,
                    completion_tokens=c.usage.completion_tokens)


def _timings(c: Completion) -> pb.Timings:
    t = c.timings
    return pb.Timings(queue_ms=t.queue_ms, prefill_ms=t.prefill_ms, kv_fetch_ms=t.kv_fetch_ms,
                      time_to_first_token_ms=t.time_to_first_token_ms, decode_ms=t.decode_ms)


def to_response(c: Completion) -> pb.GenerateResponse:
    """The unary reply."""
    return pb.GenerateResponse(request_id=c.request_id, text=c.text, token_ids=c.token_ids,
                               finish_reason=_FINISH_REASONS[c.finish_reason], usage=_usage(c),
                               timings=_timings(c), logprobs=c.logprobs)


def to_stream_message(request_id: str, item: TokenDelta | Completion) -> pb.GenerateStreamResponse:
    """One stream message: a delta, or the closing one (finish reason, usage, timings; no text)."""
    if isinstance(item, TokenDelta):
        return pb.GenerateStreamResponse(request_id=request_id, text=item.text,
                                         token_ids=item.token_ids, logprobs=item.logprobs)
    return pb.GenerateStreamResponse(request_id=request_id,
                                     finish_reason=_FINISH_REASONS[item.finish_reason],
                                     usage=_usage(item), timings=_timings(item))
