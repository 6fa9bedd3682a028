"""What a decode worker is asked and what it answers, free of protobuf.

``GenerationRequest`` is a checked request (every field within its limits, except the
checks that need the tokenizer: those happen in ``decode_service.worker`` before any
compute or store I/O). ``TokenDelta`` is one streamed piece; ``Completion`` the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling import SamplingParams


@dataclass(frozen=True)
class ChatTurn:
    """One chat message."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of ``text``, ``token_ids`` or ``messages`` is set; ``input_field`` names it."""

    request_id: str
    input_field: str
    params: SamplingParams
    cache_salt: str = ""
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[ChatTurn, ...] | None = None


@dataclass(frozen=True)
class TokenDelta:
    """Tokens sampled since the previous delta and the text they released."""

    text: str
    token_ids: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class Usage:
    """Token counts (``cached_prompt_tokens``: found in the store or the pool on arrival)."""

    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    """Milliseconds per phase, measured on the decode worker."""

    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_fetch_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    decode_ms: float = 0.0


@dataclass(frozen=True)
class Completion:
    """The end of a request: the last delta's successor in a stream, or the whole answer."""

    request_id: str
    finish_reason: str
    usage: Usage
    timings: Timings
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
