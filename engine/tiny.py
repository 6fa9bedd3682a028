"""A tiny deterministic random-weight model, built locally with no download.

``write_tiny_model`` writes a complete HuggingFace-format directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with a ChatML chat template,
generation_config.json) that both kvrelay and HF transformers load. Tests use it as the
reference model, and it is the default model when no demo model is installed.

The tokenizer is a byte-level BPE trained on ``CORPUS`` below. Weights are drawn from one
seeded generator with scales chosen so the logits are spread wide (std of a few units): the
greedy choice of the random model is never a near-tie that float noise could flip.
Same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB_SIZE = 768

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Architecture -> config.json model_type and which attention projections carry a bias
# (given the config's attention_bias flag).
_FAMILIES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"model_type": "llama", "bias": lambda flag: ("q", "k", "v", "o") if flag
                         else ()},
    "MistralForCausalLM": {"model_type": "mistral", "bias": lambda flag: ()},
    "Qwen2ForCausalLM": {"model_type": "qwen2", "bias": lambda flag: ("q", "k", "v")},
}

_DEFAULT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "torch_dtype": "float32",
    "use_cache": True,
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CORPUS = """\
The little town sat beside a wide, slow river. Every morning the baker opened her shop
before the sun was up, and the smell of fresh bread drifted down the quiet street. The
children walked to school along the river path, counting boats and talking about the
weather, the games they would play, and the stories their teachers would tell them.
In the afternoon the market filled with people. Farmers brought apples, pears, carrots
and potatoes; the fisherman sold what he had caught at dawn; the old clockmaker repaired
watches at a small table under a green umbrella. What is the time? Ask the clockmaker,
he always knows. Where is the library? It is next to the school, across from the park.
A model reads text as tokens. Each token is a small piece of a word, a whole word, a
number such as 42 or 2024, or a sign like a comma, a period, a question mark or a quote.
The model looks at the tokens it has seen and predicts the next one, again and again,
until the answer is complete or it writes a special token that means the end.
Questions and answers: What is the capital of France? The capital of France is Paris.
What is the largest planet? Jupiter is the largest planet in our solar system. How many
days are in a week? There are seven days in a week. Which season comes after winter?
Spring comes after winter, and then summer, autumn and winter again.
The engineers of the town built a new bridge over the river. They measured the water,
tested the stone and steel, and wrote careful notes about every step of their work.
When the bridge was finished, the whole town came to walk across it, and the mayor
thanked everyone who had helped. "It is strong, simple and beautiful," she said.
Café, naïve, über, ångström, 日本, 中文, привет, مرحبا and 😀 are words and signs from other places.
"""


def write_tiny_model(out_dir: str | Path, *, architecture: str = "LlamaForCausalLM",
                     seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random ``architecture`` model into ``out_dir`` and return its path.

    ``overrides`` are config.json keys (``num_key_value_heads``, ``rope_scaling``,
    ``tie_word_embeddings``, ``attention_bias``, ``hidden_size``, ``torch_dtype`` ...).
    """
    if architecture not in _FAMILIES:
        raise ValueError(f"unsupported architecture {architecture!r}; "
                         f"choose one of {', '.join(sorted(_FAMILIES))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}  # the trainer puts them first
    config = _config(architecture, tokenizer.get_vocab_size(), ids, overrides)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "config.json", config)
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
    })
    tensors = dict(_random_weights(config, seed))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def train_tokenizer() -> Tokenizer:
    """Byte-level BPE with ChatML special tokens, trained on the embedded corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, min_frequency=1, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def _config(architecture: str, vocab_size: int, ids: dict[str, int],
            overrides: dict[str, Any]) -> dict[str, Any]:
    config = {"architectures": [architecture],
              "_name_or_path": "kvrelay-tiny",
              "model_type": _FAMILIES[architecture]["model_type"],
              **_DEFAULT_CONFIG,
              "vocab_size": vocab_size,
              "bos_token_id": ids["<|endoftext|>"],
              "eos_token_id": ids["<|im_end|>"],
              "pad_token_id": ids["<|endoftext|>"]}
    if architecture == "LlamaForCausalLM":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config["sliding_window"] = None
    if architecture == "Qwen2ForCausalLM":
        config["use_sliding_window"] = False
    config.update(overrides)
    if "head_dim" not in overrides and "hidden_size" in overrides:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    return config


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": _DEFAULT_CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _random_weights(config: dict[str, Any], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in HF naming, drawn in a fixed order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    dtype = _DTYPES[config["torch_dtype"]]
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return normal(out_f, in_f, std=1.0 / math.sqrt(in_f))

    def norm() -> torch.Tensor:
        return (1.0 + torch.randn(h, generator=gen) * 0.1).to(dtype)

    biased = _FAMILIES[config["architectures"][0]]["bias"](config.get("attention_bias", False))
    proj_shapes = {"q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h), "o": (h, q_out)}
    mlp_shapes = {"gate": (inter, h), "up": (inter, h), "down": (h, inter)}
    yield "model.embed_tokens.weight", normal(vocab, h, std=1.0)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", norm()
        for name, shape in proj_shapes.items():
            yield f"{p}.self_attn.{name}_proj.weight", linear(*shape)
            if name in biased:
                yield f"{p}.self_attn.{name}_proj.bias", normal(shape[0], std=0.1)
        yield f"{p}.post_attention_layernorm.weight", norm()
        for name, shape in mlp_shapes.items():
            yield f"{p}.mlp.{name}_proj.weight", linear(*shape)
            if config.get("mlp_bias"):
                yield f"{p}.mlp.{name}_proj.bias", normal(shape[0], std=0.1)
    yield "model.norm.weight", norm()
    if not config["tie_word_embeddings"]:
        yield "lm_head.weight", normal(vocab, h, std=3.0 / math.sqrt(h))
