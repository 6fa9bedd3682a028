"""Attention of one sequence's new tokens over its pool blocks, read in place (CPU, C).

A pass that computes a sequence's tokens on top of a held prefix (a prompt's uncached tail,
a chunk of a long prompt) attended, through PyTorch, by gathering the prefix's K and V out
of the pool into new tensors every layer, running the fused flash kernel over them, the
same kernel again over the new tokens alone (causal), and merging the two by their
log-sum-exps. This kernel does all of it in one call without any of those copies: it reads
each key and value where it lies in the pool, through the sequence's block table, with the
new tokens' K/V already written there (``attention.write_kv``), and applies the causal
rule by position. On a 2-core Intel Xeon (AVX-512), 64 new tokens over 1984 held ones of
SmolLM2-135M: 1.8-1.9 ms a layer against 2.6 ms for gather, two flash calls and the merge.

How it computes (flash attention's online softmax, in fp32 throughout):

* the query heads that share a KV head are stacked along the query axis, as in
  ``attention._grouped_attention`` (row ``i`` of KV head ``h`` is query head ``h*g + i//T``
  at position ``start + i%T``); the work is cut into (KV head, 24 rows) tasks shared out to
  torch's OpenMP threads;
* keys go 128 at a time: their K is first transposed (64 x 128 floats per head and chunk,
  once per call) so that a 6-row x 64-key block of scores is 24 vector accumulators fed by
  broadcast query values; the running maximum and sum are updated per row (the exponential
  is a degree-6 polynomial after range reduction, to about one unit in the last place), and
  the probabilities times V go into 6 x 64 accumulators the same way;
* keys past a row's position get no weight; chunks past every row of a task are skipped.

Head dimension 64 only (SmolLM2, Llama 3.2 1B, Qwen2 0.5B), float32 only. Results agree
with PyTorch's flash kernel to float rounding (~1e-6), as the order of the sums differs.
Built by ``engine.ckernels`` on first use; where it cannot be (no compiler), or with
``KVRELAY_CPU_ATTENTION=0`` in the environment, ``available`` is False and the PyTorch
path runs (``attention.prefix_split_attention``).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from engine import ckernels

HEAD_DIM = 64
"""The only head dimension the kernel is built for."""

SOURCE = r"""
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define HD 64   /* head dimension */
#define CK 128  /* keys per softmax step */
#define RT 24   /* query rows per task */
#define MR 6    /* query rows per register block */
#define NV (HD / 16)

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int i16v __attribute__((vector_size(64)));

static inline v16 splat(float x) { return (v16){x,x,x,x,x,x,x,x,x,x,x,x,x,x,x,x}; }
static inline v16 ld(const float *p) { return *(const v16u *)p; }
static inline void st(float *p, v16 v) { *(v16u *)p = v; }

static inline v16 vmax(v16 a, v16 b) {
    i16v mask = a > b, ia, ib;
    memcpy(&ia, &a, sizeof ia); memcpy(&ib, &b, sizeof ib);
    i16v r = (mask & ia) | (~mask & ib);
    v16 f; memcpy(&f, &r, sizeof f);
    return f;
}

static inline v16 vexp(v16 x) {
    /* x = k ln2 + r with |r| <= ln2/2 (k rounded by the 1.5 * 2^23 trick), exp(r) by a
       degree-6 polynomial, 2^k put in the exponent bits; x below -87 counts as -87 */
    x = vmax(x, splat(-87.0f));
    v16 k = (x * splat(1.44269504088896341f) + splat(12582912.0f)) - splat(12582912.0f);
    v16 r = x - k * splat(0.693145751953125f);
    r = r - k * splat(1.428606765330187045e-06f);
    v16 p = splat(1.0f / 720.0f);
    p = p * r + splat(1.0f / 120.0f);
    p = p * r + splat(1.0f / 24.0f);
    p = p * r + splat(1.0f / 6.0f);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    i16v e = (__builtin_convertvector(k, i16v) + 127) << 23;
    v16 f; memcpy(&f, &e, sizeof f);
    return p * f;
}

/* q (kvh, R, HD) contiguous: row i of KV head h is at position start + i % T. Keys are
   positions 0 .. start+T-1: key j of KV head h lies at
   base + table[j / bs] * bstride + ((j % bs) * kvh + h) * HD, its value voff floats on.
   out (kvh, R, HD); lse (kvh, R) or NULL. Returns 0, or -1 when out of memory. */
int kvrelay_attend(const float *q, long R, long T, long start, const float *base,
                   const long *table, long bstride, long voff, long bs, long kvh,
                   float scale, float *out, float *lse, int threads) {
    long tiles = (R + RT - 1) / RT, ntasks = kvh * tiles, nkeys = start + T;
    long nchunks = (nkeys + CK - 1) / CK, ldk = nchunks * CK;
    float *ktall = aligned_alloc(64, (size_t)kvh * HD * ldk * sizeof(float));
    if (!ktall) return -1;
    if (threads < 1) threads = 1;
    #pragma omp parallel num_threads(threads)
    {
    /* K transposed per head: ktall[h][d][key], zero past the last key */
    #pragma omp for schedule(static)
    for (long hc = 0; hc < kvh * nchunks; hc++) {
        long h = hc / nchunks, k0 = (hc % nchunks) * CK;
        long n = nkeys - k0 < CK ? nkeys - k0 : CK;
        float *kt = ktall + h * HD * ldk + k0;
        const float *kp[CK];
        for (long j = 0; j < n; j++) {
            long key = k0 + j;
            kp[j] = base + table[key / bs] * bstride + ((key % bs) * kvh + h) * HD;
        }
        for (int d = 0; d < HD; d++) {
            float *row = kt + d * ldk;
            for (long j = 0; j < n; j++) row[j] = kp[j][d];
            for (long j = n; j < CK; j++) row[j] = 0.f;
        }
    }
    #pragma omp for schedule(dynamic, 1)
    for (long task = 0; task < ntasks; task++) {
        long h = task / tiles, r0 = (task % tiles) * RT;
        long rows = R - r0 < RT ? R - r0 : RT;
        v16 acc[RT][NV];
        float s[RT][CK] __attribute__((aligned(64)));
        float qs[RT][HD] __attribute__((aligned(64)));
        const float *vrow[CK];
        float m[RT], l[RT];
        long pos[RT], maxpos = 0;
        for (int r = 0; r < RT; r++) {  /* rows past R repeat the last one, unwritten */
            long i = r0 + (r < rows ? r : rows - 1);
            pos[r] = start + i % T;
            if (pos[r] > maxpos) maxpos = pos[r];
            m[r] = -1e30f; l[r] = 0.f;
            for (int x = 0; x < NV; x++) acc[r][x] = splat(0.f);
            const float *qi = q + (h * R + i) * HD;
            for (int d = 0; d < HD; d++) qs[r][d] = qi[d] * scale;
        }
        for (long k0 = 0; k0 <= maxpos; k0 += CK) {
            long nk = maxpos + 1 - k0 < CK ? maxpos + 1 - k0 : CK;
            const float *ktc = ktall + h * HD * ldk + k0;
            for (long j = 0; j < nk; j++) {
                long key = k0 + j;
                vrow[j] = base + table[key / bs] * bstride + ((key % bs) * kvh + h) * HD + voff;
            }
            for (int r = 0; r < RT; r += MR)  /* scores: MR rows x 64 keys at a time */
            for (int half = 0; half < CK; half += 64) {
                if (half >= nk) break;
                v16 c[MR][4];
                for (int a = 0; a < MR; a++) for (int x = 0; x < 4; x++) c[a][x] = splat(0.f);
                for (int d = 0; d < HD; d++) {
                    const float *kd = ktc + d * ldk + half;
                    v16 k0v = ld(kd), k1v = ld(kd + 16), k2v = ld(kd + 32), k3v = ld(kd + 48);
                    for (int a = 0; a < MR; a++) {
                        v16 b = splat(qs[r + a][d]);
                        c[a][0] += b * k0v; c[a][1] += b * k1v; c[a][2] += b * k2v; c[a][3] += b * k3v;
                    }
                }
                for (int a = 0; a < MR; a++) for (int x = 0; x < 4; x++) st(&s[r + a][half + 16 * x], c[a][x]);
            }
            for (int r = 0; r < RT; r++) {  /* online softmax */
                long vis = pos[r] + 1 - k0;  /* keys of this chunk the row sees */
                if (vis > nk) vis = nk;
                if (vis < 0) vis = 0;
                for (long j = vis; j < CK; j++) s[r][j] = -1e30f;
                v16 mv = ld(&s[r][0]);
                for (int x = 1; x < CK / 16; x++) mv = vmax(mv, ld(&s[r][16 * x]));
                float mx = m[r];
                for (int z = 0; z < 16; z++) mx = mv[z] > mx ? mv[z] : mx;
                float corr = expf(m[r] - mx);
                v16 sum = splat(0.f);
                for (int x = 0; x < CK / 16; x++) {
                    v16 p = vexp(ld(&s[r][16 * x]) - splat(mx));
                    st(&s[r][16 * x], p);
                }
                for (long j = vis; j < CK; j++) s[r][j] = 0.f;
                for (int x = 0; x < CK / 16; x++) sum += ld(&s[r][16 * x]);
                float tot = 0.f;
                for (int z = 0; z < 16; z++) tot += sum[z];
                l[r] = l[r] * corr + tot;
                m[r] = mx;
                if (corr != 1.0f) for (int x = 0; x < NV; x++) acc[r][x] *= splat(corr);
            }
            for (int r = 0; r < RT; r += MR) {  /* probabilities times values */
                v16 o[MR][NV];
                for (int a = 0; a < MR; a++) for (int x = 0; x < NV; x++) o[a][x] = acc[r + a][x];
                for (long j = 0; j < nk; j++) {
                    const float *v = vrow[j];
                    v16 v0 = ld(v), v1 = ld(v + 16), v2 = ld(v + 32), v3 = ld(v + 48);
                    for (int a = 0; a < MR; a++) {
                        v16 p = splat(s[r + a][j]);
                        o[a][0] += p * v0; o[a][1] += p * v1; o[a][2] += p * v2; o[a][3] += p * v3;
                    }
                }
                for (int a = 0; a < MR; a++) for (int x = 0; x < NV; x++) acc[r + a][x] = o[a][x];
            }
        }
        for (long r = 0; r < rows; r++) {
            v16 inv = splat(1.0f / l[r]);
            float *o = out + (h * R + r0 + r) * HD;
            for (int x = 0; x < NV; x++) st(o + 16 * x, acc[r][x] * inv);
            if (lse) lse[h * R + r0 + r] = m[r] + logf(l[r]);
        }
    }
    }
    free(ktall);
    return 0;
}
"""

_ARGTYPES = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
              ctypes.c_void_p] + [ctypes.c_long] * 4 + [ctypes.c_float, ctypes.c_void_p,
                                                         ctypes.c_void_p, ctypes.c_int])

_kernel: list[object] = []  # [ctypes function or None] once loading was tried


def kernel(cache_dir: Path | None = None) -> object | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    if not _kernel:
        _kernel.append(ckernels.load("attention", SOURCE, "kvrelay_attend", _ARGTYPES,
                                     cache_dir, libs=("-lm",)))
    return _kernel[0]


def enabled() -> bool:
    """Not switched off by ``KVRELAY_CPU_ATTENTION=0``."""
    return os.environ.get("KVRELAY_CPU_ATTENTION", "1").strip().lower() not in ("0", "false", "no", "off")


def usable(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Whether a pass of this dtype, head dimension and device can use the kernel here
    (what the runner asks once per pass)."""
    return (device.type == "cpu" and dtype == torch.float32 and head_dim == HEAD_DIM
            and enabled() and kernel() is not None)


def supports(q: torch.Tensor, kv_layer: torch.Tensor) -> bool:
    """Float32 CPU tensors with head dimension 64, the kernel built and not switched off."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and kv_layer.dtype == torch.float32
            and q.shape[-1] == HEAD_DIM and kv_layer.shape[-1] == HEAD_DIM
            and kv_layer.stride(-1) == 1 and kv_layer[0, 0].is_contiguous()
            and enabled() and kernel() is not None)


def attend(q: torch.Tensor, kv_layer: torch.Tensor, table: torch.Tensor, start: int,
           scale: float) -> torch.Tensor:
    """One sequence's ``T`` new tokens at positions ``start ..`` over keys ``0 ..
    start+T-1`` of its block ``table`` (int64, covering them), causal; the new tokens' K/V
    must be in the pool already. q (1, T, H, hd), kv_layer (NB, 2, bs, kvh, hd) -> (1, T,
    H*hd)."""
    return _attend(q, kv_layer, table, start, scale, False)[0]


def attend_with_lse(q: torch.Tensor, kv_layer: torch.Tensor, table: torch.Tensor, start: int,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend`` and the log-sum-exps of the scores, (1, H, T)."""
    out, lse = _attend(q, kv_layer, table, start, scale, True)
    assert lse is not None
    return out, lse


def _attend(q: torch.Tensor, kv_layer: torch.Tensor, table: torch.Tensor, start: int,
            scale: float, with_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    fn = kernel()
    if fn is None or not supports(q, kv_layer):
        raise RuntimeError("the attention kernel takes float32 CPU tensors with head dim 64")
    _, t, heads, hd = q.shape
    _, _, bs, kvh, _ = kv_layer.shape
    g = heads // kvh
    if -(-(start + t) // bs) > table.numel():
        raise ValueError(f"the block table holds {table.numel()} blocks of {bs}; "
                         f"{start + t} tokens need more")
    table = table.to(torch.int64).contiguous()
    stacked = q[0].transpose(0, 1).reshape(kvh, g * t, hd).contiguous()  # (kvh, g*T, hd)
    out = torch.empty(kvh, g * t, hd)
    lse = torch.empty(kvh, g * t) if with_lse else None
    status = fn(stacked.data_ptr(), g * t, t, start, kv_layer.data_ptr(),  # type: ignore[operator]
                table.data_ptr(), kv_layer.stride(0), kv_layer.stride(1), bs, kvh, scale,
                out.data_ptr(), None if lse is None else lse.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("the attention kernel could not allocate its transposed keys")
    result = out.view(heads, t, hd).transpose(0, 1).reshape(1, t, heads * hd)
    return result, None if lse is None else lse.view(1, heads, t)
