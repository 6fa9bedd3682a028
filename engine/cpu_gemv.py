"""A single-row product (``x @ W.T`` for one row) that streams the weight at memory speed.

A decode step of one sequence multiplies one row by every weight: it is bound by reading
the weights from memory, nothing else. On a 2-core AMD EPYC (Zen 4) MKL's and oneDNN's
single-row kernels read 16-19 GB/s where the two cores read 48 GB/s (``torch.sum``), so a
SmolLM2-135M step spent 23-26 ms on 425 MB of projections. This kernel reads them at
25-30 GB/s (15-17 ms): each thread streams a contiguous band of rows of the column-major
weight (``W.T`` is a row-major (in, out) matrix), adds eight rows at a time into a private
accumulator that stays in L1/L2, and the threads sum their accumulators at the end. It is
plain C (OpenMP for the threads, the compiler's vectorizer for AVX2/AVX-512), built on
first use by ``engine.ckernels``; where no compiler is available the form is simply not
offered and the BLAS forms serve (``engine.matmul``). It shares torch's OpenMP threads and
runs on as many as
``torch.get_num_threads()`` says (passed in: OpenMP's own setting is per calling thread, and
the worker's compute thread is not the one that set it).

The sum runs in another order than BLAS's, so results agree with ``F.linear`` to float
rounding, as the other forms do.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from engine import ckernels

SOURCE = r"""
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* y (n_out) = x (n_in) @ wt (n_in, n_out, row-major) [+ bias]; wt is W (out, in) stored
   column-major. Each thread sums a band of rows into its own accumulator. */
int kvrelay_gemv(const float *x, const float *wt, const float *bias, float *y,
                 long n_in, long n_out, int threads) {
    int nt = threads;
    if (nt < 1) nt = 1;
    if (nt > 64) nt = 64;
    if (n_in < 64 * nt) nt = 1;
    float *partial = NULL;
    if (nt > 1) {
        size_t bytes = ((size_t)(nt - 1) * n_out * sizeof(float) + 63) / 64 * 64;
        partial = (float *)aligned_alloc(64, bytes);
        if (!partial) return -1;
    }
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), nth = omp_get_num_threads();
        long i0 = n_in * t / nth, i1 = n_in * (t + 1) / nth;
        float *acc = t == 0 ? y : partial + (size_t)(t - 1) * n_out;
        memset(acc, 0, n_out * sizeof(float));
        long i = i0;
        for (; i + 8 <= i1; i += 8) {
            const float *r0 = wt + i * n_out, *r1 = r0 + n_out, *r2 = r1 + n_out;
            const float *r3 = r2 + n_out, *r4 = r3 + n_out, *r5 = r4 + n_out;
            const float *r6 = r5 + n_out, *r7 = r6 + n_out;
            float x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
            float x4 = x[i + 4], x5 = x[i + 5], x6 = x[i + 6], x7 = x[i + 7];
            #pragma omp simd
            for (long j = 0; j < n_out; j++)
                acc[j] += ((x0 * r0[j] + x1 * r1[j]) + (x2 * r2[j] + x3 * r3[j]))
                        + ((x4 * r4[j] + x5 * r5[j]) + (x6 * r6[j] + x7 * r7[j]));
        }
        for (; i < i1; i++) {
            const float *r = wt + i * n_out;
            float xi = x[i];
            #pragma omp simd
            for (long j = 0; j < n_out; j++) acc[j] += xi * r[j];
        }
        #pragma omp barrier
        long j0 = n_out * t / nth, j1 = n_out * (t + 1) / nth;
        for (int p = 1; p < nth; p++) {
            const float *src = partial + (size_t)(p - 1) * n_out;
            for (long j = j0; j < j1; j++) y[j] += src[j];
        }
        if (bias) for (long j = j0; j < j1; j++) y[j] += bias[j];
    }
    free(partial);
    return 0;
}
"""

_kernel: list[object] = []  # [ctypes function or None] once loading was tried

_compiler = ckernels.compiler
cpu_identity = ckernels.cpu_identity


def _build(cache_dir: Path) -> Path | None:
    """The compiled library (None: no compiler or the build failed)."""
    return ckernels.build("gemv", SOURCE, cache_dir)


def kernel(cache_dir: Path | None = None) -> object | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    if not _kernel:
        _kernel.append(ckernels.load("gemv", SOURCE, "kvrelay_gemv",
                                     [ctypes.c_void_p] * 4 + [ctypes.c_long] * 2 + [ctypes.c_int],
                                     cache_dir))
    return _kernel[0]


def supports(weight: torch.Tensor) -> bool:
    """A float32 CPU weight stored column-major (``engine.model`` stores them so)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.t().is_contiguous())


def gemv(row: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """row (1, in) @ column-major weight (out, in).T [+ bias] -> (1, out)."""
    fn = kernel()
    if fn is None or row.shape[0] != 1 or not supports(weight):
        raise RuntimeError("the single-row kernel takes one float32 row and a column-major "
                           "float32 CPU weight")
    out_features, in_features = weight.shape
    x, b = ckernels.float32_operands(row, out_features, in_features, bias)
    y = torch.empty(1, out_features, dtype=torch.float32)
    status = fn(x.data_ptr(), weight.data_ptr(), None if b is None else b.data_ptr(),  # type: ignore[operator]
                y.data_ptr(), in_features, out_features, torch.get_num_threads())
    if status != 0:
        raise MemoryError("the single-row kernel could not allocate its accumulators")
    return y
