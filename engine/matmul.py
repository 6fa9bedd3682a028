"""Projection matmuls in whichever of two product forms is faster on this machine.

The model stores every projection weight ``W`` (out, in) column-major (``engine.model``).
A few rows ``x`` (M, in) can then be multiplied two ways:

* ``F.linear(x, W)``: BLAS multiplies ``x`` by ``W.T``, a plain row-major (in, out) matrix;
* ``W @ x.T``, copied back to row order: BLAS tiles along the long output axis instead of
  the few rows.

Which one wins depends on the CPU and the BLAS build, not only on the shapes. With 16-64
rows of SmolLM2-135M's projections, ``W @ x.T`` was 1.2-2.3x faster on a 2-core AMD EPYC
(AVX2) and 1.35x slower on a 2-core Intel Xeon (AVX-512); with 2-8 rows it lost on both.
A fixed rule is therefore wrong on some machine, so ``tune`` times both forms once, on
the model's own weights (every layer's, so the timing streams them from memory as a decode
step does), per weight shape and power-of-two row bucket, the way cuDNN's benchmark mode
picks convolution algorithms; ``linear`` then follows that plan and uses ``F.linear``
wherever nothing was measured (one row, prefill chunks, GPUs). Both forms compute the
same dot products, so the choice changes speed only: results agree to float rounding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

TUNED_ROWS = (8, 16, 32, 64)
"""Row buckets that are measured; other row counts use ``F.linear`` (2-7 rows: ``W @ x.T``
was several times slower on every machine measured; above 64 rows BLAS packs either way)."""

MIN_GAIN = 1.10
"""``W @ x.T`` must be at least this much faster to be chosen (timings jitter ~5%)."""

_Key = tuple[int, int, torch.dtype, int]  # (out, in, dtype, row bucket)
_transposed: set[_Key] = set()
_measured: set[_Key] = set()


def _bucket(rows: int) -> int:
    return 1 << (rows.bit_length() - 1)


def _key(weight: torch.Tensor, rows: int) -> _Key:
    return (weight.shape[0], weight.shape[1], weight.dtype, _bucket(rows))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T + bias -> (..., out), always contiguous.

    The ``W @ x.T`` product is copied back to row order (a few hundred KB): left
    transposed, every later op would see a last dimension with a stride, and SDPA then
    leaves its fused CPU kernel for the math path (5x slower at a 544-token context).
    """
    rows = x.reshape(-1, x.shape[-1])  # (M, in)
    if not _transposed or _key(weight, rows.shape[0]) not in _transposed:
        return F.linear(x, weight, bias)
    out = (torch.mm(weight, rows.t()) if bias is None
           else torch.addmm(bias[:, None], weight, rows.t()))  # (out, M)
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


def use_transposed(weight: torch.Tensor, rows: int, transposed: bool = True) -> None:
    """Set the form for ``weight``'s shape and ``rows``' bucket by hand (tests, overrides)."""
    key = _key(weight, rows)
    _measured.add(key)
    (_transposed.add if transposed else _transposed.discard)(key)


def tune(groups: Iterable[Sequence[torch.Tensor]], rows: Sequence[int] = TUNED_ROWS,
         repeats: int = 2) -> dict[str, float]:
    """Time both forms for each group of same-shape weights and bucket not yet measured.

    CPU only (elsewhere ``F.linear`` stays). Returns ``{"<out>x<in>@<rows>": speedup of
    W @ x.T over F.linear}`` for what it measured; the plan is process-wide and kept.
    """
    report: dict[str, float] = {}
    started = time.perf_counter()
    for group in groups:
        weight = group[0]
        if weight.device.type != "cpu":
            continue
        for m in rows:
            key = _key(weight, m)
            if key in _measured:
                continue
            speedup = _speedup(group, m, repeats)
            _measured.add(key)
            if speedup >= MIN_GAIN:
                _transposed.add(key)
            report[f"{weight.shape[0]}x{weight.shape[1]}@{m}"] = round(speedup, 2)
    if report:
        chosen = sorted(k for k, v in report.items() if v >= MIN_GAIN)
        log.info("matmul forms measured in %.2f s; W @ x.T for %s",
                 time.perf_counter() - started, ", ".join(chosen) or "none")
    return report


@torch.inference_mode()
def _speedup(group: Sequence[torch.Tensor], rows: int, repeats: int) -> float:
    """``F.linear``'s time over ``W @ x.T``'s across the whole group, best of ``repeats``.

    The two forms alternate weight by weight, so load from other processes (a worker
    starting beside this one) falls on both alike instead of on whichever ran second;
    which of them goes first alternates too, as the second one finds the weight cached.
    """
    x = torch.randn(rows, group[0].shape[1], dtype=group[0].dtype)
    forms = (lambda w: F.linear(x, w), lambda w: torch.mm(w, x.t()).t().contiguous())
    best = [float("inf"), float("inf")]
    for rep in range(repeats + 1):  # the first round warms up and is not counted
        spent = [0.0, 0.0]
        for n, w in enumerate(group):
            for i in (0, 1) if n % 2 else (1, 0):
                form = forms[i]
                start = time.perf_counter()
                form(w)
                spent[i] += time.perf_counter() - start
        if rep:
            best = [min(b, s) for b, s in zip(best, spent)]
    return best[0] / best[1]
