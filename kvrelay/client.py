"""A small synchronous client of the ``kvrelay.v1.Generation`` service (CLI and demo)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from kvrelay.serving.tls import channel_credentials
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Prompt:
    """What to send: text (as a user chat turn when ``chat``) and sampling settings."""

    text: str
    chat: bool = False
    system: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    cache_salt: str = ""


def build_request(prompt: Prompt) -> pb.GenerateRequest:
    """The GenerateRequest for ``prompt``."""
    sampling = pb.SamplingParams(max_new_tokens=prompt.max_new_tokens,
                                 temperature=prompt.temperature, seed=prompt.seed)
    request = pb.GenerateRequest(sampling=sampling, cache_salt=prompt.cache_salt)
    if not prompt.chat:
        request.prompt = prompt.text
        return request
    if prompt.system:
        request.messages.messages.add(role="system", content=prompt.system)
    request.messages.messages.add(role="user", content=prompt.text)
    return request


def open_channel(addr: str, tls_ca_file: str = "") -> grpc.Channel:
    """A channel to a worker with explicit message-size limits; TLS when given a CA bundle."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if tls_ca_file:
        return grpc.secure_channel(addr, channel_credentials(tls_ca_file), options=options)
    return grpc.insecure_channel(addr, options=options)


def generate(channel: grpc.Channel, request: pb.GenerateRequest, timeout_s: float) -> pb.GenerateResponse:
    """One unary Generate call."""
    return pb_grpc.GenerationStub(channel).Generate(request, timeout=timeout_s)


def generate_stream(channel: grpc.Channel, request: pb.GenerateRequest,
                    timeout_s: float) -> Iterator[pb.GenerateStreamResponse]:
    """The messages of one GenerateStream call."""
    return pb_grpc.GenerationStub(channel).GenerateStream(request, timeout=timeout_s)
