"""Convert a Llama-family GGUF file into a HuggingFace-format model directory.

Reading and dequantizing use the ``gguf`` package: llama.cpp's own GGUF reader and
dequantizers (``gguf.GGUFReader``, ``gguf.quants.dequantize``), maintained alongside the
format itself. This module adds what a GGUF does not spell the HF way:

- tensor names (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``);
- llama.cpp stores q/k projection rows permuted for its rotary kernel (the two rotary halves
  of each head interleaved); the permutation is undone here so the HF rotary layout applies;
- ``config.json`` from the ``<arch>.*`` keys; ``tokenizer.json`` (built by
  ``engine.gguf_tokenizer``), the chat template and bos/eos ids from ``tokenizer.*``.

Weights are written dequantized as float32 (the dequantized values are exact in float32);
``load_model`` casts them to the requested dtype.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file

from engine.gguf_tokenizer import GGUFTokenizerError, adds_bos, build_tokenizer, special_token

# Bump when the converter's output changes, so cached conversions are redone.
CONVERTER_VERSION = 3


class GGUFConversionError(ValueError):
    """A GGUF file kvrelay cannot convert: names the key, tensor or feature at fault."""


@dataclass(frozen=True)
class _Family:
    architecture: str
    model_type: str
    rope_permuted: bool  # llama.cpp permutes q/k rows for this family


GGUF_FAMILIES: dict[str, _Family] = {
    "llama": _Family("LlamaForCausalLM", "llama", rope_permuted=True),
    "qwen2": _Family("Qwen2ForCausalLM", "qwen2", rope_permuted=False),
}

_ROPE_FREQS = "rope_freqs.weight"
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path,
                 progress: Callable[[str], None] = lambda _: None) -> Path:
    """Write ``gguf_path`` as an HF-format directory into ``out_dir`` (created if needed);
    ``progress`` receives a line per step."""
    reader = GGUFReader(str(gguf_path))
    meta = _Metadata(reader)
    family = _family(meta)
    config = hf_config(meta, family, reader)
    config["_name_or_path"] = Path(gguf_path).stem
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress(f"building tokenizer from {Path(gguf_path).name}")
    write_tokenizer_files(meta, out, config["max_position_embeddings"])
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None})
    progress(f"dequantizing {len(reader.tensors)} tensors")
    tensors = dict(hf_tensors(reader, config, family))
    progress("writing model.safetensors")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


class _Metadata:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, reader: GGUFReader) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def with_prefix(self, prefix: str) -> dict[str, Any]:
        return {k: f.contents() for k, f in self._fields.items() if k.startswith(prefix)}

    def need(self, key: str) -> Any:
        if key not in self._fields:
            raise GGUFConversionError(f"GGUF metadata is missing {key!r}")
        return self.get(key)


def _family(meta: _Metadata) -> _Family:
    arch = meta.need("general.architecture")
    if arch not in GGUF_FAMILIES:
        raise GGUFConversionError(f"unsupported GGUF architecture {arch!r}; supported: "
                                  f"{', '.join(sorted(GGUF_FAMILIES))}")
    return GGUF_FAMILIES[arch]


def hf_config(meta: _Metadata, family: _Family, reader: GGUFReader) -> dict[str, Any]:
    """config.json for the model the GGUF metadata describes."""
    arch = meta.need("general.architecture")

    def key(name: str) -> str:
        return f"{arch}.{name}"

    names = {t.name for t in reader.tensors}
    heads = int(meta.need(key("attention.head_count")))
    hidden = int(meta.need(key("embedding_length")))
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": len(meta.need("tokenizer.ggml.tokens")),
        "hidden_size": hidden,
        "intermediate_size": int(meta.need(key("feed_forward_length"))),
        "num_hidden_layers": int(meta.need(key("block_count"))),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(key("attention.head_count_kv"), heads)),
        "head_dim": int(meta.get(key("attention.key_length"), hidden // heads)),
        "max_position_embeddings": int(meta.get(key("context_length"), 2048)),
        "rms_norm_eps": _f32(meta.need(key("attention.layer_norm_rms_epsilon"))),
        "rope_theta": _f32(meta.get(key("rope.freq_base"), 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    rope_freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    config["rope_scaling"] = (_rope_scaling(meta, arch) if rope_freqs is None else llama3_scaling(
        dequantize(rope_freqs.data, rope_freqs.tensor_type), config["head_dim"],
        config["rope_theta"], int(meta.get(key("rope.scaling.original_context_length"), 8192))))
    return config


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (1e-05,
    not 9.999999747378752e-06): the value the model's own config held."""
    return float(str(np.float32(value)))


def _rope_scaling(meta: _Metadata, arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise GGUFConversionError(f"unsupported rope scaling type {kind!r}")
    return {"rope_type": "linear", "factor": _f32(meta.need(f"{arch}.rope.scaling.factor"))}


def llama3_scaling(rope_freqs: np.ndarray, head_dim: int, theta: float,
                   original_length: int) -> dict[str, Any]:
    """llama3 rope scaling recovered from llama.cpp's per-frequency divisors (``rope_freqs``).

    Frequency i is divided by 1 at short wavelengths, by ``factor`` at long ones, and by
    ``1 / ((1 - s) / factor + s)`` between, where ``s = (L / wavelen - low) / (high - low)``
    is linear in ``1 / wavelen``. A line fitted through the in-between frequencies gives
    ``low`` and ``high`` for the chosen ``L`` (the three act only through that line, so any
    ``L`` gives the same frequencies; the file's original context length or Llama 3's 8192).
    """
    divisors = np.asarray(rope_freqs, dtype=np.float64)
    factor = float(divisors.max())
    between = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if between.sum() < 2:
        raise GGUFConversionError("cannot recover llama3 rope scaling from rope_freqs: fewer "
                                  "than two frequencies between the scaled and unscaled ones")
    inv_wavelen = theta ** -(np.arange(0, head_dim, 2) / head_dim) / (2 * np.pi)  # (hd/2,)
    smooth = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_wavelen[between], smooth, 1)
    span = original_length / slope  # high - low
    low = -intercept * span

    def rounded(v: float) -> float:
        return float(f"{v:.5g}")

    return {"rope_type": "llama3", "factor": rounded(factor), "low_freq_factor": rounded(low),
            "high_freq_factor": rounded(low + span),
            "original_max_position_embeddings": original_length}


def hf_tensors(reader: GGUFReader, config: dict[str, Any],
               family: _Family) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor, dequantized, q/k rows un-permuted."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:  # folded into config.json's rope_scaling
            continue
        name, kind = hf_tensor_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest first
        data = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if family.rope_permuted and kind in heads:
            data = unpermute_rope_rows(data, heads[kind])
        yield name, torch.from_numpy(np.ascontiguousarray(data))


def hf_tensor_name(gguf_name: str) -> tuple[str, str]:
    """``blk.3.attn_q.weight`` -> (``model.layers.3.self_attn.q_proj.weight``, ``attn_q``)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}", parts[2]
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}", parts[0]
    raise GGUFConversionError(f"unsupported GGUF tensor {gguf_name!r}")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Restore HF's q/k row order from llama.cpp's.

    Per head, llama.cpp interleaves the two rotary halves (its row ``2*i + j`` is HF's row
    ``j*half + i``); this puts them back one after the other.
    w: (n_heads * head_dim, ...) weight or (n_heads * head_dim,) bias.
    """
    rest = w.shape[1:]
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def write_tokenizer_files(meta: _Metadata, out: Path, max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json (special tokens, chat template)."""
    fields = meta.with_prefix("tokenizer.")
    try:
        build_tokenizer(fields).save(str(out / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": adds_bos(fields),
        }
        for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                          ("pad_token", "padding")):
            config[name] = special_token(fields, key)
    except GGUFTokenizerError as e:
        raise GGUFConversionError(str(e)) from e
    if (template := fields.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    _write_json(out / "tokenizer_config.json", config)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")
