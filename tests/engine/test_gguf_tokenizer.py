"""Tokenizers rebuilt from GGUF metadata against transformers' reading of the same file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest
import tokenizers
import transformers

from engine.gguf_tokenizer import GGUFTokenizerError, build_tokenizer, merges_from_scores
from engine.tiny import CORPUS

TEXTS = ["Hello world", " leading space", "two  spaces and\nnew\n\nlines\ttab",
         "Café naïve 日本語 😀 ", "<s>the capital</s> of France", "In 2024, 3.14 people"]
SPECIALS = ["<unk>", "<s>", "</s>"]


def _sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and token types of a small sentencepiece-style BPE (byte fallback)."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=500, show_progress=False)
    backend.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    learned = sorted(backend.get_vocab().items(), key=lambda kv: kv[1])
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    pieces = SPECIALS + byte_pieces + [p for p, _ in learned]
    scores = [0.0] * (len(SPECIALS) + 256) + [-float(i) for _, i in learned]  # merge order
    types = [2, 3, 3] + [6] * 256 + [1] * len(learned)
    return pieces, scores, types


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pieces, scores, types = _sentencepiece_vocab()
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def hf_spm(spm_gguf: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(spm_gguf.parent, gguf_file=spm_gguf.name)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_matches_transformers(spm_gguf: Path, hf_spm: Any, text: str) -> None:
    ours = build_tokenizer(_fields(spm_gguf))
    ids = ours.encode(text).ids
    assert ids == hf_spm.encode(text)
    assert ids[0] == 1  # BOS: sentencepiece vocabularies add it unless told otherwise
    assert ours.decode(ids) == hf_spm.decode(ids, skip_special_tokens=True)


def test_sentencepiece_falls_back_to_bytes(spm_gguf: Path) -> None:
    ours = build_tokenizer(_fields(spm_gguf))
    assert "猫" not in CORPUS
    pieces = ours.encode("猫").tokens
    assert pieces[1:] == ["▁", "<0xE7>", "<0x8C>", "<0xAB>"]
    assert ours.decode(ours.encode("猫").ids) == "猫"


def test_merges_follow_scores() -> None:
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0]
    assert merges_from_scores(tokens, scores) == [("b", "c"), ("a", "b"), ("ab", "c"),
                                                  ("a", "bc")]


def test_unknown_tokenizer_model_is_named() -> None:
    with pytest.raises(GGUFTokenizerError, match="'bert'"):
        build_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": []})


def test_unknown_pre_tokenizer_is_named() -> None:
    with pytest.raises(GGUFTokenizerError, match="'tekken'"):
        build_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "tekken",
                         "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []})
