"""A ``tokenizers`` tokenizer rebuilt from a GGUF file's ``tokenizer.*`` metadata.

A GGUF carries no tokenizer.json: it stores the vocabulary, merges or scores, token types,
special ids and the name of the pre-tokenizer its merges were learned with. Two models are
rebuilt (``tokenizer.ggml.model``, a registry below):

- ``gpt2``: byte-level BPE from the tokens and merges, split by the named pre-tokenizer
  (``smollm`` splits digits one by one before the GPT-2 split, as SmolLM2 was trained);
- ``llama``: sentencepiece BPE with byte fallback; its merges are implied by the scores
  (a piece that scores higher is merged first).

``fields`` is the metadata as plain values, keyed by GGUF key names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

Fields = Mapping[str, Any]

# tokenizer.ggml.token_type values
_CONTROL, _USER_DEFINED = 3, 4
_SPACE = "\u2581"  # how sentencepiece writes a space


class GGUFTokenizerError(ValueError):
    """Tokenizer metadata kvrelay cannot rebuild; names the key or value at fault."""


def build_tokenizer(fields: Fields) -> Tokenizer:
    """The tokenizer the metadata describes, special tokens added."""
    model = _need(fields, "tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise GGUFTokenizerError(f"unsupported tokenizer model {model!r}; supported: "
                                 f"{', '.join(sorted(TOKENIZER_MODELS))}")
    return TOKENIZER_MODELS[model](fields)


def special_token(fields: Fields, key: str) -> str | None:
    """The text of ``tokenizer.ggml.<key>_token_id`` (key: bos, eos, unknown, padding)."""
    token_id = fields.get(f"tokenizer.ggml.{key}_token_id")
    return None if token_id is None else _need(fields, "tokenizer.ggml.tokens")[token_id]


def adds_bos(fields: Fields) -> bool:
    """Whether encoding prepends BOS; sentencepiece vocabularies do unless told otherwise."""
    default = _need(fields, "tokenizer.ggml.model") == "llama"
    return bool(fields.get("tokenizer.ggml.add_bos_token", default))


def _need(fields: Fields, key: str) -> Any:
    if key not in fields:
        raise GGUFTokenizerError(f"GGUF metadata is missing {key!r}")
    return fields[key]


# -- byte-level BPE ----------------------------------------------------------------------

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _regex_split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre -> the pre-tokenizer the vocabulary's merges were learned with.
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "llama-bpe": lambda: _regex_split(_LLAMA3_SPLIT),
    "qwen2": lambda: _regex_split(_QWEN2_SPLIT),
}


def _bytes_to_chars() -> dict[int, str]:
    """The byte -> printable character table byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


_BYTE_TO_CHAR = _bytes_to_chars()
_BYTE_ALPHABET = frozenset(_BYTE_TO_CHAR.values())


def _byte_level_spelling(token: str) -> str:
    """A token as the byte-level vocabulary spells it (some files store raw UTF-8 text)."""
    if set(token) <= _BYTE_ALPHABET:
        return token
    return "".join(_BYTE_TO_CHAR[b] for b in token.encode("utf-8"))


def byte_level_bpe(fields: Fields) -> Tokenizer:
    """``gpt2``: byte-level BPE from the tokens and merges."""
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFTokenizerError(f"unsupported pre-tokenizer {pre!r}; supported: "
                                 f"{', '.join(sorted(PRE_TOKENIZERS))}")
    tokens: list[str] = _need(fields, "tokenizer.ggml.tokens")
    vocab = {_byte_level_spelling(tok): i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in _need(fields, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _bos_processor(fields) or processors.ByteLevel(trim_offsets=False)
    # A token spelled outside the byte alphabet would get a new id if added as written.
    _add_special_tokens(tokenizer, fields, keep=lambda tok: set(tok) <= _BYTE_ALPHABET)
    return tokenizer


# -- sentencepiece BPE -------------------------------------------------------------------

def sentencepiece_bpe(fields: Fields) -> Tokenizer:
    """``llama``: sentencepiece pieces and scores as a BPE with byte fallback."""
    tokens: list[str] = _need(fields, "tokenizer.ggml.tokens")
    scores: list[float] = _need(fields, "tokenizer.ggml.scores")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk = special_token(fields, "unknown")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges_from_scores(tokens, scores),
                                     unk_token=unk, fuse_unk=True, byte_fallback=True))
    space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPACE, prepend_scheme="first" if space_prefix else "never", split=False)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(
        steps + ([decoders.Strip(content=" ", left=1)] if space_prefix else []))
    if (bos := _bos_processor(fields)) is not None:
        tokenizer.post_processor = bos
    _add_special_tokens(tokenizer, fields, keep=lambda tok: True)
    return tokenizer


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by sentencepiece scores: every split of a piece into two pieces
    of the vocabulary, the best-scoring (then longest-left) merges first."""
    ids = {tok: i for i, tok in enumerate(tokens)}
    candidates = []
    for tok, score in zip(tokens, scores, strict=True):
        splits = [(tok[:k], tok[k:]) for k in range(1, len(tok))]
        pairs = sorted((ids[a], ids[b], a, b) for a, b in splits if a in ids and b in ids)
        candidates += [(score, a, b) for _, _, a, b in pairs]
    candidates.sort(key=lambda c: (-c[0], -len(c[1]), -len(c[2])))
    return [(a, b) for _, a, b in candidates]


# -- shared ------------------------------------------------------------------------------

def _bos_processor(fields: Fields) -> processors.PostProcessor | None:
    bos, bos_id = special_token(fields, "bos"), fields.get("tokenizer.ggml.bos_token_id")
    if not adds_bos(fields) or bos is None:
        return None
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                         special_tokens=[(bos, bos_id)])


def _add_special_tokens(tokenizer: Tokenizer, fields: Fields,
                        keep: Callable[[str], bool]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens,
    so both are matched whole in text instead of being cut into pieces."""
    tokens: list[str] = _need(fields, "tokenizer.ggml.tokens")
    types = fields.get("tokenizer.ggml.token_type") or []
    kept = [(tok, kind) for tok, kind in zip(tokens, types, strict=False) if keep(tok)]
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False)
                                  for tok, kind in kept if kind == _CONTROL])
    tokenizer.add_tokens([AddedToken(tok, special=False, normalized=False)
                          for tok, kind in kept if kind == _USER_DEFINED])


TOKENIZER_MODELS: dict[str, Callable[[Fields], Tokenizer]] = {
    "gpt2": byte_level_bpe,
    "llama": sentencepiece_bpe,
}
