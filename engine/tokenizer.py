"""Text <-> token ids for a model directory, and chat-template rendering.

``Tokenizer`` wraps a ``tokenizers.Tokenizer`` built from the directory's ``tokenizer.json``
(whose normalizer, pre-tokenizer, post-processor and decoder define the model's tokenization)
and renders the chat template from ``tokenizer_config.json`` (or ``chat_template.jinja``) with a
sandboxed jinja2 environment set up like the HuggingFace ecosystem's, so a rendered prompt is
byte-for-byte the one the model was trained on.

``IncrementalDetokenizer`` turns a stream of generated ids into text deltas for streaming.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The named special tokens a chat template may refer to (``{{ bos_token }}`` ...).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
_REPLACEMENT_CHAR = "\ufffd"


class TokenizerLoadError(ValueError):
    """A tokenizer directory that cannot be used: names the file and what is wrong with it."""


class Tokenizer:
    """A model's tokenizer: encode/decode, eos ids and its chat template.

    ``special_tokens`` maps names such as ``"bos_token"`` to token strings; the chat template
    sees them as variables. ``eos_token_ids`` holds every id that ends generation.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, chat_template: str | None = None,
                 special_tokens: Mapping[str, str] | None = None,
                 eos_token_ids: Iterable[int] = ()) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.eos_token_ids = frozenset(eos_token_ids)

    @classmethod
    def from_dir(cls, path: str | Path, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``)."""
        directory = Path(path)
        tok_file = directory / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerLoadError(f"{directory} has no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust library raises plain Exception subclasses
            raise TokenizerLoadError(f"{tok_file} is not a valid tokenizer: {e}") from e
        config = _read_json(directory / "tokenizer_config.json")
        special = _special_tokens(config)
        eos = set(extra_eos_token_ids)
        if (eos_id := _token_id(backend, special.get("eos_token"))) is not None:
            eos.add(eos_id)
        return cls(backend, chat_template=_chat_template(directory, config),
                   special_tokens=special, eos_token_ids=eos)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        """Render ``messages`` (dicts with ``role`` and ``content``) into the prompt text."""
        if self._compiled_template is None:
            raise ValueError("this tokenizer has no chat template")
        return self._compiled_template.render(
            messages=messages, tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **self.special_tokens)

    @cached_property
    def _compiled_template(self) -> jinja2.Template | None:
        return None if self.chat_template is None else compile_chat_template(self.chat_template)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment chat templates are written for.

    Sandboxed and immutable (templates are untrusted), ``trim_blocks`` and ``lstrip_blocks``,
    loop controls, ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps non-ASCII.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerLoadError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path} must hold a JSON object")
    return data


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """Named special tokens; older configs spell a token as ``{"content": ...}``."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def _token_id(backend: tokenizers.Tokenizer, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)


def _chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    """``chat_template.jinja`` if present, else the config's ``chat_template``.

    A config may hold a list of named templates; the one named ``default`` is used.
    """
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class IncrementalDetokenizer:
    """Turns generated ids, one at a time, into text deltas for streaming.

    ``push`` returns only text that is final. It holds ids back while their text ends in an
    incomplete UTF-8 sequence (a byte-level piece of a multi-byte character) or is still
    empty (skipped special tokens, which would otherwise change how a decoder treats the
    first visible token). ``flush`` returns what is held at the end of the stream. The deltas
    of every ``push`` plus ``flush`` concatenate to ``tokenizer.decode(all ids)``.

    Only the held ids are decoded per call, after an anchor (the ids of ``"a"``): decoders
    that treat the first token of a text specially (dropping a sentencepiece word's leading
    space) then see the held ids in the same position as in the whole text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._anchor = tokenizer.encode("a", add_special_tokens=False)
        self._anchor_text = tokenizer.decode(self._anchor)
        self._held: list[int] = []
        self._started = False  # some text was emitted: later ids decode after the anchor

    def push(self, token_id: int) -> str:
        self._held.append(token_id)
        text = self._decode_held()
        if not text or text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._release(text)

    def flush(self) -> str:
        """Text still held back at the end of the stream."""
        return self._release(self._decode_held()) if self._held else ""

    def _decode_held(self) -> str:
        if not self._started:
            return self._tokenizer.decode(self._held, self._skip)
        text = self._tokenizer.decode(self._anchor + self._held, self._skip)
        return text[len(self._anchor_text):]

    def _release(self, text: str) -> str:
        self._held.clear()
        self._started = self._started or bool(text)
        return text
