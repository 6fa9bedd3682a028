"""Rotary position embeddings: inverse frequencies per ``rope_type`` and a cos/sin table.

The table is computed once (and grown when a longer position is asked for), in float32
as ``position * inv_freq`` exactly as HuggingFace computes it, so positions agree bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from engine.config import ModelConfig, ModelConfigError


def _default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta ** exponents)  # (hd/2,)


def _linear(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    return inv_freq / float(scaling["factor"])


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


# rope_type -> transform of the default inverse frequencies. Types whose frequencies depend
# on the running sequence length (dynamic NTK) or that rescale cos/sin (yarn) are refused.
ROPE_SCALINGS: dict[str, Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]] = {
    "default": lambda inv_freq, _: inv_freq,
    "linear": _linear,
    "llama3": _llama3,
}


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """The ``(head_dim / 2,)`` float32 inverse frequencies of ``config``'s rotary embedding."""
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_SCALINGS:
        raise ModelConfigError(
            f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(ROPE_SCALINGS)}")
    return ROPE_SCALINGS[rope_type](_default_inv_freq(config.head_dim, config.rope_theta), scaling)


class RotaryTable:
    """cos/sin of every position up to the longest asked for, ``(P, head_dim)`` float32.

    ``sin`` is stored with its first half negated so that rotation needs no negation:
    ``rotate_half(x) * sin == roll(x, half) * signed_sin``.
    """

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.inv_freq = inverse_frequencies(config).to(device)
        self.cos = torch.empty(0, config.head_dim, device=device)
        self.signed_sin = torch.empty(0, config.head_dim, device=device)

    def ensure(self, length: int) -> None:
        """Make the table cover positions ``[0, length)`` (grows by doubling)."""
        if length <= self.cos.shape[0]:
            return
        size = max(length, 2 * self.cos.shape[0], 256)
        positions = torch.arange(size, device=self.inv_freq.device).float()
        freqs = positions[:, None] * self.inv_freq[None, :]  # (P, hd/2)
        self.cos = torch.cat((freqs, freqs), dim=-1).cos()  # (P, hd)
        self.signed_sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)  # (P, hd)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for ``positions`` (B, T), as (B, T, 1, hd) in ``dtype``."""
        return (self.cos[positions].unsqueeze(2).to(dtype),
                self.signed_sin[positions].unsqueeze(2).to(dtype))


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, T, heads, hd) in place by the angles in cos/signed_sin (B, T, 1, hd)."""
    rotated = x.roll(x.shape[-1] // 2, dims=-1)  # (x2, x1): rotate_half without the sign
    return x.mul_(cos).addcmul_(rotated, signed_sin)
