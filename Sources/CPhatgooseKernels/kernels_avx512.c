/* AVX-512 (F, BW, VL) implementations of the product kernels (gemm_nt, LoRA shrink, LoRA expand; the packed-panel
 * GEMM is in gemm_panels.c) and of LayerNorm. The other kernels (conversions, add) are memory-bound and run their
 * AVX2 versions under this ISA too (dispatch.c).
 *
 * As in kernels_avx2.c, every function carries a target attribute instead of relying on -m flags, and FMAs come
 * only from explicit intrinsics (contraction is off).
 *
 * Determinism. Dot products (gemm_nt, shrink): a single 16-wide FMA accumulator starting at +0, over the
 * 16-element chunks of k in increasing order; the k % 16 tail as one more chunk whose missing elements are zero;
 * then the fixed reduction (lanes l and l+8 first, then the AVX2 kernels' 8-lane tree), then one multiply by the
 * row's scale. Register tiles and k-blocks (accumulators stored to a stack buffer and reloaded, which is exact)
 * only interleave independent accumulators, so no output depends on its neighbours, its position or the caller's
 * split. Dot products differ from the AVX2 ISA's in the last bits (16 partial sums instead of 8).
 * Expand: every output is the FMA chain acc = fma(h[i,j], Bt[j,o], acc) over j = 0..r-1 from +0, in a vector lane,
 * so expand gives the same bits as the AVX2 and scalar-FMA paths.
 *
 * Performance notes (Sapphire Rapids class, two 512-bit FMA ports, p0 and p5): the bulk tiles keep 24 of the 32
 * accumulator registers busy; the x rows of a tile stream from L1/L2 and the other operand
 * from L2. BF16 weights widen with VPMOVZXWD + VPSLLD in the dot products (2 uops per 16 values, on the
 * FMA ports) and with one VPSLLD or VPANDD per 16 values in expand (even and odd columns of a 64-byte load,
 * re-interleaved once per tile at the store). */
#include "pg_internal.h"

#if PG_HAVE_AVX2_IMPL

#include <immintrin.h>
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define P5_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define P5_INL static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define P5_UNROLL _Pragma("GCC unroll 16")

/* lanes 0..t-1 set, t in 0..16 */
P5_INL __mmask16 p5_mask(size_t t) { return (__mmask16)((1u << t) - 1u); }

/* lanes l and l + 8 first, then ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)) */
P5_INL float p5_hsum16(__m512 v) {
    __m256 lo = _mm512_castps512_ps256(v);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    __m256 e = _mm256_add_ps(lo, hi);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(e), _mm256_extractf128_ps(e, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 elements of dtype DT at element index idx of base, as F32 (exact) */
P5_INL __m512 p5_ld16(const int DT, const void *base, size_t idx) {
    if (DT == PG_DTYPE_F32) return _mm512_loadu_ps((const void *)PG_AT(base, idx, 4));
    __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)PG_AT(base, idx, 2));
    if (DT == PG_DTYPE_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    return _mm512_cvtph_ps(v);
}

/* t (< 16) elements, the other lanes zero; masked-off elements are not read (no fault past the end) */
P5_INL __m512 p5_ld16_tail(const int DT, const void *base, size_t idx, size_t t) {
    __mmask16 m = p5_mask(t);
    if (DT == PG_DTYPE_F32) return _mm512_maskz_loadu_ps(m, (const void *)PG_AT(base, idx, 4));
    __m256i v = _mm256_maskz_loadu_epi16(m, (const void *)PG_AT(base, idx, 2));
    if (DT == PG_DTYPE_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    return _mm512_cvtph_ps(v);
}

/* ================================================================ NT products (gemm, shrink) */

#define NT5_MR 6     /* rows of the f32 operand per full tile (6 x 4 measured a few % faster than 8 x 3) */
#define NT5_MAXNR 8  /* most typed-operand rows in any tile */
/* k-block (multiple of 16) once k is larger than this. Blocking k to keep the tile's x rows in L1 (512: 6 x 2 KiB)
 * measured slower (44 against 73 GFLOP/s for the BF16 shrink at d_in 2048, 64 against 66 at 5120): the rows stream
 * well enough from L2, and the accumulator round trips cost more. Only widths beyond 8192 block. */
#define NT5_KC 8192
#define NT5_NCMAX 48 /* most typed-operand rows per column block when k-blocking; stack NT5_NCMAX*NT5_MR*64 B */

/* Typed-operand rows per tile for a tile of mr rows: at most 24 accumulators, plus the held operand vectors and
 * one streamed vector within the 32 registers. */
P5_INL int nt5_nr_for(int mr) {
    switch (mr) {
    case 1: return 8;
    case 2: return 8;
    case 3: return 6;
    case 4: return 5;
    default: return 4;
    }
}

/* One MR x NR tile over the chunks [p0, p1) of k (multiples of 16), then `tail` elements at p1 when tail > 0.
 * Accumulators start at zero or from slot (load); at the end they go to slot (store) or are reduced into sums.
 * In slot, accumulator (i, j) is at (j * NT5_MR + i) * 16. */
P5_INL void nt5_tile(const int MR, const int NR, const int DT, const float *const *ar, const void *b, size_t ldb,
                     size_t p0, size_t p1, size_t tail, float *slot, int load, int store,
                     float sums[NT5_MR][NT5_MAXNR]) {
    __m512 acc[NT5_MR][NT5_MAXNR];
    const char *b0 = (const char *)b;
    const size_t bstride = ldb * (DT == PG_DTYPE_F32 ? 4 : 2);
    P5_UNROLL
    for (int i = 0; i < MR; i++) {
        P5_UNROLL
        for (int j = 0; j < NR; j++)
            acc[i][j] = load ? _mm512_loadu_ps(slot + (j * NT5_MR + i) * 16) : _mm512_setzero_ps();
    }
    if (MR > NR) {
        /* the NR converted b vectors stay in registers, the rows of x stream */
        for (size_t p = p0; p < p1; p += 16) {
            __m512 bv[NT5_MAXNR];
            P5_UNROLL
            for (int j = 0; j < NR; j++) bv[j] = p5_ld16(DT, b0 + (size_t)j * bstride, p);
            P5_UNROLL
            for (int i = 0; i < MR; i++) {
                __m512 av = _mm512_loadu_ps(ar[i] + p);
                P5_UNROLL
                for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
            }
        }
    } else {
        /* the MR x vectors stay in registers, the b rows stream */
        for (size_t p = p0; p < p1; p += 16) {
            __m512 av[NT5_MR];
            P5_UNROLL
            for (int i = 0; i < MR; i++) av[i] = _mm512_loadu_ps(ar[i] + p);
            P5_UNROLL
            for (int j = 0; j < NR; j++) {
                __m512 bv = p5_ld16(DT, b0 + (size_t)j * bstride, p);
                P5_UNROLL
                for (int i = 0; i < MR; i++) acc[i][j] = _mm512_fmadd_ps(av[i], bv, acc[i][j]);
            }
        }
    }
    if (tail) {
        __mmask16 m = p5_mask(tail);
        __m512 av[NT5_MR];
        P5_UNROLL
        for (int i = 0; i < MR; i++) av[i] = _mm512_maskz_loadu_ps(m, ar[i] + p1);
        P5_UNROLL
        for (int j = 0; j < NR; j++) {
            __m512 bv = p5_ld16_tail(DT, b0 + (size_t)j * bstride, p1, tail);
            P5_UNROLL
            for (int i = 0; i < MR; i++) acc[i][j] = _mm512_fmadd_ps(av[i], bv, acc[i][j]);
        }
    }
    if (store) {
        P5_UNROLL
        for (int i = 0; i < MR; i++) {
            P5_UNROLL
            for (int j = 0; j < NR; j++) _mm512_storeu_ps(slot + (j * NT5_MR + i) * 16, acc[i][j]);
        }
    } else {
        P5_UNROLL
        for (int i = 0; i < MR; i++) {
            P5_UNROLL
            for (int j = 0; j < NR; j++) sums[i][j] = p5_hsum16(acc[i][j]);
        }
    }
}

#define NT5_CASE(MR, NR)                                                                                         \
    case (MR) * 16 + (NR): nt5_tile(MR, NR, DT, ar, bj, ldb, p0, p1, tl, slot, load, store, sums); break;
#define NT5_ROW(MR) NT5_CASE(MR, 1) NT5_CASE(MR, 2) NT5_CASE(MR, 3)

/* Every tile shape nt5_generic uses: mr rows by 1..nt5_nr_for(mr) columns. */
P5_INL void nt5_tile_dispatch(const int DT, int mr, int nr, const float *const *ar, const void *bj, size_t ldb,
                              size_t p0, size_t p1, size_t tl, float *slot, int load, int store,
                              float sums[NT5_MR][NT5_MAXNR]) {
    switch (mr * 16 + nr) {
        NT5_ROW(1) NT5_CASE(1, 4) NT5_CASE(1, 5) NT5_CASE(1, 6) NT5_CASE(1, 7) NT5_CASE(1, 8)
        NT5_ROW(2) NT5_CASE(2, 4) NT5_CASE(2, 5) NT5_CASE(2, 6) NT5_CASE(2, 7) NT5_CASE(2, 8)
        NT5_ROW(3) NT5_CASE(3, 4) NT5_CASE(3, 5) NT5_CASE(3, 6)
        NT5_ROW(4) NT5_CASE(4, 4) NT5_CASE(4, 5)
        NT5_ROW(5) NT5_CASE(5, 4)
        NT5_ROW(6) NT5_CASE(6, 4)
    default: break;
    }
}

/* out[i*ldo + j] = ((row_scale ? row_scale[i] : 1) * alpha) * dot(x row (rows ? rows[i] : i), b row j),
 * i < m, j < n, over k. Blocking as in the AVX2 kernel: column blocks of b (all of n when k <= NT5_KC; otherwise at
 * most NT5_NCMAX rows and about 1 MiB, to stay in L2), then tiles of NT5_MR rows of x, then k-blocks, then column
 * tiles. A block's columns are split into tiles of near-equal width (16 columns at most 3 wide: 3,3,3,3,2,2; at most 4 wide: 4,4,4,4), so
 * no narrow tile at the end re-reads the x rows for one column. */
P5_INL void nt5_generic(const int DT, const float *x, size_t ldx, const int32_t *rows, size_t m, const void *b,
                        size_t ldb, size_t n, size_t k, const float *row_scale, float alpha, float *out,
                        size_t ldo) {
    const size_t es = DT == PG_DTYPE_F32 ? 4 : 2;
    const size_t k16 = k & ~(size_t)15;
    const size_t tail = k - k16;
    const int kblocked = k16 > NT5_KC;
    float accbuf[NT5_NCMAX * NT5_MR * 16];

    size_t nc = n;
    if (kblocked) {
        size_t cap = ((size_t)1 << 20) / (k * es);
        if (cap < 1) cap = 1;
        if (cap > NT5_NCMAX) cap = NT5_NCMAX;
        size_t nblocks = (n + cap - 1) / cap;
        nc = (n + nblocks - 1) / nblocks;
    }

    for (size_t jc = 0; jc < n; jc += nc) {
        size_t jend = n - jc > nc ? jc + nc : n;
        size_t width = jend - jc;
        for (size_t i0 = 0; i0 < m; i0 += NT5_MR) {
            int mr = m - i0 >= NT5_MR ? NT5_MR : (int)(m - i0);
            size_t nrmax = (size_t)nt5_nr_for(mr);
            size_t ntiles = (width + nrmax - 1) / nrmax;
            size_t base = width / ntiles, extra = width % ntiles;
            const float *ar[NT5_MR];
            float sc[NT5_MR];
            for (int t = 0; t < mr; t++) {
                size_t src = rows ? (size_t)rows[i0 + t] : i0 + t;
                ar[t] = x + src * ldx;
                sc[t] = (row_scale ? row_scale[i0 + t] : 1.0f) * alpha;
            }
            size_t p0 = 0;
            do {
                size_t p1 = kblocked ? (k16 - p0 > NT5_KC ? p0 + NT5_KC : k16) : k16;
                int last = p1 == k16;
                size_t tl = last ? tail : 0;
                int load = p0 > 0;
                int store = !last;
                size_t j0 = jc;
                for (size_t t = 0; t < ntiles; t++) {
                    int nr = (int)(base + (t < extra ? 1 : 0));
                    const void *bj = (const char *)b + j0 * ldb * es;
                    float *slot = kblocked ? accbuf + (j0 - jc) * NT5_MR * 16 : NULL; /* nc <= NT5_NCMAX */
                    float sums[NT5_MR][NT5_MAXNR];
                    nt5_tile_dispatch(DT, mr, nr, ar, bj, ldb, p0, p1, tl, slot, load, store, sums);
                    if (last) {
                        for (int r = 0; r < mr; r++) {
                            float *orow = out + (i0 + (size_t)r) * ldo + j0;
                            for (int u = 0; u < nr; u++) orow[u] = sc[r] * sums[r][u];
                        }
                    }
                    j0 += (size_t)nr;
                }
                p0 = p1;
            } while (p0 < k16);
        }
    }
}

P5_TARGET void pg_avx512_gemm_nt_f32(const float *a, size_t lda, size_t m, const float *b, size_t ldb, size_t n,
                                     size_t k, float alpha, float *c, size_t ldc) {
    if (m == 0 || n == 0) return;
    nt5_generic(PG_DTYPE_F32, a, lda, NULL, m, b, ldb, n, k, NULL, alpha, c, ldc);
}

P5_TARGET static void shrink5_f32(const float *x, size_t ldx, const int32_t *rows, size_t n, const void *a,
                                  size_t r, size_t d_in, const float *row_scale, float lora_scale, float *h) {
    nt5_generic(PG_DTYPE_F32, x, ldx, rows, n, a, d_in, r, d_in, row_scale, lora_scale, h, r);
}

P5_TARGET static void shrink5_bf16(const float *x, size_t ldx, const int32_t *rows, size_t n, const void *a,
                                   size_t r, size_t d_in, const float *row_scale, float lora_scale, float *h) {
    nt5_generic(PG_DTYPE_BF16, x, ldx, rows, n, a, d_in, r, d_in, row_scale, lora_scale, h, r);
}

P5_TARGET static void shrink5_f16(const float *x, size_t ldx, const int32_t *rows, size_t n, const void *a,
                                  size_t r, size_t d_in, const float *row_scale, float lora_scale, float *h) {
    nt5_generic(PG_DTYPE_F16, x, ldx, rows, n, a, d_in, r, d_in, row_scale, lora_scale, h, r);
}

P5_TARGET void pg_avx512_lora_shrink(const float *x, size_t ldx, const int32_t *rows, size_t n, const void *a,
                                     int a_dtype, size_t r, size_t d_in, const float *row_scale, float lora_scale,
                                     float *h) {
    if (n == 0 || r == 0) return;
    switch (a_dtype) {
    case PG_DTYPE_F32: shrink5_f32(x, ldx, rows, n, a, r, d_in, row_scale, lora_scale, h); break;
    case PG_DTYPE_BF16: shrink5_bf16(x, ldx, rows, n, a, r, d_in, row_scale, lora_scale, h); break;
    case PG_DTYPE_F16: shrink5_f16(x, ldx, rows, n, a, r, d_in, row_scale, lora_scale, h); break;
    default: break;
    }
}

/* ================================================================ expand */

#define EX5_MR 6    /* rows of h per full tile */
#define EX5_MAXNV 8 /* most 16-wide column vectors in any tile */

/* Column vectors per tile for a tile of mr rows: at most 24 accumulators (even counts, for the BF16 pairs). */
P5_INL int ex5_nv_for(int mr) {
    switch (mr) {
    case 1: return 8;
    case 2: return 8;
    case 3: return 6;
    default: return 4;
    }
}

/* Vector v of a tile's row j of Bt. With `pairs` (BF16, NV even), 32 values come from one 64-byte load as two
 * vectors: the even columns (low halves shifted up) in vector 2q and the odd columns (high halves masked) in 2q+1. */
P5_INL __m512 ex5_ld(const int DT, const int pairs, const void *bt, size_t idx, int v) {
    if (pairs) {
        __m512i w = _mm512_loadu_si512((const void *)PG_AT(bt, idx + (size_t)(v / 2) * 32, 2));
        if (v % 2 == 0) return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xFFFF0000u)));
    }
    return p5_ld16(DT, bt, idx + (size_t)v * 16);
}

/* Where a result vector goes: stored, or (with a scatter list) added to what the row holds. */
P5_INL void p5_put(float *p, __m512 v, const int add) {
    _mm512_storeu_ps(p, add ? _mm512_add_ps(_mm512_loadu_ps(p), v) : v);
}

/* MR rows x NV*16 columns from column o: acc = fma(h[i, j], Bt[j, o..], acc) for j = 0..r-1, stored into row i of
 * y, or with `scatter` added into row scatter[i] of y */
P5_INL void expand5_tile(const int MR, const int NV, const int DT, const float *h, size_t r, const void *bt,
                         size_t d_out, size_t o, float *y, size_t ldy, const int32_t *scatter) {
    const int pairs = DT == PG_DTYPE_BF16 && NV % 2 == 0;
    __m512 acc[EX5_MR][EX5_MAXNV];
    P5_UNROLL
    for (int i = 0; i < MR; i++) {
        P5_UNROLL
        for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
    }
    if (MR > NV) {
        /* the NV Bt vectors stay in registers, the broadcasts of h stream */
        for (size_t j = 0; j < r; j++) {
            __m512 bv[EX5_MAXNV];
            P5_UNROLL
            for (int v = 0; v < NV; v++) bv[v] = ex5_ld(DT, pairs, bt, j * d_out + o, v);
            P5_UNROLL
            for (int i = 0; i < MR; i++) {
                __m512 hv = _mm512_set1_ps(h[(size_t)i * r + j]);
                P5_UNROLL
                for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(hv, bv[v], acc[i][v]);
            }
        }
    } else {
        /* the MR broadcasts stay in registers, the Bt vectors stream */
        for (size_t j = 0; j < r; j++) {
            __m512 hv[EX5_MR];
            P5_UNROLL
            for (int i = 0; i < MR; i++) hv[i] = _mm512_set1_ps(h[(size_t)i * r + j]);
            P5_UNROLL
            for (int v = 0; v < NV; v++) {
                __m512 bv = ex5_ld(DT, pairs, bt, j * d_out + o, v);
                P5_UNROLL
                for (int i = 0; i < MR; i++) acc[i][v] = _mm512_fmadd_ps(hv[i], bv, acc[i][v]);
            }
        }
    }
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const int add = scatter != NULL;
    P5_UNROLL
    for (int i = 0; i < MR; i++) {
        float *yr = y + (add ? (size_t)scatter[i] : (size_t)i) * ldy + o;
        if (pairs) {
            P5_UNROLL
            for (int q = 0; q < NV / 2; q++) {
                p5_put(yr + 32 * q, _mm512_permutex2var_ps(acc[i][2 * q], lo_idx, acc[i][2 * q + 1]), add);
                p5_put(yr + 32 * q + 16, _mm512_permutex2var_ps(acc[i][2 * q], hi_idx, acc[i][2 * q + 1]), add);
            }
        } else {
            P5_UNROLL
            for (int v = 0; v < NV; v++) p5_put(yr + (size_t)v * 16, acc[i][v], add);
        }
    }
}

#define EX5_CASE(MR, NV)                                                                                         \
    case (MR) * 16 + (NV): expand5_tile(MR, NV, DT, h, r, bt, d_out, o, y, ldy, scatter); break;

/* Every tile shape expand5_generic uses: mr rows by ex5_nv_for(mr) vectors, and 4, 2 or 1 at the end. */
P5_INL void expand5_tile_dispatch(const int DT, int mr, int nv, const float *h, size_t r, const void *bt,
                                  size_t d_out, size_t o, float *y, size_t ldy, const int32_t *scatter) {
    switch (mr * 16 + nv) {
        EX5_CASE(1, 8) EX5_CASE(1, 4) EX5_CASE(1, 2) EX5_CASE(1, 1)
        EX5_CASE(2, 8) EX5_CASE(2, 4) EX5_CASE(2, 2) EX5_CASE(2, 1)
        EX5_CASE(3, 6) EX5_CASE(3, 4) EX5_CASE(3, 2) EX5_CASE(3, 1)
        EX5_CASE(4, 4) EX5_CASE(4, 2) EX5_CASE(4, 1)
        EX5_CASE(5, 4) EX5_CASE(5, 2) EX5_CASE(5, 1)
        EX5_CASE(6, 4) EX5_CASE(6, 2) EX5_CASE(6, 1)
    default: break;
    }
}

/* The last t (< 16) columns from column o, one row at a time, with masked loads and stores. */
P5_INL void expand5_cols(const int DT, const float *h, size_t n, size_t r, const void *bt, size_t d_out, size_t o,
                         size_t t, float *y, size_t ldy, const int32_t *scatter) {
    __mmask16 m = p5_mask(t);
    for (size_t i = 0; i < n; i++) {
        __m512 acc = _mm512_setzero_ps();
        for (size_t j = 0; j < r; j++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(h[i * r + j]), p5_ld16_tail(DT, bt, j * d_out + o, t), acc);
        float *yr = y + (scatter ? (size_t)scatter[i] : i) * ldy + o;
        if (scatter) acc = _mm512_add_ps(_mm512_maskz_loadu_ps(m, yr), acc);
        _mm512_mask_storeu_ps(yr, m, acc);
    }
}

P5_INL void expand5_generic(const int DT, const float *h, size_t n, size_t r, const void *bt, size_t d_out, float *y,
                            size_t ldy, const int32_t *scatter) {
    const size_t d16 = d_out & ~(size_t)15;
    /* rows outside, columns inside: the tile's rows of h stay in L1 while Bt (L1/L2) streams past */
    for (size_t i0 = 0; i0 < n; i0 += EX5_MR) {
        int mr = n - i0 >= EX5_MR ? EX5_MR : (int)(n - i0);
        int nvmax = ex5_nv_for(mr);
        const float *hi = h + i0 * r;
        float *yi = scatter ? y : y + i0 * ldy;
        const int32_t *si = scatter ? scatter + i0 : NULL;
        size_t o = 0;
        while (o < d16) {
            size_t rem = (d16 - o) / 16;
            int nv = rem >= (size_t)nvmax ? nvmax : rem >= 4 ? 4 : rem >= 2 ? 2 : 1;
            expand5_tile_dispatch(DT, mr, nv, hi, r, bt, d_out, o, yi, ldy, si);
            o += (size_t)nv * 16;
        }
    }
    if (d16 < d_out) expand5_cols(DT, h, n, r, bt, d_out, d16, d_out - d16, y, ldy, scatter);
}

P5_TARGET static void expand5_f32(const float *h, size_t n, size_t r, const void *bt, size_t d_out, float *y,
                                  size_t ldy, const int32_t *scatter) {
    expand5_generic(PG_DTYPE_F32, h, n, r, bt, d_out, y, ldy, scatter);
}

P5_TARGET static void expand5_bf16(const float *h, size_t n, size_t r, const void *bt, size_t d_out, float *y,
                                   size_t ldy, const int32_t *scatter) {
    expand5_generic(PG_DTYPE_BF16, h, n, r, bt, d_out, y, ldy, scatter);
}

P5_TARGET static void expand5_f16(const float *h, size_t n, size_t r, const void *bt, size_t d_out, float *y,
                                  size_t ldy, const int32_t *scatter) {
    expand5_generic(PG_DTYPE_F16, h, n, r, bt, d_out, y, ldy, scatter);
}

P5_TARGET void pg_avx512_lora_expand(const float *h, size_t n, size_t r, const void *bt, int b_dtype, size_t d_out,
                                     float *y, size_t ldy, const int32_t *scatter) {
    if (n == 0 || d_out == 0) return;
    switch (b_dtype) {
    case PG_DTYPE_F32: expand5_f32(h, n, r, bt, d_out, y, ldy, scatter); break;
    case PG_DTYPE_BF16: expand5_bf16(h, n, r, bt, d_out, y, ldy, scatter); break;
    case PG_DTYPE_F16: expand5_f16(h, n, r, bt, d_out, y, ldy, scatter); break;
    default: break;
    }
}

/* ================================================================ probe */

P5_TARGET double pg_avx512_fma_probe(size_t iterations) {
    volatile float seed = 0.999f;
    __m512 x = _mm512_set1_ps(seed), y = _mm512_set1_ps(1e-4f), a[24];
    for (int i = 0; i < 24; i++) a[i] = _mm512_set1_ps((float)i * 1e-3f);
    for (size_t r = 0; r < iterations; r++) {
        _Pragma("GCC unroll 24")
        for (int i = 0; i < 24; i++) a[i] = _mm512_fmadd_ps(a[i], x, y);
    }
    __m512 s = a[0];
    for (int i = 1; i < 24; i++) s = _mm512_add_ps(s, a[i]);
    volatile float sink = p5_hsum16(s);
    (void)sink;
    return 24.0 * 16 * 2 * (double)iterations;
}

/* ================================================================ layernorm */

/* (l0+l2) + (l1+l3) of a 4-double vector, as in the AVX2 kernel */
P5_INL double p5_hsum4d(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

/* The AVX2 kernel's 16 double partial sums (element t + l of each 16-element chunk in partial l), folded the way it
 * folds them: its four 4-wide accumulators are the halves of these two 8-wide ones. */
P5_INL double p5_fold16(__m512d s0, __m512d s1) {
    __m256d a = _mm256_add_pd(_mm512_castpd512_pd256(s0), _mm512_extractf64x4_pd(s0, 1));
    __m256d b = _mm256_add_pd(_mm512_castpd512_pd256(s1), _mm512_extractf64x4_pd(s1, 1));
    return p5_hsum4d(_mm256_add_pd(a, b));
}

/* The same arithmetic as pg_avx2_layernorm_rows on 8-wide double vectors: the same partial sums in the same order,
 * so the outputs are bit for bit the AVX2 kernel's, in about half the instructions. */
P5_TARGET void pg_avx512_layernorm_rows(const float *x, size_t ldx, size_t rows, size_t d, float eps, float *out,
                                        size_t ldo) {
    if (d == 0) return;
    const size_t d16 = d & ~(size_t)15;
    const size_t d8 = d & ~(size_t)7;
    for (size_t i = 0; i < rows; i++) {
        const float *xr = x + i * ldx;
        float *orow = out + i * ldo;

        __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
        for (size_t t = 0; t < d16; t += 16) {
            s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm256_loadu_ps(xr + t)));
            s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_loadu_ps(xr + t + 8)));
        }
        if (d8 > d16) s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm256_loadu_ps(xr + d16)));
        double sum = p5_fold16(s0, s1);
        for (size_t t = d8; t < d; t++) sum += (double)xr[t];
        const double mean = sum / (double)d;

        const __m512d vmean = _mm512_set1_pd(mean);
        __m512d q0 = _mm512_setzero_pd(), q1 = _mm512_setzero_pd();
        for (size_t t = 0; t < d16; t += 16) {
            __m512d a = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(xr + t)), vmean);
            __m512d b = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(xr + t + 8)), vmean);
            q0 = _mm512_fmadd_pd(a, a, q0);
            q1 = _mm512_fmadd_pd(b, b, q1);
        }
        if (d8 > d16) {
            __m512d a = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(xr + d16)), vmean);
            q0 = _mm512_fmadd_pd(a, a, q0);
        }
        double ss = p5_fold16(q0, q1);
        for (size_t t = d8; t < d; t++) {
            __m128d dv = _mm_set_sd((double)xr[t] - mean);
            ss = _mm_cvtsd_f64(_mm_fmadd_sd(dv, dv, _mm_set_sd(ss)));
        }
        const double var = ss / (double)d;
        const double inv = 1.0 / pg_sqrt(var + (double)eps);

        const __m512d vinv = _mm512_set1_pd(inv);
        for (size_t t = 0; t < d8; t += 8) {
            __m512d a = _mm512_mul_pd(_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(xr + t)), vmean), vinv);
            _mm256_storeu_ps(orow + t, _mm512_cvtpd_ps(a));
        }
        for (size_t t = d8; t < d; t++) orow[t] = (float)(((double)xr[t] - mean) * inv);
    }
}

#else

/* ISO C forbids an empty translation unit. */
typedef int pg_avx512_unavailable;

#endif /* PG_HAVE_AVX2_IMPL */
