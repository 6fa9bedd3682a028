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
  once per call, 16 x 16 blocks in registers) so that a 6-row x 64-key block of scores is
  24 vector accumulators fed by broadcast query values (``scores_block``); the running
  maximum and sum are updated per row (``softmax_step``; the exponential is a degree-6
  polynomial after range reduction, to about one unit in the last place), and the
  probabilities times V go into 6 x 64 accumulators the same way (``values_block``);
* keys past a row's position get no weight; chunks past every row of a task are skipped.

A pass of several rows over held context (a decode worker admitting new prompts onto
fetched prefixes) calls ``attend`` row by row. Decode steps (``attend_steps``) go through
the same library: every row's one new token over its own blocks, read in place, without
the per-layer gather of each row's context and the masked product over the padded batch
that PyTorch needs. Rows whose tables start with the same blocks (a shared system prompt,
held once) form a group whose query rows are stacked over those keys, as in a prefix pass,
and each row then reads only its own blocks; the two parts merge by log-sum-exps. A row's
own keys take the dot-product form (a few query rows per KV head: each key is read once,
16 scores summed across lanes together, nothing transposed), one task per row and all its
KV heads, so that a block is read front to back. On a 2-core AMD EPYC (Zen 4), 16 rows
over 568 tokens of SmolLM2-135M, 30 layers: 33-44 ms with each row's blocks its own
against 54-65 ms for gather and SDPA, 10-15 ms with a 512-token prefix shared against
18-29 ms for ``attention.shared_attention``.

Head dimension 64 only (SmolLM2, Llama 3.2 1B, Qwen2 0.5B), float32 only. Results agree
with PyTorch's flash kernel to float rounding (~1e-6), as the order of the sums differs.
Built by ``engine.ckernels`` on first use; where it cannot be (no compiler), or with
``KVRELAY_CPU_ATTENTION=0`` in the environment, ``usable`` is False and the PyTorch
paths run (``attention.prefix_split_attention``, ``attention.shared_attention``, SDPA).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
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

/* One row's step of the online softmax over a chunk of `width` scores s (a multiple of
   16), of which the first `vis` count: the rest become zero probabilities. s is replaced
   by exp(s - the new maximum); the running maximum m and sum l are updated and the row's
   accumulators acc rescaled to the new maximum. */
static inline void softmax_step(float *s, int width, long vis, float *m, float *l, v16 *acc) {
    for (long j = vis; j < width; j++) s[j] = -1e30f;
    v16 mv = ld(s);
    for (int x = 1; x < width / 16; x++) mv = vmax(mv, ld(s + 16 * x));
    float mx = *m;
    for (int z = 0; z < 16; z++) mx = mv[z] > mx ? mv[z] : mx;
    float corr = expf(*m - mx);
    v16 sum = splat(0.f);
    for (int x = 0; x < width / 16; x++) st(s + 16 * x, vexp(ld(s + 16 * x) - splat(mx)));
    for (long j = vis; j < width; j++) s[j] = 0.f;
    for (int x = 0; x < width / 16; x++) sum += ld(s + 16 * x);
    float tot = 0.f;
    for (int z = 0; z < 16; z++) tot += sum[z];
    *l = *l * corr + tot;
    *m = mx;
    if (corr != 1.0f) for (int x = 0; x < NV; x++) acc[x] *= splat(corr);
}

/* Scores of MR query rows qs[0 .. MR) against 64 keys whose K is transposed at kt
   (kt[d * ldk + j]): 24 vector accumulators fed by broadcast query values; row a's go to
   s + a * lds. */
static inline __attribute__((always_inline)) void scores_block(
        float qs[][HD], const float *kt, long ldk, float *s, long lds) {
    v16 c[MR][4];
    for (int a = 0; a < MR; a++) for (int x = 0; x < 4; x++) c[a][x] = splat(0.f);
    for (int d = 0; d < HD; d++) {
        const float *kd = kt + d * ldk;
        v16 k0v = ld(kd), k1v = ld(kd + 16), k2v = ld(kd + 32), k3v = ld(kd + 48);
        for (int a = 0; a < MR; a++) {
            v16 b = splat(qs[a][d]);
            c[a][0] += b * k0v; c[a][1] += b * k1v; c[a][2] += b * k2v; c[a][3] += b * k3v;
        }
    }
    for (int a = 0; a < MR; a++) for (int x = 0; x < 4; x++) st(s + a * lds + 16 * x, c[a][x]);
}

/* acc[a] += the probabilities s[a * lds + j] times the values at vrow[j], for MR rows and
   nk keys. */
static inline __attribute__((always_inline)) void values_block(
        const float *s, long lds, const float *const *vrow, long nk, v16 acc[][NV]) {
    v16 o[MR][NV];
    for (int a = 0; a < MR; a++) for (int x = 0; x < NV; x++) o[a][x] = acc[a][x];
    for (long j = 0; j < nk; j++) {
        const float *v = vrow[j];
        v16 v0 = ld(v), v1 = ld(v + 16), v2 = ld(v + 32), v3 = ld(v + 48);
        for (int a = 0; a < MR; a++) {
            v16 p = splat(s[a * lds + j]);
            o[a][0] += p * v0; o[a][1] += p * v1; o[a][2] += p * v2; o[a][3] += p * v3;
        }
    }
    for (int a = 0; a < MR; a++) for (int x = 0; x < NV; x++) acc[a][x] = o[a][x];
}

/* dst[d * stride + j] = keys[j][d0 + d] for 16 keys (fewer than 16: zero past the n-th)
   and 16 dimensions: four rounds of interleaving rows i and i + 8 transpose a 16 x 16 block
   in registers. */
static inline void transpose16(const float *const *keys, long n, int d0, float *dst,
                               long stride) {
    v16 r[16], o[16];
    for (int j = 0; j < 16; j++) r[j] = j < n ? ld(keys[j] + d0) : splat(0.f);
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < 8; i++) {
            o[2 * i] = __builtin_shufflevector(r[i], r[i + 8], 0, 16, 1, 17, 2, 18, 3, 19,
                                               4, 20, 5, 21, 6, 22, 7, 23);
            o[2 * i + 1] = __builtin_shufflevector(r[i], r[i + 8], 8, 24, 9, 25, 10, 26, 11,
                                                   27, 12, 28, 13, 29, 14, 30, 15, 31);
        }
        memcpy(r, o, sizeof r);
    }
    for (int d = 0; d < 16; d++) st(dst + d * stride, r[d]);
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
        for (long j0 = 0; j0 < CK; j0 += 16)
            for (int d0 = 0; d0 < HD; d0 += 16)
                transpose16(kp + j0, n - j0, d0, kt + d0 * ldk + j0, ldk);
    }
    #pragma omp for schedule(dynamic, 1)
    for (long task = 0; task < ntasks; task++) {
        long h = task / tiles, r0 = (task % tiles) * RT;
        long rows = R - r0 < RT ? R - r0 : RT;
        int nrp = (int)((rows + MR - 1) / MR * MR);  /* rows computed: whole register blocks */
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
            for (int r = 0; r < nrp; r += MR)  /* scores: MR rows x 64 keys at a time */
                for (int half = 0; half < CK && half < nk; half += 64)
                    scores_block(&qs[r], ktc + half, ldk, &s[r][half], CK);
            for (int r = 0; r < nrp; r++) {  /* online softmax */
                long vis = pos[r] + 1 - k0;  /* keys of this chunk the row sees */
                if (vis > nk) vis = nk;
                if (vis < 0) vis = 0;
                softmax_step(s[r], CK, vis, &m[r], &l[r], acc[r]);
            }
            for (int r = 0; r < nrp; r += MR)  /* probabilities times values */
                values_block(s[r], CK, vrow, nk, &acc[r]);
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

#define CD 64  /* keys per softmax step of the step kernel */

/* Rows qs[0 .. nr) (scaled, zero from nr up to a multiple of MR) over keys k0 .. k1-1 of a
   block table, every key visible to every row; the running maximum m, sum l and
   accumulators acc of each row are updated in place. Each chunk of CD keys is transposed
   into kt first, so that a block of MR rows x 64 keys of scores is 24 accumulators. */
static void rows_over_keys(float qs[RT][HD], int nr, const float *base, const long *table,
                           long k0, long k1, long bstride, long voff, long bs, long kvh,
                           long h, float *m, float *l, v16 acc[RT][NV]) {
    float kt[HD][CD] __attribute__((aligned(64)));
    float s[RT][CD] __attribute__((aligned(64)));
    const float *krow[CD], *vrow[CD];
    int nrp = (nr + MR - 1) / MR * MR;
    for (long c0 = k0; c0 < k1; c0 += CD) {
        int nk = k1 - c0 < CD ? (int)(k1 - c0) : CD;
        for (int j = 0; j < nk; j++) {
            long key = c0 + j;
            krow[j] = base + table[key / bs] * bstride + ((key % bs) * kvh + h) * HD;
            vrow[j] = krow[j] + voff;
        }
        for (int j0 = 0; j0 < CD; j0 += 16)
            for (int d0 = 0; d0 < HD; d0 += 16)
                transpose16(krow + j0, nk - j0, d0, &kt[d0][j0], CD);
        for (int r = 0; r < nrp; r += MR)  /* scores */
            scores_block(&qs[r], &kt[0][0], CD, s[r], CD);
        for (int r = 0; r < nrp; r++)  /* online softmax */
            softmax_step(s[r], CD, nk, &m[r], &l[r], acc[r]);
        for (int r = 0; r < nrp; r += MR)  /* probabilities times values */
            values_block(s[r], CD, vrow, nk, &acc[r]);
    }
}

/* Lane j of the result: the sum of the 16 lanes of x[j] (a transpose-and-add network:
   pairs of vectors swap halves and add, four times, then one shuffle undoes the
   bit-reversed order the halvings leave). */
static inline v16 sum_lanes16(const v16 x[16]) {
    v16 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7,
                                       16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15,
                                       24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19,
                                       8, 9, 10, 11, 24, 25, 26, 27)
             + __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23,
                                       12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21,
                                       8, 9, 24, 25, 12, 13, 28, 29)
             + __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23,
                                       10, 11, 26, 27, 14, 15, 30, 31);
    v16 d = __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26,
                                    12, 28, 14, 30)
          + __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27,
                                    13, 29, 15, 31);
    return __builtin_shufflevector(d, d, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

/* rows_over_keys for one decode row's query heads (row r of qs is a query head of KV head
   h + r / g): each score is a dot product of a query row and a key read where it lies, 16
   keys summed across lanes at once, so no key is transposed; with all KV heads in one
   task, a block is read front to back. */
static void few_rows_over_keys(float qs[RT][HD], int nr, int g, const float *base,
                               const long *table, long k0, long k1, long bstride, long voff,
                               long bs, long kvh, long h, float *m, float *l, v16 acc[RT][NV]) {
    float s[RT][CD] __attribute__((aligned(64)));
    const float *krow[CD];
    for (long c0 = k0; c0 < k1; c0 += CD) {
        int nk = k1 - c0 < CD ? (int)(k1 - c0) : CD;
        for (int j = 0; j < nk; j++) {
            long key = c0 + j;
            krow[j] = base + table[key / bs] * bstride + ((key % bs) * kvh + h) * HD;
        }
        for (int r = 0; r < nr; r++) {
            v16 q0 = ld(qs[r]), q1 = ld(qs[r] + 16), q2 = ld(qs[r] + 32), q3 = ld(qs[r] + 48);
            long hoff = (r / g) * HD;
            for (int j0 = 0; j0 < CD; j0 += 16) {
                v16 t[16];
                for (int j = 0; j < 16; j++) {
                    if (j0 + j < nk) {
                        const float *k = krow[j0 + j] + hoff;
                        t[j] = q0 * ld(k) + q1 * ld(k + 16) + q2 * ld(k + 32) + q3 * ld(k + 48);
                    } else {
                        t[j] = splat(0.f);
                    }
                }
                st(&s[r][j0], sum_lanes16(t));
            }
            softmax_step(s[r], CD, nk, &m[r], &l[r], acc[r]);  /* online softmax */
        }
        for (int r = 0; r < nr; r++) {  /* probabilities times values */
            v16 o0 = acc[r][0], o1 = acc[r][1], o2 = acc[r][2], o3 = acc[r][3];
            const float *vh = base + voff + (r / g) * HD;
            for (int j = 0; j < nk; j++) {
                const float *v = krow[j] - base + vh;
                v16 p = splat(s[r][j]);
                o0 += p * ld(v); o1 += p * ld(v + 16); o2 += p * ld(v + 32); o3 += p * ld(v + 48);
            }
            acc[r][0] = o0; acc[r][1] = o1; acc[r][2] = o2; acc[r][3] = o3;
        }
    }
}

/* One step of B rows, each one new token (its K/V already in the pool) at position
   nkeys[b] - 1 over keys 0 .. nkeys[b]-1 of its table (tables + tab_off[b]). q and out
   (B, H, HD) with H = kvh * g. Groups of rows whose tables start with the same blocks:
   group i's rows are grp_rows[grp_off[i] .. grp_off[i+1]), its first grp_keys[i] keys are
   attended once for all of them (their query rows stacked), each member's own part starts
   at skip[b] (0 for rows in no group), and the two parts are merged by log-sum-exps.
   Returns 0, or -1 when out of memory. */
int kvrelay_attend_steps(const float *q, long B, long g, const float *base, long bstride,
                         long voff, long bs, long kvh, const long *tables, const long *tab_off,
                         const long *nkeys, const long *skip, long ngroups,
                         const long *grp_off, const long *grp_rows, const long *grp_keys,
                         float scale, float *out, int threads) {
    if (threads < 1) threads = 1;
    /* a row's own keys: all its KV heads in one task where there are rows enough to keep
       the threads busy, else one task per KV head (and tiles of RT query heads) */
    long H = kvh * g, whole = B >= 2 * threads && H <= RT;
    long otiles = whole ? 1 : (g + RT - 1) / RT, oheads = whole ? 1 : kvh;
    long *gstart = malloc((size_t)(ngroups + 1) * sizeof(long));
    float *lse = malloc((size_t)(B * H) * sizeof(float));
    float *glse = malloc((size_t)(B * H) * sizeof(float));
    float *gout = ngroups ? aligned_alloc(64, (size_t)(B * H * HD) * sizeof(float)) : NULL;
    if (!gstart || !lse || !glse || (ngroups && !gout)) {
        free(gstart); free(lse); free(glse); free(gout);
        return -1;
    }
    gstart[0] = 0;
    for (long i = 0; i < ngroups; i++)
        gstart[i + 1] = gstart[i] + kvh * (((grp_off[i + 1] - grp_off[i]) * g + RT - 1) / RT);
    long gtasks = gstart[ngroups], ntasks = gtasks + B * oheads * otiles;
    #pragma omp parallel num_threads(threads)
    {
    #pragma omp for schedule(dynamic, 1)
    for (long task = 0; task < ntasks; task++) {
        float qs[RT][HD] __attribute__((aligned(64)));
        float m[RT], l[RT];
        v16 acc[RT][NV];
        long rowq[RT];  /* b * H + query head of each row */
        const long *table;
        long h, k0, k1, nr;
        int shared = task < gtasks;
        if (shared) {  /* a group's rows over its shared keys */
            long i = 0;
            while (gstart[i + 1] <= task) i++;
            long n = grp_off[i + 1] - grp_off[i], tiles = (gstart[i + 1] - gstart[i]) / kvh;
            long local = task - gstart[i], r0 = (local % tiles) * RT;
            const long *members = grp_rows + grp_off[i];
            h = local / tiles;
            nr = n * g - r0 < RT ? n * g - r0 : RT;
            for (long r = 0; r < nr; r++)
                rowq[r] = members[(r0 + r) / g] * H + h * g + (r0 + r) % g;
            table = tables + tab_off[members[0]];
            k0 = 0; k1 = grp_keys[i];
        } else {  /* one row's query heads of one KV head over its own keys */
            long local = task - gtasks, b = local / (oheads * otiles), r0 = (local % otiles) * RT;
            h = whole ? 0 : (local / otiles) % kvh;
            nr = whole ? H : (g - r0 < RT ? g - r0 : RT);
            for (long r = 0; r < nr; r++) rowq[r] = b * H + h * g + r0 + r;
            table = tables + tab_off[b];
            k0 = skip[b]; k1 = nkeys[b];
        }
        for (int r = 0; r < RT; r++) {
            m[r] = -1e30f; l[r] = 0.f;
            for (int x = 0; x < NV; x++) acc[r][x] = splat(0.f);
            for (int d = 0; d < HD; d++) qs[r][d] = r < nr ? q[rowq[r] * HD + d] * scale : 0.f;
        }
        if (!shared && (whole || nr <= MR))
            few_rows_over_keys(qs, (int)nr, (int)(whole ? g : nr),  /* else all of head h */
                               base, table, k0, k1, bstride, voff, bs, kvh, h, m, l, acc);
        else
            rows_over_keys(qs, (int)nr, base, table, k0, k1, bstride, voff, bs, kvh, h, m, l, acc);
        for (long r = 0; r < nr; r++) {
            float *o = (shared ? gout : out) + rowq[r] * HD;
            v16 inv = splat(l[r] > 0.f ? 1.0f / l[r] : 0.f);
            for (int x = 0; x < NV; x++) st(o + 16 * x, acc[r][x] * inv);
            (shared ? glse : lse)[rowq[r]] = l[r] > 0.f ? m[r] + logf(l[r]) : -INFINITY;
        }
    }
    #pragma omp for schedule(static)
    for (long b = 0; b < B; b++) {  /* merge the shared and own parts */
        if (skip[b] <= 0) continue;
        for (long hq = 0; hq < H; hq++) {
            long row = b * H + hq;
            float top = lse[row] > glse[row] ? lse[row] : glse[row];
            float wo = expf(lse[row] - top), wg = expf(glse[row] - top), inv = 1.0f / (wo + wg);
            float *o = out + row * HD;
            const float *p = gout + row * HD;
            for (int x = 0; x < NV; x++)
                st(o + 16 * x, (ld(o + 16 * x) * splat(wo) + ld(p + 16 * x) * splat(wg)) * splat(inv));
        }
    }
    }
    free(gstart); free(lse); free(glse); free(gout);
    return 0;
}
"""

_ARGTYPES = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
              ctypes.c_void_p] + [ctypes.c_long] * 4 + [ctypes.c_float, ctypes.c_void_p,
                                                         ctypes.c_void_p, ctypes.c_int])

_STEP_ARGTYPES = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
                  + [ctypes.c_long] * 4 + [ctypes.c_void_p] * 4 + [ctypes.c_long]
                  + [ctypes.c_void_p] * 3 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int])

_kernel: list[object] = []  # [ctypes function or None] once loading was tried
_step_kernel: list[object] = []


def kernel(cache_dir: Path | None = None) -> object | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    if not _kernel:
        _kernel.append(ckernels.load("attention", SOURCE, "kvrelay_attend", _ARGTYPES,
                                     cache_dir, libs=("-lm",)))
    return _kernel[0]


def step_kernel(cache_dir: Path | None = None) -> object | None:
    """The decode-step function of the same library (``attend_steps``), or None."""
    if not _step_kernel:
        _step_kernel.append(None if kernel(cache_dir) is None else ckernels.load(
            "attention", SOURCE, "kvrelay_attend_steps", _STEP_ARGTYPES, cache_dir,
            libs=("-lm",)))
    return _step_kernel[0]


def enabled() -> bool:
    """Not switched off by ``KVRELAY_CPU_ATTENTION=0``."""
    return ckernels.switched_on("KVRELAY_CPU_ATTENTION")


def usable(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Whether a pass of this dtype, head dimension and device can use the kernel here
    (what the runner asks once per pass)."""
    return (device.type == "cpu" and dtype == torch.float32 and head_dim == HEAD_DIM
            and enabled() and kernel() is not None and step_kernel() is not None)


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


@dataclass(frozen=True)
class StepLayout:
    """What a decode step's rows attend to, built once per pass and read by every layer
    (``attend_steps``): each row's block table (``tables`` from ``tab_off[b]``), its key
    count (its new token's position + 1), and groups of rows whose tables start with the
    same blocks (``grp_rows[grp_off[i]:grp_off[i+1]]`` share their first ``grp_keys[i]``
    keys; ``skip[b]`` is that count for a member, 0 for a row in no group). All int64."""

    tables: torch.Tensor
    tab_off: torch.Tensor
    nkeys: torch.Tensor
    skip: torch.Tensor
    grp_off: torch.Tensor
    grp_rows: torch.Tensor
    grp_keys: torch.Tensor

    @classmethod
    def build(cls, tables: Sequence[Sequence[int]], nkeys: Sequence[int], block_size: int,
              groups: Sequence[tuple[Sequence[int], int]] = ()) -> StepLayout:
        """Row ``b`` holds ``nkeys[b]`` keys in the blocks of ``tables[b]``; each group is
        (its rows, how many leading blocks they share). Only the blocks that hold keys
        are kept."""
        flat: list[int] = []
        offsets = []
        for table, n in zip(tables, nkeys):
            need = -(-n // block_size)
            if need > len(table):
                raise ValueError(f"a block table of {len(table)} blocks of {block_size} "
                                 f"cannot hold {n} keys")
            offsets.append(len(flat))
            flat += table[:need]
        skip = [0] * len(nkeys)
        grp_off, grp_rows, grp_keys = [0], list[int](), list[int]()
        for rows, blocks in groups:
            keys = blocks * block_size
            if any(keys >= nkeys[b] for b in rows):
                raise ValueError("a group's shared blocks must lie before its rows' new tokens")
            for b in rows:
                skip[b] = keys
            grp_rows += rows
            grp_off.append(len(grp_rows))
            grp_keys.append(keys)

        def longs(values: Sequence[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64)

        return cls(longs(flat), longs(offsets), longs(nkeys), longs(skip), longs(grp_off),
                   longs(grp_rows), longs(grp_keys))


def attend_steps(q: torch.Tensor, kv_layer: torch.Tensor, layout: StepLayout,
                 scale: float) -> torch.Tensor:
    """One decode step of ``B`` rows over their pool blocks, read in place; the new tokens'
    K/V must be in the pool already. q (B, 1, H, hd), kv_layer (NB, 2, bs, kvh, hd) ->
    (B, 1, H*hd)."""
    fn = step_kernel()
    if fn is None or not supports(q, kv_layer):
        raise RuntimeError("the attention kernel takes float32 CPU tensors with head dim 64")
    batch, t, heads, hd = q.shape
    _, _, bs, kvh, _ = kv_layer.shape
    if t != 1 or layout.nkeys.numel() != batch:
        raise ValueError(f"a step takes one new token for each of the layout's "
                         f"{layout.nkeys.numel()} rows, not ({batch}, {t})")
    q = q.contiguous()
    out = torch.empty(batch, 1, heads * hd)
    ngroups = layout.grp_keys.numel()
    status = fn(q.data_ptr(), batch, heads // kvh, kv_layer.data_ptr(),  # type: ignore[operator]
                kv_layer.stride(0), kv_layer.stride(1), bs, kvh, layout.tables.data_ptr(),
                layout.tab_off.data_ptr(), layout.nkeys.data_ptr(), layout.skip.data_ptr(),
                ngroups, layout.grp_off.data_ptr(), layout.grp_rows.data_ptr(),
                layout.grp_keys.data_ptr(), scale, out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("the attention kernel could not allocate its buffers")
    return out
