"""Tokenizer: encode/decode, chat templates, and streaming detokenization."""

from __future__ import annotations

import shutil
from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
