"""The built-in tiny model: deterministic, and loaded alike by kvrelay and transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file

from engine.engine import LLMEngine
from engine.loader import load_model
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from engine.tiny import write_tiny_model
from engine.tokenizer import Tokenizer

TEXTS = ["Hello world", "  two leading spaces", "Café naïve über 日本 中文 привет 😀",
         "<|im_start|>user\nWhat is 2024 + 3.14?<|im_end|>\n", "tabs\tand\r\nnewlines\n\n",
         "don't we'll THEY'RE"]
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? 日本"}]

# (architecture, overrides): each loads in kvrelay and transformers and generates alike.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {}),
    "llama-mqa-tied-llama3-rope": ("LlamaForCausalLM", {
        "num_key_value_heads": 1, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "llama-mlp-bias": ("LlamaForCausalLM", {"mlp_bias": True, "num_hidden_layers": 3}),
    "mistral-mha": ("MistralForCausalLM", {"num_key_value_heads": 4}),
    "qwen2-bias": ("Qwen2ForCausalLM", {"hidden_size": 96, "num_attention_heads": 6,
                                        "num_key_value_heads": 2}),
}


def test_same_seed_gives_identical_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = write_tiny_model(tmp_path / "again")
    for f in sorted(tiny_model_dir.iterdir()):
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name


def test_seed_changes_weights_only(tmp_path: Path, tiny_model_dir: Path) -> None:
    other = write_tiny_model(tmp_path / "other", seed=1)
    a, b = load_file(tiny_model_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    tokenizer_file = (tiny_model_dir / "tokenizer.json").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == tokenizer_file


def test_overrides_reach_config_and_weights(tmp_path: Path) -> None:
    d = write_tiny_model(tmp_path / "m", architecture="Qwen2ForCausalLM",
                         num_key_value_heads=1, tie_word_embeddings=True, torch_dtype="bfloat16")
    config = json.loads((d / "config.json").read_text())
    weights = load_file(d / "model.safetensors")
    assert config["num_key_value_heads"] == 1 and config["model_type"] == "qwen2"
    assert "lm_head.weight" not in weights
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (16, 64)
    assert weights["model.layers.0.self_attn.q_proj.bias"].dtype == torch.bfloat16


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        write_tiny_model(tmp_path, architecture="GPT2LMHeadModel")


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenization_matches_transformers(tiny_model_dir: Path, hf_tokenizer: Any,
                                           text: str) -> None:
    ours = Tokenizer.from_dir(tiny_model_dir)
    assert ours.encode(text) == hf_tokenizer.encode(text)
    ids = ours.encode(text)
    assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(tiny_model_dir: Path, hf_tokenizer: Any,
                                            generation_prompt: bool) -> None:
    ours = Tokenizer.from_dir(tiny_model_dir).apply_chat_template(CHAT, generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(CHAT, tokenize=False,
                                              add_generation_prompt=generation_prompt)
    assert ours == theirs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generation_matches_transformers(tmp_path: Path, variant: str) -> None:
    arch, overrides = VARIANTS[variant]
    d = write_tiny_model(tmp_path, architecture=arch, **overrides)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    loaded = load_model(str(d))
    engine = LLMEngine(ModelRunner(loaded, num_blocks=64, block_size=8), loaded.tokenizer)
    chat = loaded.tokenizer.apply_chat_template(CHAT[:2])
    prompt = loaded.tokenizer.encode(chat, add_special_tokens=False)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    ours = engine.generate([prompt], params)[0].token_ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16,
                          do_sample=False)
    assert ours == out[0, len(prompt):].tolist()


def test_greedy_choices_are_not_near_ties(tiny_model_dir: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = Tokenizer.from_dir(tiny_model_dir).encode("The capital of France is Paris. " * 4)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]  # (T, V)
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
