"""Model configuration: one frozen dataclass that every part of the runtime reads.

It is built from a HuggingFace ``config.json`` dict (``ModelConfig.from_hf``) and is the
only description of a model's shape that the rest of kvrelay uses. Its canonical JSON
form (``canonical_json``) goes into the cache-store fingerprint, so any field that changes
the bytes of a KV block must be here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


class ModelConfigError(ValueError):
    """A config.json that kvrelay cannot run: names the field that is wrong."""


# Architecture name (config.json "architectures"[0]) -> the family flags it implies.
# All three share one Llama-family implementation; only these defaults differ.
SUPPORTED_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"attention_bias": False},
    "MistralForCausalLM": {"attention_bias": False},
    "Qwen2ForCausalLM": {"attention_bias": True},
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family causal LM.

    ``num_kv_heads`` < ``num_heads`` is GQA (1 is MQA). ``attention_bias`` adds biases to the
    q/k/v projections (Qwen2). ``rope_scaling`` is the HF dict (``rope_type`` "llama3",
    "linear", ...) or None. ``sliding_window`` is recorded but kvrelay attends to the full
    context (it refuses prompts longer than ``max_position_embeddings``).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"config field {name!r} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")

    @property
    def kv_bytes_per_token_per_element(self) -> int:
        """K and V elements per token over all layers (multiply by the dtype's size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a HuggingFace config.json dict; raise ModelConfigError naming the problem."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise ModelConfigError("config.json has no 'architectures' entry")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {arch!r}; supported: "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        family = SUPPORTED_ARCHITECTURES[arch]

        def need(key: str) -> Any:
            if key not in cfg:
                raise ModelConfigError(f"config.json is missing {key!r}")
            return cfg[key]

        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        rope = cfg.get("rope_parameters") or {}  # transformers 5 writes rope settings here
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=cfg.get("rope_scaling") or _scaling_of(rope),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", family["attention_bias"])),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True)
            else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def canonical_json(self) -> str:
        """Deterministic JSON of every field (sorted keys, no whitespace): fingerprint input."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


def _scaling_of(rope_parameters: dict[str, Any]) -> dict[str, Any] | None:
    """The rope scaling part of a ``rope_parameters`` dict; None for plain rope."""
    scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    return scaling if scaling.get("rope_type", "default") != "default" else None
