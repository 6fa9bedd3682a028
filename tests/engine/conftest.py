"""Tiny random HF models and the same weights loaded into kvrelay's model.

Weights are drawn with a fixed seed and a wide initialisation (plus random norm weights
and biases) so that logits are spread out and greedy choices are not near-ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from engine.config import ModelConfig
from engine.model import LlamaForCausalLM, build_model
from engine.runner import ModelRunner

VOCAB = 256

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 512, "initializer_range": 0.2,
    "eos_token_id": None, "bos_token_id": None, "pad_token_id": None}

# name -> (transformers config class, architecture, overrides)
CONFIGS: dict[str, tuple[type, str, dict[str, Any]]] = {
    "llama-gqa-llama3-rope-tied": (transformers.LlamaConfig, "LlamaForCausalLM", {
        "num_key_value_heads": 2, "tie_word_embeddings": True, "rope_theta": 50000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "mistral": (transformers.MistralConfig, "MistralForCausalLM", {
        "num_key_value_heads": 2, "tie_word_embeddings": False, "sliding_window": None}),
    "qwen2-qkv-bias-untied": (transformers.Qwen2Config, "Qwen2ForCausalLM", {
        "num_key_value_heads": 2, "tie_word_embeddings": False}),
    "llama-mqa-linear-rope": (transformers.LlamaConfig, "LlamaForCausalLM", {
        "num_key_value_heads": 1, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
}


@dataclass
class ModelPair:
    """An HF reference model and kvrelay's model holding the same weights."""

    hf: Any
    config: ModelConfig
    model: LlamaForCausalLM

    def runner(self, *, num_blocks: int = 256, block_size: int = 4,
               use_cache: bool = True) -> ModelRunner:
        return ModelRunner((self.config, self.model), num_blocks=num_blocks,
                           block_size=block_size, use_cache=use_cache)


def make_pair(name: str, seed: int = 0) -> ModelPair:
    config_cls, arch, overrides = CONFIGS[name]
    hf_config = config_cls(**_COMMON, **overrides)
    hf_config.architectures = [arch]
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in pname else 0.0))
    config = ModelConfig.from_hf(hf_config.to_dict())
    model = build_model(config)
    model.load_state_dict(hf.state_dict())
    return ModelPair(hf, config, model)


def llama_of(seed: int, **dims: Any) -> tuple[Any, ModelConfig, LlamaForCausalLM]:
    """A tiny HF Llama of the given dimensions (``vocab_size``, ``hidden_size``, ...) and
    kvrelay's model with its weights, for tests that need shapes of their own (a kernel's
    head dim or block width)."""
    hf_config = transformers.LlamaConfig(**{
        "num_hidden_layers": 2, "max_position_embeddings": 512, "initializer_range": 0.2,
        "eos_token_id": None, "bos_token_id": None, "pad_token_id": None, **dims})
    hf_config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    config = ModelConfig.from_hf(hf_config.to_dict())
    model = build_model(config)
    model.load_state_dict(hf.state_dict())
    return hf, config, model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest) -> ModelPair:
    return make_pair(request.param)


@pytest.fixture(scope="module")
def llama_pair() -> ModelPair:
    return make_pair("llama-gqa-llama3-rope-tied")


def prompts(n: int, seed: int = 1, lengths: tuple[int, ...] = (5, 13, 21, 30)) -> list[list[int]]:
    """``n`` random prompts of varied lengths (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (lengths[i % len(lengths)],), generator=g).tolist()
            for i in range(n)]


@pytest.fixture
def no_c_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ``cc``, ``gcc`` or ``$CC`` to build kvrelay's C kernels, and an empty kernel cache
    (the kernel modules' loaded kernels are reset by each test itself)."""
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(tmp_path))
    return tmp_path
