"""From a checked request to prompt token ids, and the checks that need the model.

Everything here runs before any store I/O or compute, and fails with INVALID_ARGUMENT
naming the request field.
"""

from __future__ import annotations

import jinja2

from decode_service.requests import GenerationRequest
from engine.config import ModelConfig
from engine.sampling import InvalidSamplingParams
from engine.tokenizer import Tokenizer
from kvrelay.serving.errors import invalid_argument


def render_chat(tokenizer: Tokenizer, req: GenerationRequest) -> str:
    """The messages through the model's chat template; INVALID_ARGUMENT when it refuses them."""
    if not tokenizer.has_chat_template:
        raise invalid_argument("messages", "this model has no chat template; send a prompt")
    try:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in (req.messages or ())])
    except jinja2.TemplateError as exc:
        raise invalid_argument("messages", f"the chat template refused them: {str(exc)[:200]}") from exc


def prompt_ids(tokenizer: Tokenizer, req: GenerationRequest) -> list[int]:
    """Token ids as given, or the text encoded, or the chat rendered then encoded."""
    if req.token_ids is not None:
        return list(req.token_ids)
    if req.messages is not None:
        return tokenizer.encode(render_chat(tokenizer, req), add_special_tokens=False)
    return tokenizer.encode(req.text or "")


def check_prompt(req: GenerationRequest, ids: list[int], config: ModelConfig, block_size: int,
                 num_blocks: int, max_prompt_tokens: int = 0) -> None:
    """Ids in the vocabulary, within the context window and ``max_prompt_tokens`` (0: no
    limit beyond the window), sampling valid, fits the KV pool."""
    field = req.input_field
    if not ids:
        raise invalid_argument(field, "encodes to no tokens")
    if max_prompt_tokens and len(ids) > max_prompt_tokens:
        raise invalid_argument(field, f"{len(ids)} tokens exceed this worker's limit of "
                                      f"{max_prompt_tokens} prompt tokens")
    if min(ids) < 0 or max(ids) >= config.vocab_size:
        raise invalid_argument(field, f"token ids must be in [0, {config.vocab_size})")
    if len(ids) >= config.max_position_embeddings:
        raise invalid_argument(field, f"{len(ids)} tokens do not fit the context window of "
                                      f"{config.max_position_embeddings}")
    try:
        req.params.validate(config.vocab_size)
    except InvalidSamplingParams as exc:
        raise invalid_argument(f"sampling.{exc.field}", exc.message) from exc
    total = min(len(ids) + req.params.max_new_tokens, config.max_position_embeddings)
    if -(-total // block_size) > num_blocks:
        raise invalid_argument("sampling.max_new_tokens",
                               "prompt plus max_new_tokens exceeds this worker's KV pool")
