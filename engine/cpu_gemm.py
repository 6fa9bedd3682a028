"""A product of a few rows (``x @ W.T`` for 2-64 rows) over a weight repacked in column blocks.

A decode step of a batch multiplies a few rows by every weight. oneDNN's packed inner
product does it at ~108 GFLOP/s on a 2-core AMD EPYC (Zen 4) at 16 rows, neither at the
cores' arithmetic speed nor at their memory speed. This kernel keeps a copy of each weight
in column blocks of 48 outputs, each block's (in, 48) values contiguous, and computes a
block's outputs for 8 rows at a time in 24 vector accumulators (3 x 16 outputs x 8 rows,
each row's input value broadcast), so a block streams from memory front to back once and
the next rows read it from L2. Measured the way ``engine.matmul`` times forms (12 layers'
weights from evicted caches), 16 rows: 960 x 576 1.45 ms against oneDNN's 2.12, 576 x 576
0.92 against 1.55, 3072 x 576 5.09 against 6.03, 576 x 1536 2.44 against 3.82; at 4 and 8
rows 1.4-2.5x faster. Over the plain column-major weight (a block's 48 values for one input
lie a whole output row apart from the next input's: 12 KB for 3072 outputs) the same kernel
was no faster than oneDNN on the large shapes.

Plain C with GCC vector types and OpenMP, built on first use by ``engine.ckernels``; where
no compiler is available, or with ``KVRELAY_CPU_GEMM=0`` in the environment, the form is
not offered (``engine.matmul``). The packed copy costs the weight's size again
(SmolLM2-135M: about 0.5 GB more per worker, as prefill passes keep oneDNN's packed copy
and single rows the plain weight); ``matmul.prepare`` makes it only for weights the
measured plan multiplies this way, and the switch trades that memory for the speed.
Float32 CPU weights whose output count is a multiple of 48 only (SmolLM2-135M: 960, 576 and
3072 outputs, and the 49152-row head). Sums run in another order than BLAS's, so results
agree with ``F.linear`` to float rounding, as the other forms do.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from engine import ckernels

BLOCK = 48
"""Outputs per column block (three 16-float vectors)."""

SOURCE = r"""
#include <omp.h>

#define NB 48  /* outputs per column block */
#define MR 8   /* rows per register block */
#define NV (NB / 16)

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

static inline v16 splat(float x) { return (v16){x,x,x,x,x,x,x,x,x,x,x,x,x,x,x,x}; }
static inline v16 ld(const float *p) { return *(const v16u *)p; }
static inline void st(float *p, v16 v) { *(v16u *)p = v; }

/* y (M, n_out) = x (M, n_in) @ W.T [+ bias], with W packed as wp (n_out / NB, n_in, NB):
   wp[b][k][j] = W[b * NB + j][k]. Column blocks are shared out to the threads. */
int kvrelay_gemm_rows(const float *x, long M, const float *wp, const float *bias, float *y,
                      long n_in, long n_out, int threads) {
    long nblk = n_out / NB;
    if (threads < 1) threads = 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long blk = 0; blk < nblk; blk++) {
        const float *wb = wp + blk * n_in * NB;
        long j0 = blk * NB;
        for (long m0 = 0; m0 < M; m0 += MR) {
            long mr = M - m0 < MR ? M - m0 : MR;
            const float *xr[MR];  /* rows past M repeat the last one, unwritten */
            for (int a = 0; a < MR; a++) xr[a] = x + (m0 + (a < mr ? a : mr - 1)) * n_in;
            v16 c[MR][NV];
            for (int a = 0; a < MR; a++) for (int v = 0; v < NV; v++) c[a][v] = splat(0.f);
            for (long k = 0; k < n_in; k++) {
                const float *wk = wb + k * NB;
                v16 w0 = ld(wk), w1 = ld(wk + 16), w2 = ld(wk + 32);
                for (int a = 0; a < MR; a++) {
                    v16 b = splat(xr[a][k]);
                    c[a][0] += b * w0; c[a][1] += b * w1; c[a][2] += b * w2;
                }
            }
            for (long a = 0; a < mr; a++) {
                float *yr = y + (m0 + a) * n_out + j0;
                for (int v = 0; v < NV; v++)
                    st(yr + 16 * v, bias ? c[a][v] + ld(bias + j0 + 16 * v) : c[a][v]);
            }
        }
    }
    return 0;
}
"""

_PACKED = "_kvrelay_column_blocks"  # attribute of a weight tensor holding its packed copy

_kernel: list[object] = []  # [ctypes function or None] once loading was tried


def kernel(cache_dir: Path | None = None) -> object | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    if not _kernel:
        _kernel.append(ckernels.load(
            "gemm_rows", SOURCE, "kvrelay_gemm_rows",
            [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2
            + [ctypes.c_int], cache_dir))
    return _kernel[0]


def enabled() -> bool:
    """Not switched off by ``KVRELAY_CPU_GEMM=0`` (which saves the packed copies' memory)."""
    return ckernels.switched_on("KVRELAY_CPU_GEMM")


def usable() -> bool:
    """Switched on and built here: ``engine.matmul`` offers the form."""
    return enabled() and kernel() is not None


def supports(weight: torch.Tensor) -> bool:
    """A 2-D float32 CPU weight whose output count is a multiple of ``BLOCK``."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.shape[0] % BLOCK == 0)


def packed(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) in column blocks, (out / BLOCK, in, BLOCK), made on first use and
    kept on the weight tensor itself (so it lives and dies with the weight)."""
    copy = getattr(weight, _PACKED, None)
    if copy is None:
        out_features, in_features = weight.shape
        copy = weight.detach().reshape(out_features // BLOCK, BLOCK, in_features
                                       ).transpose(1, 2).contiguous()
        setattr(weight, _PACKED, copy)
    return copy  # type: ignore[no-any-return]


def drop_packed(weight: torch.Tensor) -> None:
    """Free ``weight``'s packed copy, if it has one."""
    if hasattr(weight, _PACKED):
        delattr(weight, _PACKED)


def has_packed(weight: torch.Tensor) -> bool:
    return hasattr(weight, _PACKED)


def rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, in) @ weight (out, in).T [+ bias] -> (M, out), through the packed copy."""
    fn = kernel()
    if fn is None or not supports(weight):
        raise RuntimeError("the few-row kernel takes a float32 CPU weight with a multiple of "
                           f"{BLOCK} outputs")
    out_features, in_features = weight.shape
    x, b = ckernels.float32_operands(x, out_features, in_features, bias)
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    fn(x.data_ptr(), x.shape[0], packed(weight).data_ptr(),  # type: ignore[operator]
       None if b is None else b.data_ptr(), y.data_ptr(), in_features, out_features,
       torch.get_num_threads())
    return y
