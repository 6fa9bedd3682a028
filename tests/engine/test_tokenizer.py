"""Tokenizer: encode/decode, chat templates, and streaming detokenization."""

from __future__ import annotations

import shutil
from pathlib import Path

import jinja2
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.tiny import CORPUS
from engine.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerLoadError

TEXTS = ["Hello world", " leading space and  two", "Café naïve 日本 😀",
         "line one\nline two\n\n\ttab", "2024 numbers: 3.14159"]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids_and_skipped_on_decode(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_eos_ids_and_vocab_size(tok: Tokenizer) -> None:
    assert tok.eos_token_ids == {tok.token_to_id("<|im_end|>")}
    assert tok.vocab_size == 768


def test_chat_template_renders_chatml(tok: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.has_chat_template
    assert tok.apply_chat_template(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("Hi<|im_end|>\n")


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(tok.backend, chat_template=template, special_tokens={"bos_token": "<s>"})


def test_chat_template_environment(tok: Tokenizer) -> None:
    t = _with_template(tok, "{{ bos_token }}{% for m in messages %}{{ m | tojson }}\n"
                            "{% endfor %}")
    assert t.apply_chat_template([{"role": "user", "content": "é"}]) == (
        '<s>{"role": "user", "content": "é"}\n')


def test_chat_template_raise_exception(tok: Tokenizer) -> None:
    t = _with_template(tok, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_is_sandboxed(tok: Tokenizer) -> None:
    t = _with_template(tok, "{{ messages.append(1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        t.apply_chat_template([])


def test_no_chat_template_raises(tok: Tokenizer) -> None:
    t = Tokenizer(tok.backend)
    assert not t.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_jinja_file_wins(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] | upper }}")
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "u", "content": "abc"}]) == "ABC"


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_detokenizer_holds_back_partial_characters(tok: Tokenizer) -> None:
    ids = tok.encode("a😀b")
    assert len(ids) > 3  # the emoji is several byte-level pieces
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert deltas[0] == "a"
    assert "😀" in deltas and all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "a😀b" and detok.flush() == ""


def test_detokenizer_flushes_an_unfinished_character(tok: Tokenizer) -> None:
    ids = tok.encode("😀")[:-1]
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in ids) == ""
    assert detok.flush() == tok.decode(ids)


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=767), max_size=40),
       skip_special=st.booleans())
def test_detokenizer_deltas_concatenate_to_decode(tok: Tokenizer, ids: list[int],
                                                  skip_special: bool) -> None:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) + detok.flush() == tok.decode(ids, skip_special)


# Sentencepiece-style decoders drop the leading space of a text's first word.
SENTENCEPIECE_DECODERS = {
    "metaspace": lambda: tokenizers.decoders.Metaspace(prepend_scheme="first"),
    "llama2-chain": lambda: tokenizers.decoders.Sequence([
        tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(),
        tokenizers.decoders.Fuse(), tokenizers.decoders.Strip(" ", 1, 0)]),
}


SP_VOCAB = 400


@pytest.fixture(scope="module", params=sorted(SENTENCEPIECE_DECODERS))
def sp_tok(request: pytest.FixtureRequest) -> Tokenizer:
    """A small sentencepiece-style BPE (words start with U+2581) trained on the tiny corpus."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = SENTENCEPIECE_DECODERS[request.param]()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=SP_VOCAB, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        show_progress=False)
    backend.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    assert backend.get_vocab_size() == SP_VOCAB
    return Tokenizer(backend)


def test_sentencepiece_style_streaming_keeps_word_spaces(sp_tok: Tokenizer) -> None:
    ids = sp_tok.encode("<|im_start|>Hello world again")
    detok = IncrementalDetokenizer(sp_tok)
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == sp_tok.decode(ids) == "Hello world again"


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=SP_VOCAB - 1), max_size=30),
       skip_special=st.booleans())
def test_sentencepiece_style_deltas_concatenate_to_decode(sp_tok: Tokenizer, ids: list[int],
                                                          skip_special: bool) -> None:
    detok = IncrementalDetokenizer(sp_tok, skip_special_tokens=skip_special)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) + detok.flush() == sp_tok.decode(ids, skip_special)
