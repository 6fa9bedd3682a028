"""Request checks of the decode worker that need no running service."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from decode_service.convert import to_request
from decode_service.prompts import render_chat
from decode_service.requests import ChatTurn, GenerationRequest
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from kvrelay.serving.errors import ServiceError
from protos.kvrelay.v1 import generation_pb2 as pb

LIMITS = {"max_new_tokens_limit": 100, "max_prompt_chars": 50}


def _field_of(request: pb.GenerateRequest) -> str:
    with pytest.raises(ServiceError) as err:
        to_request(request, **LIMITS)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return err.value.message.split(":")[0]


def test_limits_name_the_field() -> None:
    assert _field_of(pb.GenerateRequest(prompt="x" * 51)) == "prompt"
    assert _field_of(pb.GenerateRequest(
        prompt="x", sampling=pb.SamplingParams(max_new_tokens=101))) == "sampling.max_new_tokens"
    assert _field_of(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_k=-1))) \
        == "sampling.top_k"
    assert _field_of(pb.GenerateRequest(prompt="x", cache_salt="s" * 257)) == "cache_salt"
    assert _field_of(pb.GenerateRequest(prompt="x", request_id="r" * 129)) == "request_id"
    assert _field_of(pb.GenerateRequest(messages=pb.ChatMessages())) == "messages"


def test_unset_sampling_fields_take_the_defaults() -> None:
    request = to_request(pb.GenerateRequest(prompt="hello", request_id="mine"), **LIMITS)
    assert request.request_id == "mine"
    assert request.params == SamplingParams(max_new_tokens=64, temperature=0.0, top_k=0,
                                            top_p=1.0, seed=None)
    assert to_request(pb.GenerateRequest(prompt="hello"), **LIMITS).request_id  # generated


def _chat() -> GenerationRequest:
    return GenerationRequest("r", "messages", SamplingParams(), messages=(ChatTurn("user", "hi"),))


def test_a_chat_template_that_refuses_the_messages_is_invalid_argument(tiny_model_dir: Path) -> None:
    base = Tokenizer.from_dir(tiny_model_dir)
    strict = Tokenizer(base.backend, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ServiceError) as err:
        render_chat(strict, _chat())
    assert err.value.message == "messages: the chat template refused them: roles must alternate"
    without = Tokenizer(base.backend)
    with pytest.raises(ServiceError, match="no chat template"):
        render_chat(without, _chat())
    assert "hi" in render_chat(base, _chat())


def test_prompt_token_limit_names_the_input_field(tiny_model_dir: Path) -> None:
    from decode_service.prompts import check_prompt, prompt_ids
    from engine.loader import load_model

    loaded = load_model(str(tiny_model_dir))
    req = to_request(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 40)), **LIMITS)
    ids = prompt_ids(loaded.tokenizer, req)
    check_prompt(req, ids, loaded.config, 16, 64, max_prompt_tokens=40)  # at the limit: fine
    with pytest.raises(ServiceError) as err:
        check_prompt(req, ids, loaded.config, 16, 64, max_prompt_tokens=39)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message.startswith("token_ids: 40 tokens exceed")
