"""Sampling parameters and the batched sampler.

Each sampled sequence owns a ``torch.Generator`` seeded from its ``seed``; the sampler
draws exactly one uniform number per sampled token from it and turns it into a token
by inverse-CDF over the filtered distribution. A sequence's tokens therefore depend only
on its own logits and seed, never on what else shares the batch.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

MAX_NEW_TOKENS_LIMIT = 1 << 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


class InvalidRequest(ValueError):
    """A request field that cannot be served; ``field`` names it for the caller."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InvalidSamplingParams(InvalidRequest):
    """A sampling parameter out of range."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature`` 0 is greedy. ``top_k`` 0 and ``top_p`` 1.0 disable those filters.
    ``seed`` None draws a random seed per sequence. ``stop`` strings end generation when
    they appear in the generated text (which is cut before them); ``stop_token_ids`` and,
    unless ``ignore_eos``, the model's eos ids end it on that token. ``logprobs`` asks for
    each chosen token's log-probability under the model (before temperature and filters).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidSamplingParams naming the first field out of range."""
        _check(isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens
               <= MAX_NEW_TOKENS_LIMIT, "max_new_tokens",
               f"must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}]")
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
               "must be a finite number >= 0")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k",
               "must be an integer >= 0 (0 disables it)")
        _check(math.isfinite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 1 << 64),
               "seed", "must be an integer in [0, 2**64)")
        _check(len(self.stop) <= MAX_STOP_STRINGS and all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
            "stop", f"at most {MAX_STOP_STRINGS} non-empty strings of at most "
            f"{MAX_STOP_STRING_CHARS} characters")
        _check(all(isinstance(t, int) and 0 <= t < vocab_size for t in self.stop_token_ids),
               "stop_token_ids", f"every id must be in [0, {vocab_size})")

    def make_generator(self) -> torch.Generator | None:
        """The sequence's own generator (None when greedy: nothing random is drawn)."""
        if self.greedy:
            return None
        seed = secrets.randbits(63) if self.seed is None else self.seed
        return torch.Generator().manual_seed(seed)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidSamplingParams(field, message)


@dataclass(frozen=True)
class SampleResult:
    """Chosen token ids (B,) and, where asked, their log-probabilities (B,)."""

    token_ids: list[int]
    logprobs: list[float] | None


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> SampleResult:
    """Pick one token per row of ``logits`` (B, V) float32."""
    tokens = logits.argmax(dim=-1)  # (B,)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        uniforms = torch.cat([torch.rand(1, generator=generators[i]) for i in rows])  # (S,)
        picked = _sample_rows(logits[rows], [params[i] for i in rows], uniforms.to(logits.device))
        tokens[rows] = picked
    logprobs = None
    if any(p.logprobs for p in params):
        chosen = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])  # (B, 1)
        logprobs = chosen.squeeze(1).tolist()
    return SampleResult(tokens.tolist(), logprobs)


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                 uniforms: torch.Tensor) -> torch.Tensor:
    """Temperature, top-k and top-p on logits (S, V), then inverse-CDF with uniforms (S,)."""
    vocab = logits.shape[1]
    temps = torch.tensor([p.temperature for p in params], device=logits.device)
    sorted_logits, order = (logits / temps[:, None]).sort(dim=-1, descending=True)  # (S, V)
    probs = torch.softmax(sorted_logits, dim=-1)  # (S, V)
    ranks = torch.arange(vocab, device=logits.device)
    top_k = torch.tensor([p.top_k or vocab for p in params], device=logits.device)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    mass_before = probs.cumsum(dim=-1) - probs  # (S, V)
    keep = (ranks[None, :] < top_k[:, None]) & (mass_before < top_p[:, None])
    cdf = (probs * keep).cumsum(dim=-1)  # (S, V)
    target = uniforms * cdf[:, -1]  # (S,)
    idx = torch.searchsorted(cdf, target[:, None], right=True).clamp_(max=vocab - 1)  # (S, 1)
    return order.gather(1, idx).squeeze(1)
