"""Tokenizers rebuilt from GGUF metadata against transformers' reading of the same file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest
import tokenizers
import transformers

from engine.gguf_tokenizer import GGUFTokenizerError, build_tokenizer, merges_from_scores
from engine.tiny import CORPUS, train_tokenizer
from engine.tiny import SPECIAL_TOKENS as TINY_SPECIALS

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


def _byte_level_gguf(directory: Path, pre: str, add_bos: bool) -> Path:
    """A metadata-only GGUF holding the tiny model's byte-level BPE under ``pre``."""
    backend = train_tokenizer()
    vocab = sorted(backend.get_vocab(), key=backend.get_vocab().get)
    merges = json.loads(backend.to_str())["model"]["merges"]
    path = directory / f"{pre}-{add_bos}.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab)
    w.add_token_merges([" ".join(m) for m in merges])
    w.add_token_types([3 if tok in TINY_SPECIALS else 1 for tok in vocab])
    w.add_bos_token_id(vocab.index("<|endoftext|>"))
    w.add_eos_token_id(vocab.index("<|im_end|>"))
    w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(("pre", "add_bos"), [("default", False), ("llama-bpe", True),
                                              ("qwen2", False)])
def test_byte_level_matches_transformers(tmp_path: Path, pre: str, add_bos: bool) -> None:
    path = _byte_level_gguf(tmp_path, pre, add_bos)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = build_tokenizer(_fields(path))
    for text in [*TEXTS, "12345 digits 007", "<|im_start|>user\nhi<|im_end|>"]:
        ids = ours.encode(text).ids
        assert ids == theirs.encode(text), text
        assert (ids[0] == ours.token_to_id("<|endoftext|>")) == add_bos


def test_smollm_splits_digits_one_by_one(tmp_path: Path) -> None:
    """As SmolLM2 was trained (its vocabulary has no token holding a digit and anything
    else); a vocabulary with digit merges shows the split."""
    smollm = build_tokenizer(_fields(_byte_level_gguf(tmp_path, "smollm", False)))
    default = build_tokenizer(_fields(_byte_level_gguf(tmp_path, "default", False)))
    assert smollm.encode("In 2024").tokens == ["In", "Ġ", "2", "0", "2", "4"]
    assert len(default.encode("In 2024").tokens) < 6


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
