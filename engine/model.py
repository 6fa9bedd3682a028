"""Llama-family causal LM in plain torch (Llama 2/3, Mistral, Qwen2), HF parameter names.

An HF state dict loads with ``load_state_dict`` as it is. ``fuse_()`` (called by the
runner once weights are loaded and placed) concatenates q/k/v and gate/up into single
matrices, stores every projection column-major, and re-points the HF-named parameters at
views of them, so the forward runs two matmuls fewer per layer and streams each weight
once per decode step, while ``state_dict``/``load_state_dict`` keep working. Projections
go through ``engine.matmul.linear``, which uses the product form measured fastest on this
machine for the row count (``projection_groups`` hands it the weights to measure).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, MixedMetadata, paged_attention
from engine.config import ModelConfig
from engine.matmul import linear
from engine.rope import apply_rope_, inverse_frequencies

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, signed sin (engine.rope): (B, T, 1, hd) each


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 (then cast, then scaled) like the reference."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _column_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) stored with each input feature's column contiguous.

    ``F.linear`` then multiplies one row by a plain row-major (in, out) matrix, which CPU
    BLAS streams once instead of repacking it: ~1.3-1.7x faster for single-row decode.
    """
    return weight.t().contiguous().t()


def _fuse(owner: nn.Module, name: str, parts: list[nn.Linear], attr: str) -> None:
    """Register cat(parts.<attr>) on ``owner`` as ``name`` and make each part a view of it."""
    tensors = [getattr(p, attr) for p in parts]
    if tensors[0] is None:
        owner.register_buffer(name, None, persistent=False)
        return
    fused = torch.cat([t.detach() for t in tensors])
    if attr == "weight":
        fused = _column_major(fused)
    owner.register_buffer(name, fused, persistent=False)
    start = 0
    for t in tensors:
        t.data = fused[start:start + t.shape[0]]
        start += t.shape[0]


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary positions over paged KV memory."""

    qkv_weight: torch.Tensor  # (H*hd + 2*kvh*hd, D), set by fuse_()
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor  # (D, H*hd), set by fuse_()

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hd, bias = config.head_dim, config.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * hd, config.hidden_size, bias=False)

    def fuse_(self) -> None:
        parts = [self.q_proj, self.k_proj, self.v_proj]
        _fuse(self, "qkv_weight", parts, "weight")
        _fuse(self, "qkv_bias", parts, "bias")
        _fuse(self, "o_weight", [self.o_proj], "weight")

    def forward(self, x: torch.Tensor, rope: Rope, kv_layer: torch.Tensor | None,
                meta: AttentionMetadata | MixedMetadata) -> torch.Tensor:
        b, t, _ = x.shape
        h, kvh, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = linear(x, self.qkv_weight, self.qkv_bias).view(b, t, h + 2 * kvh, hd)
        apply_rope_(qkv[:, :, :h + kvh], *rope)  # q and k rotated in place
        kv = qkv[:, :, h:].view(b, t, 2, kvh, hd)  # (B, T, 2, kvh, hd): k then v
        out = paged_attention(qkv[:, :, :h], kv, kv_layer, meta)  # (B, T, H*hd)
        return linear(out, self.o_weight)


MLP_TILE_ROWS = 512
"""Most rows one CPU pass takes through the MLP at once; longer passes go through it in
equal tiles of at most this many rows. The gate/up product of N rows is N x 2 x I floats
(12 KB a row for SmolLM2-135M): for a 2048-token prefill 25 MB, which silu, the product
and the down projection each stream from memory again, where a 512-row tile's 6 MB stays
in the last-level cache. On a 2-core AMD EPYC (32 MB L3), SmolLM2-135M in fp32: a
2048-token prefill 3.14-3.16 s -> 2.49-2.59 s, three 544-token prompts in one pass
1.52-2.00 s -> 1.40-1.49 s (one alone 0.53-0.57 s); logits unchanged bit for bit. Rows
are independent in the MLP, so tiling changes nothing but where the activations live."""


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    gate_up_weight: torch.Tensor  # (2*I, D), set by fuse_()
    gate_up_bias: torch.Tensor | None
    down_weight: torch.Tensor  # (D, I), set by fuse_()

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, i, bias=bias)
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)

    def fuse_(self) -> None:
        parts = [self.gate_proj, self.up_proj]
        _fuse(self, "gate_up_weight", parts, "weight")
        _fuse(self, "gate_up_bias", parts, "bias")
        _fuse(self, "down_weight", [self.down_proj], "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (N, D): every row's MLP is its own
        n = rows.shape[0]
        if n <= MLP_TILE_ROWS or x.device.type != "cpu":
            return self._rows(x)
        out = torch.empty_like(rows)
        step = -(-n // -(-n // MLP_TILE_ROWS))  # equal tiles of at most MLP_TILE_ROWS
        for start in range(0, n, step):
            out[start:start + step] = self._rows(rows[start:start + step])
        return out.view(x.shape)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)  # (..., I) x2
        return linear(F.silu(gate) * up, self.down_weight, self.down_proj.bias)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm transformer block: attention then MLP, each with a residual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: Rope, kv_layer: torch.Tensor | None,
                meta: AttentionMetadata | MixedMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_layer, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # An explicit weight skips Embedding's normal_ init (build_model says why).
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The causal LM: ``forward`` gives final hidden states, ``logits`` projects chosen rows."""

    head_weight: torch.Tensor  # (V, D), set by fuse_()

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self._register_load_state_dict_pre_hook(_fill_tied_head)
        self.tie_weights_()

    def tie_weights_(self) -> None:
        """Share the embedding with the head when the config ties them (again after moves)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_(self) -> None:
        """Lay weights out for inference (call once weights are loaded and placed).

        q/k/v and gate/up are concatenated; every projection is stored column-major with the
        HF-named parameters left as views. A tied head gets its own column-major copy for
        logits (the embedding keeps rows, for lookups), so reload weights before fusing, not
        after.
        """
        for module in self.modules():
            if isinstance(module, (LlamaAttention, LlamaMLP)):
                module.fuse_()
        if self.config.tie_word_embeddings:
            head = _column_major(self.lm_head.weight.detach())
            self.register_buffer("head_weight", head, persistent=False)
        else:
            _fuse(self, "head_weight", [self.lm_head], "weight")

    def projection_groups(self) -> list[list[torch.Tensor]]:
        """The fused projection weights grouped by role (qkv, o, gate/up, down), every
        layer's in each group, for ``engine.matmul.tune`` (call after ``fuse_``)."""
        layers = self.model.layers
        return [[getattr(layer.self_attn, name) for layer in layers]
                for name in ("qkv_weight", "o_weight")] + [
                [getattr(layer.mlp, name) for layer in layers]
                for name in ("gate_up_weight", "down_weight")]

    def forward(self, input_ids: torch.Tensor, rope: Rope, kv: torch.Tensor | None,
                meta: AttentionMetadata | MixedMetadata,
                between_layers: Callable[[], None] | None = None) -> torch.Tensor:
        """input_ids (B, T) -> normed hidden states (B, T, D); ``kv`` is the pool tensor or None.

        ``between_layers`` is called after every decoder layer but the last (a worker that
        shares its cores hands them over there, ``ModelRunner.between_layers``)."""
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, None if kv is None else kv[:, i], meta)
            if between_layers is not None and i < last:
                between_layers()
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, D) -> logits (N, V) in float32 (the head goes through the tuned plan)."""
        return linear(hidden, self.head_weight).float()


def _fill_tied_head(state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Tied checkpoints may omit ``lm_head.weight``: it is the embedding."""
    embed = state_dict.get(prefix + "model.embed_tokens.weight")
    if embed is not None:
        state_dict.setdefault(prefix + "lm_head.weight", embed)


# config.json architecture -> model class. The three families share one implementation;
# their differences (qkv bias, tying, rope scaling) are all in ModelConfig.
MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def build_model(config: ModelConfig, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> LlamaForCausalLM:
    """An unfused model of ``config``'s architecture with uninitialised weights on ``device``.

    Load a state dict into it, then call ``fuse_()`` (the runner does). Raises
    ModelConfigError for a rope scaling type kvrelay does not implement.
    """
    inverse_frequencies(config)
    with torch.device("meta"):
        model = MODEL_REGISTRY[config.architecture](config)
    # Each parameter is replaced by torch.empty on the target device rather than through
    # Module.to_empty: empty_like and normal_ on meta tensors run torch's Python reference
    # ops, whose first use imports sympy and torch._dynamo, 15-80 s of a worker's start
    # on a busy 2-core machine, for values that are overwritten anyway.
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            setattr(module, name, nn.Parameter(
                torch.empty(param.shape, dtype=dtype, device=device),
                requires_grad=param.requires_grad))
    model.tie_weights_()
    return model
