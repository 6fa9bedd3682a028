"""Projection matmuls in whichever of six product forms is fastest on this machine.

The model stores every projection weight ``W`` (out, in) column-major (``engine.model``).
A few or many rows ``x`` (M, in) can be multiplied four ways, a single row a fifth and a
few rows a sixth:

* ``linear``: ``F.linear(x, W)``, which PyTorch's CPU build hands to MKL's ``sgemm``;
* ``transposed``: ``W @ x.T``, copied back to row order, so that BLAS tiles along the long
  output axis instead of the few rows;
* ``onednn-packed``: oneDNN's inner-product primitive (``torch.ops.mkldnn._linear_pointwise``,
  the op PyTorch's own compiler emits for CPU linears), whose kernels are generated for the
  instruction set the CPU reports, on a copy of the weight reordered once into oneDNN's
  blocked layout (``_reorder_linear_weight``, as PyTorch's compiler does when it freezes a
  model). Handed a plain weight, oneDNN brings it into that layout on every call (most
  likely the whole difference): on a 2-core AMD EPYC with AVX-512 the packed copy made 30
  layers' projections at 16 rows 24-34 ms instead of 33-42 ms, and the 49152-row LM head
  6.4 ms instead of 9.7 ms. The copy costs memory (the
  weight's size again, for each weight whose shape uses this form for some row count:
  ``prepare`` packs those and drops the rest);
* ``split``: the output columns cut into one slice per thread, multiplied as one batched
  product (``torch.bmm`` runs the slices on the threads side by side). MKL multiplies a
  single row on one core only, which reads memory at about half of what two cores do; on a
  2-core AMD EPYC a single-row decode step's projections took 27 ms this way against 33 ms;
* ``gemv`` (one row only): kvrelay's own C kernel (``engine.cpu_gemv``), which streams the
  weight at 25-30 GB/s where the BLAS single-row kernels read 16-19 GB/s on that EPYC
  (30 layers' projections 15-17 ms against 22-26 ms);
* ``rows-packed`` (2 to 64 rows): kvrelay's own C kernel (``engine.cpu_gemm``) over a copy
  of the weight in column blocks of 48 outputs, 8 rows x 48 outputs in vector accumulators;
  on a 2-core AMD EPYC (Zen 4) at 16 rows 1.2-1.7x faster than ``onednn-packed`` per shape.

Which one wins depends on the CPU and the BLAS build, not only on the shapes. On a 2-core
Intel Xeon (AVX-512) ``linear`` won for most row counts; on a 2-core AMD EPYC (AVX2),
``transposed`` was 1.2-2.3x faster at 16-64 rows; on a 2-core AMD EPYC with AVX-512,
oneDNN was 1.2-2x faster than ``linear`` from 8 to 2048 rows (most likely MKL picks
its AVX-512 kernels on Intel CPUs only). A fixed rule is therefore wrong on some machine, so ``tune``
times every form once, on the model's own weights (every layer's, so the timing streams
them from memory as a decode step does), per weight shape and power-of-two row bucket, the
way cuDNN's benchmark mode picks convolution algorithms; ``linear`` then follows that plan
and uses ``F.linear`` wherever nothing was measured (GPUs, or without tuning). All forms
compute the same dot products, so the choice changes speed only: results agree to float
rounding.

Measuring takes seconds (for SmolLM2-135M, 2-3 s alone and twice that beside another
worker starting), so ``tune_cached`` keeps each plan in a small JSON file keyed by what the
timings depend on (CPU model, thread count, torch version, forms, weight shapes and row
buckets),
under a file lock: workers starting together on one machine measure once, and later starts
read the plan instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import cpu_gemm, cpu_gemv

log = logging.getLogger(__name__)

LINEAR, TRANSPOSED, ONEDNN, SPLIT, GEMV, ROWS = 0, 1, 2, 3, 4, 5
FORMS = ("linear", "transposed", "onednn-packed", "split", "gemv", "rows-packed")

PACK_ROWS = 16
"""The row count oneDNN is told to expect when it picks the packed weight's layout. One
layout serves every row count: on the EPYC above, a weight packed for 16 rows multiplied
1-256 rows as fast as one packed for 128, while one packed for a single row lost at 4 rows
and more."""

_PACKED = "_kvrelay_onednn_packed"  # attribute of a weight tensor holding its packed copy

LARGE_ROWS = 128
"""Row counts from here up share one bucket: the product is bound by arithmetic, not by
streaming the weight, and the winning form no longer changes with the row count."""

TUNED_ROWS = (1, 2, 4, 8, 16, 32, 64, LARGE_ROWS)
"""Row buckets that are measured: every bucket a decode step or a prefill pass can fall in."""

DECODE_ROWS = TUNED_ROWS[:-1]
"""Buckets measured for the LM head, which multiplies one row per sequence."""

TIMED_WEIGHTS = 12
"""Weights of a group that are timed: enough layers to stream from memory as a decode step
does (SmolLM2-135M's twelve smallest, 16 MB, overflow the L2 caches many times over, and
the forms' turns to run first rotate), few enough to measure every case in a few seconds
(once per machine: the plan is kept)."""

LARGE_WEIGHTS = 4
"""Weights of a group timed at ``LARGE_ROWS`` rows: at that size nothing is bound by
reading the weight, so more would take longer and tell nothing more."""

MIN_GAIN = 1.10
"""Another form must be at least this much faster than ``linear`` to be chosen (timings
jitter by ~5%)."""

TIMING_VERSION = 2
"""How forms are timed (part of a kept plan's key: a plan timed another way is measured
again). 2: each form over the group from evicted caches."""

_Key = tuple[int, int, torch.dtype, int]  # (out, in, dtype, row bucket)
_plan: dict[_Key, int] = {}  # measured (or set) cases -> form; absent means ``linear``


def _onednn_op() -> Callable[..., torch.Tensor] | None:
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018 (both ops or neither)
        return torch.ops.mkldnn._linear_pointwise  # type: ignore[no-any-return]
    except (AttributeError, RuntimeError):
        return None


_ONEDNN = _onednn_op()


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """``weight``'s copy in oneDNN's blocked layout, made on first use and kept on the
    weight tensor itself (so it lives and dies with the weight)."""
    packed = getattr(weight, _PACKED, None)
    if packed is None:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)
        setattr(weight, _PACKED, packed)
    return packed  # type: ignore[no-any-return]


def _bucket(rows: int) -> int:
    return min(1 << (rows.bit_length() - 1), LARGE_ROWS)


def _key(weight: torch.Tensor, rows: int) -> _Key:
    return (weight.shape[0], weight.shape[1], weight.dtype, _bucket(rows))


def _product(form: int, rows: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """rows (M, in) -> (M, out), contiguous, in ``form``."""
    if form == LINEAR:
        return F.linear(rows, weight, bias)
    if form == ONEDNN:
        assert _ONEDNN is not None
        return _ONEDNN(rows.contiguous(), _packed(weight), bias, "none", [], "")
    if form == SPLIT:
        return _split(rows, weight, bias)
    if form == GEMV:
        return cpu_gemv.gemv(rows, weight, bias)
    if form == ROWS:
        return cpu_gemm.rows(rows, weight, bias)
    # W @ x.T is copied back to row order (a few hundred KB): left transposed, every later
    # op would see a last dimension with a stride, and SDPA then leaves its fused CPU
    # kernel for the math path (5x slower at a 544-token context).
    out = (torch.mm(weight, rows.t()) if bias is None
           else torch.addmm(bias[:, None], weight, rows.t()))  # (out, M)
    return out.t().contiguous()


def _splittable(weight: torch.Tensor, parts: int) -> bool:
    """A column-major weight whose outputs divide into ``parts`` > 1 slices."""
    out = weight.shape[0]
    return parts > 1 and out % parts == 0 and weight.stride() == (1, out)


def _split(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows (M, in) @ column-major weight (out, in).T, one slice of the outputs per thread."""
    (m, inn), out, parts = rows.shape, weight.shape[0], torch.get_num_threads()
    if not _splittable(weight, parts):  # the thread count changed since the plan was made
        return F.linear(rows, weight, bias)
    # weight.T is a row-major (in, out) matrix: its column slices are (in, out/parts) blocks
    # with row stride ``out``, which BLAS multiplies in place.
    slices = weight.t().as_strided((parts, inn, out // parts), (out // parts, out, 1))
    product = torch.bmm(rows.expand(parts, m, inn), slices)  # (parts, M, out/parts)
    result = product.transpose(0, 1).reshape(m, out)  # a view when M == 1
    return result if bias is None else result + bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T + bias -> (..., out), always contiguous."""
    if not _plan or x.numel() == 0:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # (M, in)
    form = _plan.get(_key(weight, rows.shape[0]), LINEAR)
    if form == LINEAR:
        return F.linear(x, weight, bias)
    return _product(form, rows, weight, bias).view(*x.shape[:-1], weight.shape[0])


def set_form(weight: torch.Tensor, rows: int, form: int) -> None:
    """Set the form for ``weight``'s shape and ``rows``' bucket by hand (tests, overrides)."""
    if form == ONEDNN and _ONEDNN is None:
        raise RuntimeError("oneDNN is not available in this PyTorch build")
    if form == ROWS and (not cpu_gemm.usable() or not cpu_gemm.supports(weight)):
        raise RuntimeError("the few-row kernel cannot multiply this weight here")
    _plan[_key(weight, rows)] = form


def prepare(weights: Iterable[torch.Tensor]) -> int:
    """Pack each weight whose shape uses ``onednn-packed`` or ``rows-packed`` for some row
    count (after the plan is measured or read, so the first request does not pay for it)
    and drop the packed copies no row count uses (``tune`` packs what it times). Returns
    the bytes of packed copies kept."""
    kept = 0
    for weight in weights:
        forms = {_plan.get(_key(weight, m)) for m in TUNED_ROWS}
        if ONEDNN in forms:
            _packed(weight)
            kept += weight.numel() * weight.element_size()
        elif hasattr(weight, _PACKED):
            delattr(weight, _PACKED)
        if ROWS in forms:
            cpu_gemm.packed(weight)
            kept += weight.numel() * weight.element_size()
        else:
            cpu_gemm.drop_packed(weight)
    return kept


def available_forms(weight: torch.Tensor) -> tuple[int, ...]:
    """The forms that can multiply ``weight`` here (oneDNN: CPU builds with it; split: a
    column-major weight whose outputs divide among the threads; gemv: a column-major
    float32 weight, where a C compiler built the kernel; it takes one row only, and
    ``tune`` times it for the one-row bucket only; rows-packed: a float32 weight with a
    multiple of 48 outputs, where the compiler built that kernel and ``KVRELAY_CPU_GEMM``
    does not switch it off, timed for 2-64 rows)."""
    if weight.device.type != "cpu":
        return (LINEAR,)
    forms = [LINEAR, TRANSPOSED] + ([ONEDNN] if _ONEDNN is not None else [])
    if _splittable(weight, torch.get_num_threads()):
        forms.append(SPLIT)
    if cpu_gemv.supports(weight) and cpu_gemv.kernel() is not None:
        forms.append(GEMV)
    if cpu_gemm.supports(weight) and cpu_gemm.usable():
        forms.append(ROWS)
    return tuple(forms)


def tune(groups: Iterable[Sequence[torch.Tensor]], rows: Sequence[int] = TUNED_ROWS,
         repeats: int = 2) -> dict[str, dict[str, float]]:
    """Time every form for each group of same-shape weights and bucket not yet measured.

    CPU only (elsewhere ``F.linear`` stays). Returns ``{"<out>x<in>@<rows>": {form: speedup
    over linear}}`` for what it measured; the plan is process-wide and kept.
    """
    report: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for group in groups:
        weight = group[0]
        forms = available_forms(weight)
        if len(forms) == 1:
            continue
        for m in rows:
            key = _key(weight, m)
            if key in _plan:
                continue
            timed = group[:LARGE_WEIGHTS if m >= LARGE_ROWS else TIMED_WEIGHTS]
            usable = [f for f in forms  # gemv takes one row; rows-packed is for a few
                      if (f != GEMV or m == 1) and (f != ROWS or 1 < m < LARGE_ROWS)]
            speedups = _speedups(timed, m, usable, repeats)
            best = max(speedups, key=lambda f: speedups[f])
            _plan[key] = best if speedups[best] >= MIN_GAIN else LINEAR
            report[f"{weight.shape[0]}x{weight.shape[1]}@{m}"] = {
                FORMS[f]: round(s, 2) for f, s in speedups.items()}
    _scratch.clear()
    if report:
        log.info("matmul forms measured in %.2f s: %s", time.perf_counter() - started,
                 ", ".join(f"{case} {_chosen(s)}" for case, s in report.items()))
    return report


def _chosen(speedups: dict[str, float]) -> str:
    best = max(speedups, key=lambda f: speedups[f])
    return best if speedups[best] >= MIN_GAIN else "linear"


@torch.inference_mode()
def _speedups(group: Sequence[torch.Tensor], rows: int, forms: Sequence[int],
              repeats: int) -> dict[int, float]:
    """``linear``'s time over each form's across ``group``, best of ``repeats``.

    Each form multiplies every weight of the group in turn, as a decode step does, starting
    from caches that hold none of them (``_evict_caches``): timed one weight at a time, the
    forms after the first found it cached, and with a 32 MB last-level cache a dozen weights
    of a group stayed cached from one form to the next, so the timings favoured the forms
    that are fast on cached weights (a plan made that way ran a batch-16 step 15% slower).
    The forms' order rotates each round, so load from other processes (a worker starting
    beside this one) falls on all alike. A form that fails on this weight (a dtype oneDNN
    lacks here) is left out.
    """
    x = torch.randn(rows, group[0].shape[1], dtype=group[0].dtype)
    usable = []
    for form in forms:
        try:
            _product(form, x, group[0], None)
            usable.append(form)
        except RuntimeError:
            pass
    best = dict.fromkeys(usable, float("inf"))
    for rep in range(repeats + 1):  # the first round warms up and is not counted
        shift = rep % len(usable)
        for form in usable[shift:] + usable[:shift]:
            _evict_caches()
            start = time.perf_counter()
            for w in group:
                _product(form, x, w, None)
            if rep:
                best[form] = min(best[form], time.perf_counter() - start)
    return {f: best[LINEAR] / best[f] for f in usable}


_scratch: list[torch.Tensor] = []  # the eviction buffer while ``tune`` runs, then freed


def _evict_caches() -> None:
    """Read a buffer twice the size of the last-level cache, so that nothing timed next
    finds its weights cached (a decode step streams the whole model, so none of them are)."""
    if not _scratch:
        _scratch.append(torch.ones(2 * _last_level_cache_bytes() // 4))
    _scratch[0].sum()


def _last_level_cache_bytes() -> int:
    """The largest CPU cache's size from sysfs (32 MB when it says nothing)."""
    sizes = [32 << 20]
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        with contextlib.suppress(OSError, ValueError):
            text = entry.read_text().strip().upper()
            unit = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KM")) * unit)
    return min(max(sizes), 256 << 20)


Job = tuple[Sequence[Sequence[torch.Tensor]], Sequence[int]]  # (weight groups, row buckets)


def default_plan_dir() -> Path:
    """``$KVRELAY_CACHE_DIR/matmul`` (default ``~/.cache/kvrelay/matmul``)."""
    root = os.environ.get("KVRELAY_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache/kvrelay") / "matmul"


def plan_key(jobs: Sequence[Job]) -> str:
    """What the measurements of ``jobs`` depend on, as a short digest (the forms known too:
    a plan from a version with fewer forms is measured again)."""
    cases = [[[list(g[0].shape), str(g[0].dtype), g[0].device.type] for g in groups if g]
             + [list(rows)] for groups, rows in jobs]
    what = [cpu_gemv.cpu_identity(), os.cpu_count(), torch.get_num_threads(), torch.__version__,
            _ONEDNN is not None, cpu_gemv.kernel() is not None, cpu_gemm.usable(),
            FORMS, TIMING_VERSION,
            TIMED_WEIGHTS, LARGE_WEIGHTS, MIN_GAIN, cases]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:24]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"not a dtype: {name}")
    return dtype


def _read_plan(path: Path) -> dict[_Key, int] | None:
    """The plan stored at ``path``, or None if there is none or it does not parse."""
    try:
        entries = json.loads(path.read_text())
        return {(int(out), int(inn), _dtype(dtype), int(rows)): FORMS.index(form)
                for out, inn, dtype, rows, form in entries}
    except (OSError, ValueError, TypeError):
        return None


def _write_plan(path: Path, plan: dict[_Key, int]) -> None:
    entries = [[out, inn, str(dtype), rows, FORMS[form]]
               for (out, inn, dtype, rows), form in sorted(plan.items(), key=str)]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f)
    os.replace(tmp, path)  # readers see the old file or the whole new one


def tune_cached(jobs: Sequence[Job], plan_dir: Path | None) -> str:
    """``tune`` each job, or read the plan an earlier identical measurement stored.

    Returns how the plan was obtained ("measured", "read" or "measured, not stored").
    Without ``plan_dir`` this is ``tune``. A plan file that is unreadable is measured anew
    and replaced; one that cannot be written (read-only home) costs only the next start's
    measurement.
    """
    if plan_dir is None:
        _tune_all(jobs)
        return "measured, not stored"
    path = plan_dir / f"plan-{plan_key(jobs)}.json"
    try:
        plan_dir.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            stored = _read_plan(path) if path.exists() else None
            if stored is not None:
                _plan.update(stored)
                log.info("matmul plan read from %s", path)
                return "read"
            _tune_all(jobs)
            cases = {_key(g[0], m) for groups, rows in jobs for g in groups if g for m in rows}
            _write_plan(path, {k: v for k, v in _plan.items() if k in cases})
            return "measured"
    except OSError as err:
        log.warning("matmul plan not kept (%s)", err)
        _tune_all(jobs)  # measures only what the lock or the write left unmeasured
        return "measured, not stored"


def _tune_all(jobs: Sequence[Job]) -> None:
    for groups, rows in jobs:
        tune(groups, rows)
