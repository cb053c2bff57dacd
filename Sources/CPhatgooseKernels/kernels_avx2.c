/* AVX2 + FMA + F16C implementations of the Phatgoose kernels (x86-64 only).
 *
 * Every function here carries a target attribute instead of relying on -m flags, so the file compiles with
 * the compiler's default (baseline x86-64) flags; dispatch.c calls these functions only after checking the
 * CPU. FMAs come only from explicit intrinsics (contraction is off).
 *
 * Determinism. Dot products (gemm_nt, shrink) follow one schedule in every code path: a single 8-wide
 * FMA accumulator starting at +0, over the 8-element chunks of k in increasing order; the k % 8 tail as one
 * more chunk whose missing elements are zero; then the fixed reduction ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)),
 * then one multiply by the row's scale. Register tiles (6x2 in the bulk; 1x8, 2x5, 3x3, 4x3, 5x2 and
 * narrower ones at the edges) and k-blocks (partial accumulators stored to a stack buffer and reloaded,
 * which is exact) only interleave independent accumulators. Expand: every output is the FMA chain
 * acc = fma(h[i,j], Bt[j,o], acc) over j = 0..r-1 from +0, in a vector lane or in a scalar FMA, which give
 * the same bits. So no output depends on its neighbours, its position, or how the caller splits the work.
 *
 * Performance notes (Sapphire Rapids, one core, ~3.7 GHz, 118 GFLOP/s FMA peak): the bulk tiles keep 12
 * accumulators and read one operand from L1 (the 6 rows of x, k-blocked by NT_KC) and the other from L2
 * (a column block of at most ~1 MiB); BF16 is widened with one shuffle per vector, F16 with VCVTPH2PS.
 * Tile shapes with which clang spilled an accumulator inside the loop were narrowed (see nt_nr_for and
 * ex_nv_for). Rows starting on a 64-byte boundary avoid cache-line-split loads. */
#include "pg_internal.h"

#if PG_HAVE_AVX2_IMPL

#include <immintrin.h>
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define PG_TARGET __attribute__((target("avx2,fma,f16c")))
#define PG_INL static inline __attribute__((always_inline, target("avx2,fma,f16c")))
#define PG_UNROLL _Pragma("GCC unroll 8")

static const int32_t pg_mask_tab[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

/* lanes 0..t-1 set, t in 0..8 */
PG_INL __m256i tail_mask(size_t t) { return _mm256_loadu_si256((const __m256i *)(pg_mask_tab + 8 - t)); }

/* ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)) */
PG_INL float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}


/* 8 BF16 values -> F32 (exact). Both 128-bit halves hold the 8 values; the shuffle moves value l into the
 * high half of lane l and zeroes the low half: one shuffle, where zero-extend + shift would add a shift
 * competing with the FMAs for ports 0/1 (measured ~9% faster in shrink). */
PG_INL __m256 ld_bf16(const void *p) {
    const __m256i ctl = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7,
                                         -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15);
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(v, ctl));
}

PG_INL __m256 ld_f16(const void *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* 8 elements of dtype DT at element index idx of base, as F32 */
PG_INL __m256 ld8(const int DT, const void *base, size_t idx) {
    if (DT == PG_DTYPE_F32) return _mm256_loadu_ps((const float *)(const void *)PG_AT(base, idx, 4));
    if (DT == PG_DTYPE_BF16) return ld_bf16(PG_AT(base, idx, 2));
    return ld_f16(PG_AT(base, idx, 2));
}

/* t (< 8) elements, the other lanes zero; reads nothing beyond the t elements */
PG_INL __m256 ld8_tail(const int DT, const void *base, size_t idx, size_t t) {
    if (DT == PG_DTYPE_F32) return _mm256_maskload_ps((const float *)(const void *)PG_AT(base, idx, 4), tail_mask(t));
    uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(tmp, PG_AT(base, idx, 2), t * sizeof(uint16_t));
    return ld8(DT, tmp, 0);
}

/* scalar element as F32 (exact) */
PG_INL float ld1(const int DT, const void *base, size_t idx) {
    if (DT == PG_DTYPE_F32) {
        float f;
        memcpy(&f, PG_AT(base, idx, 4), sizeof f);
        return f;
    }
    uint16_t v;
    memcpy(&v, PG_AT(base, idx, 2), sizeof v);
    return DT == PG_DTYPE_BF16 ? pg_bf16_to_f32(v) : pg_f16_to_f32(v);
}

/* ================================================================ conversions */

/* u32 lanes -> BF16 bit patterns in the low 16 bits of each lane (RNE, quiet NaN) */
PG_INL __m256i bf16_round(__m256i u) {
    const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i infbits = _mm256_set1_epi32(0x7F800000);
    __m256i isnan = _mm256_cmpgt_epi32(_mm256_and_si256(u, absmask), infbits);
    __m256i hi = _mm256_srli_epi32(u, 16);
    __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    __m256i qnan = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(rounded, qnan, isnan);
}

PG_TARGET void pg_avx2_convert_to_f32(const void *src, int dtype, float *dst, size_t n) {
    if (n == 0) return;
    size_t n8 = n & ~(size_t)7;
    if (dtype == PG_DTYPE_F32) {
        memmove(dst, src, n * sizeof(float));
    } else if (dtype == PG_DTYPE_BF16) {
        for (size_t i = 0; i < n8; i += 8) _mm256_storeu_ps(dst + i, ld_bf16(PG_AT(src, i, 2)));
        for (size_t i = n8; i < n; i++) dst[i] = ld1(PG_DTYPE_BF16, src, i);
    } else if (dtype == PG_DTYPE_F16) {
        for (size_t i = 0; i < n8; i += 8) _mm256_storeu_ps(dst + i, ld_f16(PG_AT(src, i, 2)));
        if (n8 < n) {
            float tmp[8];
            _mm256_storeu_ps(tmp, ld8_tail(PG_DTYPE_F16, src, n8, n - n8));
            memcpy(dst + n8, tmp, (n - n8) * sizeof(float));
        }
    }
}

PG_TARGET void pg_avx2_convert_from_f32(const float *src, int dtype, void *dst, size_t n) {
    if (n == 0) return;
    if (dtype == PG_DTYPE_F32) {
        memmove(dst, src, n * sizeof(float));
    } else if (dtype == PG_DTYPE_BF16) {
        unsigned char *d = (unsigned char *)dst;
        size_t n16 = n & ~(size_t)15;
        for (size_t i = 0; i < n16; i += 16) {
            __m256i r0 = bf16_round(_mm256_loadu_si256((const __m256i *)(src + i)));
            __m256i r1 = bf16_round(_mm256_loadu_si256((const __m256i *)(src + i + 8)));
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r0, r1), 0xD8);
            _mm256_storeu_si256((__m256i *)(void *)(d + 2 * i), packed);
        }
        for (size_t i = n16; i < n; i++) {
            uint16_t v = pg_f32_to_bf16(src[i]);
            memcpy(d + 2 * i, &v, sizeof v);
        }
    } else if (dtype == PG_DTYPE_F16) {
        unsigned char *d = (unsigned char *)dst;
        size_t n8 = n & ~(size_t)7;
        for (size_t i = 0; i < n8; i += 8)
            _mm_storeu_si128((__m128i *)(void *)(d + 2 * i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
        if (n8 < n) {
            uint16_t tmp[8];
            __m256 v = _mm256_maskload_ps(src + n8, tail_mask(n - n8));
            _mm_storeu_si128((__m128i *)tmp, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
            memcpy(d + 2 * n8, tmp, (n - n8) * sizeof(uint16_t));
        }
    }
}

PG_INL size_t hsum_epi32_to_size(__m256i v) {
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, v);
    size_t s = 0;
    for (int l = 0; l < 8; l++) s += (size_t)(uint32_t)lanes[l];
    return s;
}

PG_TARGET size_t pg_avx2_count_nonfinite(const void *src, int dtype, size_t n) {
    size_t count = 0;
    if (n == 0) return 0;
    if (dtype == PG_DTYPE_F32) {
        const unsigned char *s = (const unsigned char *)src;
        const __m256i expmask = _mm256_set1_epi32(0x7F800000);
        size_t n8 = n & ~(size_t)7;
        size_t i = 0;
        while (i < n8) {
            /* per-lane int32 counters, flushed every 2^20 chunks */
            size_t end = n8 - i > ((size_t)8 << 20) ? i + ((size_t)8 << 20) : n8;
            __m256i acc = _mm256_setzero_si256();
            for (; i < end; i += 8) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(s + 4 * i));
                acc = _mm256_sub_epi32(acc, _mm256_cmpeq_epi32(_mm256_and_si256(v, expmask), expmask));
            }
            count += hsum_epi32_to_size(acc);
        }
        for (; i < n; i++) {
            uint32_t v;
            memcpy(&v, s + 4 * i, sizeof v);
            count += (v & 0x7F800000u) == 0x7F800000u;
        }
    } else if (dtype == PG_DTYPE_BF16 || dtype == PG_DTYPE_F16) {
        const unsigned char *s = (const unsigned char *)src;
        uint16_t m = dtype == PG_DTYPE_BF16 ? 0x7F80u : 0x7C00u;
        const __m256i expmask = _mm256_set1_epi16((short)m);
        const __m256i ones = _mm256_set1_epi16(1);
        size_t n16 = n & ~(size_t)15;
        size_t i = 0;
        while (i < n16) {
            /* per-lane int16 counters, flushed every 2^14 chunks */
            size_t end = n16 - i > ((size_t)16 << 14) ? i + ((size_t)16 << 14) : n16;
            __m256i acc = _mm256_setzero_si256();
            for (; i < end; i += 16) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(s + 2 * i));
                acc = _mm256_sub_epi16(acc, _mm256_cmpeq_epi16(_mm256_and_si256(v, expmask), expmask));
            }
            count += hsum_epi32_to_size(_mm256_madd_epi16(acc, ones));
        }
        for (; i < n; i++) {
            uint16_t v;
            memcpy(&v, s + 2 * i, sizeof v);
            count += (uint16_t)(v & m) == m;
        }
    }
    return count;
}

/* ================================================================ layernorm */

/* (l0+l2) + (l1+l3) */
PG_INL double hsum4d(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

PG_INL __m256d lo4d(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
PG_INL __m256d hi4d(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }

/* Sums in double with four 4-wide accumulators: 16-element chunks, then one 8-element chunk into the
 * first two, then the scalar tail in order. */
PG_TARGET void pg_avx2_layernorm_rows(const float *x, size_t ldx, size_t rows, size_t d, float eps, float *out,
                                      size_t ldo) {
    if (d == 0) return;
    const size_t d16 = d & ~(size_t)15;
    const size_t d8 = d & ~(size_t)7;
    for (size_t i = 0; i < rows; i++) {
        const float *xr = x + i * ldx;
        float *orow = out + i * ldo;

        __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd(), s2 = _mm256_setzero_pd(), s3 = _mm256_setzero_pd();
        for (size_t t = 0; t < d16; t += 16) {
            __m256 v = _mm256_loadu_ps(xr + t), w = _mm256_loadu_ps(xr + t + 8);
            s0 = _mm256_add_pd(s0, lo4d(v));
            s1 = _mm256_add_pd(s1, hi4d(v));
            s2 = _mm256_add_pd(s2, lo4d(w));
            s3 = _mm256_add_pd(s3, hi4d(w));
        }
        if (d8 > d16) {
            __m256 v = _mm256_loadu_ps(xr + d16);
            s0 = _mm256_add_pd(s0, lo4d(v));
            s1 = _mm256_add_pd(s1, hi4d(v));
        }
        double sum = hsum4d(_mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3)));
        for (size_t t = d8; t < d; t++) sum += (double)xr[t];
        const double mean = sum / (double)d;

        const __m256d vmean = _mm256_set1_pd(mean);
        __m256d q0 = _mm256_setzero_pd(), q1 = _mm256_setzero_pd(), q2 = _mm256_setzero_pd(), q3 = _mm256_setzero_pd();
        for (size_t t = 0; t < d16; t += 16) {
            __m256 v = _mm256_loadu_ps(xr + t), w = _mm256_loadu_ps(xr + t + 8);
            __m256d a = _mm256_sub_pd(lo4d(v), vmean), b = _mm256_sub_pd(hi4d(v), vmean);
            __m256d c = _mm256_sub_pd(lo4d(w), vmean), e = _mm256_sub_pd(hi4d(w), vmean);
            q0 = _mm256_fmadd_pd(a, a, q0);
            q1 = _mm256_fmadd_pd(b, b, q1);
            q2 = _mm256_fmadd_pd(c, c, q2);
            q3 = _mm256_fmadd_pd(e, e, q3);
        }
        if (d8 > d16) {
            __m256 v = _mm256_loadu_ps(xr + d16);
            __m256d a = _mm256_sub_pd(lo4d(v), vmean), b = _mm256_sub_pd(hi4d(v), vmean);
            q0 = _mm256_fmadd_pd(a, a, q0);
            q1 = _mm256_fmadd_pd(b, b, q1);
        }
        double ss = hsum4d(_mm256_add_pd(_mm256_add_pd(q0, q1), _mm256_add_pd(q2, q3)));
        for (size_t t = d8; t < d; t++) {
            __m128d dv = _mm_set_sd((double)xr[t] - mean);
            ss = _mm_cvtsd_f64(_mm_fmadd_sd(dv, dv, _mm_set_sd(ss)));
        }
        const double var = ss / (double)d;
        const double inv = 1.0 / pg_sqrt(var + (double)eps);

        const __m256d vinv = _mm256_set1_pd(inv);
        for (size_t t = 0; t < d8; t += 8) {
            __m256 v = _mm256_loadu_ps(xr + t);
            __m256d a = _mm256_mul_pd(_mm256_sub_pd(lo4d(v), vmean), vinv);
            __m256d b = _mm256_mul_pd(_mm256_sub_pd(hi4d(v), vmean), vinv);
            __m256 o = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(a)), _mm256_cvtpd_ps(b), 1);
            _mm256_storeu_ps(orow + t, o);
        }
        for (size_t t = d8; t < d; t++) orow[t] = (float)(((double)xr[t] - mean) * inv);
    }
}

/* ================================================================ NT products (gemm, shrink) */

#define NT_MR 6     /* rows of the f32 operand per full tile (at most 6: see nt_tile_dispatch) */
#define NT_MAXNR 8  /* most typed-operand rows in any tile (the one-row tile) */
#define NT_KC 1024  /* k-block (multiple of 8) once k is larger than this */
#define NT_NCMAX 96 /* most typed-operand rows per column block when k-blocking; stack NT_NCMAX*NT_MR*32 B */

/* Typed-operand rows per tile for a tile of mr rows: 8 to 12 accumulators and at most 16 live vectors
 * (shapes needing all 16, or 15 with the BF16 shuffle control, made clang spill an accumulator). */
PG_INL int nt_nr_for(int mr) {
    switch (mr) {
    case 1: return 8;
    case 2: return 5;
    case 3: return 3;
    case 4: return 3;
    default: return 2;
    }
}

/* One MR x NR tile over the chunks [p0, p1) of k (p0, p1 multiples of 8), then `tail` elements at p1 when
 * tail > 0. The accumulators start at zero, or from slot (load); at the end they go back to slot (store) or
 * are reduced into sums. In slot, accumulator (i, j) is at (j * NT_MR + i) * 8. */
PG_INL void nt_tile(const int MR, const int NR, const int DT, const float *const *ar, const void *b, size_t ldb,
                    size_t p0, size_t p1, size_t tail, float *slot, int load, int store,
                    float sums[NT_MR][NT_MAXNR]) {
    __m256 acc[NT_MR][NT_MAXNR];
    const float *ap[NT_MR];
    const char *b0 = (const char *)b;
    const size_t bstride = ldb * (DT == PG_DTYPE_F32 ? 4 : 2);
    PG_UNROLL
    for (int i = 0; i < MR; i++) {
        ap[i] = ar[i];
        PG_UNROLL
        for (int j = 0; j < NR; j++)
            acc[i][j] = load ? _mm256_loadu_ps(slot + (j * NT_MR + i) * 8) : _mm256_setzero_ps();
    }
    if (MR > NR) {
        /* the NR converted b vectors stay in registers, the rows of x stream */
        for (size_t p = p0; p < p1; p += 8) {
            __m256 bv[NT_MAXNR];
            PG_UNROLL
            for (int j = 0; j < NR; j++) bv[j] = ld8(DT, b0 + (size_t)j * bstride, p);
            PG_UNROLL
            for (int i = 0; i < MR; i++) {
                __m256 av = _mm256_loadu_ps(ap[i] + p);
                PG_UNROLL
                for (int j = 0; j < NR; j++) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
            }
        }
    } else {
        /* the MR x vectors stay in registers, the b rows stream */
        for (size_t p = p0; p < p1; p += 8) {
            __m256 av[NT_MR];
            PG_UNROLL
            for (int i = 0; i < MR; i++) av[i] = _mm256_loadu_ps(ap[i] + p);
            PG_UNROLL
            for (int j = 0; j < NR; j++) {
                __m256 bv = ld8(DT, b0 + (size_t)j * bstride, p);
                PG_UNROLL
                for (int i = 0; i < MR; i++) acc[i][j] = _mm256_fmadd_ps(av[i], bv, acc[i][j]);
            }
        }
    }
    if (tail) {
        __m256i mask = tail_mask(tail);
        __m256 av[NT_MR];
        PG_UNROLL
        for (int i = 0; i < MR; i++) av[i] = _mm256_maskload_ps(ap[i] + p1, mask);
        PG_UNROLL
        for (int j = 0; j < NR; j++) {
            __m256 bv = ld8_tail(DT, b0 + (size_t)j * bstride, p1, tail);
            PG_UNROLL
            for (int i = 0; i < MR; i++) acc[i][j] = _mm256_fmadd_ps(av[i], bv, acc[i][j]);
        }
    }
    if (store) {
        PG_UNROLL
        for (int i = 0; i < MR; i++) {
            PG_UNROLL
            for (int j = 0; j < NR; j++) _mm256_storeu_ps(slot + (j * NT_MR + i) * 8, acc[i][j]);
        }
    } else {
        PG_UNROLL
        for (int i = 0; i < MR; i++) {
            PG_UNROLL
            for (int j = 0; j < NR; j++) sums[i][j] = hsum8(acc[i][j]);
        }
    }
}

/* Every tile shape nt_generic uses: mr rows by nt_nr_for(mr) columns, and 4, 2 or 1 columns at the end. */
#define NT_CASE(MR, NR)                                                                                          \
    case (MR) * 16 + (NR): nt_tile(MR, NR, DT, ar, bj, ldb, p0, p1, tl, slot, load, store, sums); break;

PG_INL void nt_tile_dispatch(const int DT, int mr, int nr, const float *const *ar, const void *bj, size_t ldb,
                             size_t p0, size_t p1, size_t tl, float *slot, int load, int store,
                             float sums[NT_MR][NT_MAXNR]) {
    switch (mr * 16 + nr) {
        NT_CASE(1, 8) NT_CASE(1, 4) NT_CASE(1, 2) NT_CASE(1, 1)
        NT_CASE(2, 5) NT_CASE(2, 4) NT_CASE(2, 2) NT_CASE(2, 1)
        NT_CASE(3, 3) NT_CASE(3, 2) NT_CASE(3, 1)
        NT_CASE(4, 3) NT_CASE(4, 2) NT_CASE(4, 1)
        NT_CASE(5, 2) NT_CASE(5, 1)
        NT_CASE(6, 2) NT_CASE(6, 1)
    default: break;
    }
}

/* out[i*ldo + j] = ((row_scale ? row_scale[i] : 1) * alpha) * dot(x row (rows ? rows[i] : i), b row j),
 * i < m, j < n, over k.
 * Blocking: column blocks of b (all of n when k <= NT_KC; otherwise at most NT_NCMAX rows and about 1 MiB,
 * so that the block stays in L2), then tiles of NT_MR rows of x, then k-blocks of NT_KC (the tile's rows
 * stay in L1 while the block's columns pass), then the column tiles. */
PG_INL void nt_generic(const int DT, const float *x, size_t ldx, const int32_t *rows, size_t m, const void *b,
                       size_t ldb, size_t n, size_t k, const float *row_scale, float alpha, float *out,
                       size_t ldo) {
    const size_t es = DT == PG_DTYPE_F32 ? 4 : 2;
    const size_t k8 = k & ~(size_t)7;
    const size_t tail = k - k8;
    const int kblocked = k8 > NT_KC;
    float accbuf[NT_NCMAX * NT_MR * 8];

    size_t nc = n;
    if (kblocked) {
        size_t cap = ((size_t)1 << 20) / (k * es);
        if (cap < 1) cap = 1;
        if (cap > NT_NCMAX) cap = NT_NCMAX;
        size_t nblocks = (n + cap - 1) / cap;
        nc = (n + nblocks - 1) / nblocks;
    }

    for (size_t jc = 0; jc < n; jc += nc) {
        size_t jend = n - jc > nc ? jc + nc : n;
        for (size_t i0 = 0; i0 < m; i0 += NT_MR) {
            int mr = m - i0 >= NT_MR ? NT_MR : (int)(m - i0);
            int nrmax = nt_nr_for(mr);
            const float *ar[NT_MR];
            float sc[NT_MR];
            for (int t = 0; t < mr; t++) {
                size_t src = rows ? (size_t)rows[i0 + t] : i0 + t;
                ar[t] = x + src * ldx;
                sc[t] = (row_scale ? row_scale[i0 + t] : 1.0f) * alpha;
            }
            size_t p0 = 0;
            do {
                size_t p1 = kblocked ? (k8 - p0 > NT_KC ? p0 + NT_KC : k8) : k8;
                int last = p1 == k8;
                size_t tl = last ? tail : 0;
                int load = p0 > 0;
                int store = !last;
                size_t j0 = jc;
                while (j0 < jend) {
                    size_t rem = jend - j0;
                    int nr = rem >= (size_t)nrmax ? nrmax : rem >= 4 ? 4 : rem >= 2 ? 2 : 1;
                    const void *bj = (const char *)b + j0 * ldb * es;
                    float *slot = kblocked ? accbuf + (j0 - jc) * NT_MR * 8 : NULL; /* nc <= NT_NCMAX */
                    float sums[NT_MR][NT_MAXNR];
                    nt_tile_dispatch(DT, mr, nr, ar, bj, ldb, p0, p1, tl, slot, load, store, sums);
                    if (last) {
                        for (int t = 0; t < mr; t++) {
                            float *orow = out + (i0 + t) * ldo + j0;
                            for (int u = 0; u < nr; u++) orow[u] = sc[t] * sums[t][u];
                        }
                    }
                    j0 += (size_t)nr;
                }
                p0 = p1;
            } while (p0 < k8);
        }
    }
}

PG_TARGET void pg_avx2_gemm_nt_f32(const float *a, size_t lda, size_t m, const float *b, size_t ldb, size_t n,
                                   size_t k, float alpha, float *c, size_t ldc) {
    if (m == 0 || n == 0) return;
    nt_generic(PG_DTYPE_F32, a, lda, NULL, m, b, ldb, n, k, NULL, alpha, c, ldc);
}

PG_TARGET static void shrink_f32(const float *x, size_t ldx, const int32_t *rows, size_t n, const void *a,
                                 size_t r, size_t d_in, const float *row_scale, float lora_scale, float *h) {
    nt_generic(PG_DTYPE_F32, x, ldx, rows, n, a, d_in, r, d_in, row_scale, lora_scale, h, r);
}

PG_TARGET static void shrink_bf16(const float *x, size_t ldx, const int32_t *rows, size_t n, const void *a,
                                  size_t r, size_t d_in, const float *row_scale, float lora_scale, float *h) {
    nt_generic(PG_DTYPE_BF16, x, ldx, rows, n, a, d_in, r, d_in, row_scale, lora_scale, h, r);
}

PG_TARGET static void shrink_f16(const float *x, size_t ldx, const int32_t *rows, size_t n, const void *a,
                                 size_t r, size_t d_in, const float *row_scale, float lora_scale, float *h) {
    nt_generic(PG_DTYPE_F16, x, ldx, rows, n, a, d_in, r, d_in, row_scale, lora_scale, h, r);
}

PG_TARGET void pg_avx2_lora_shrink(const float *x, size_t ldx, const int32_t *rows, size_t n, const void *a,
                                   int a_dtype, size_t r, size_t d_in, const float *row_scale, float lora_scale,
                                   float *h) {
    if (n == 0 || r == 0) return;
    switch (a_dtype) {
    case PG_DTYPE_F32: shrink_f32(x, ldx, rows, n, a, r, d_in, row_scale, lora_scale, h); break;
    case PG_DTYPE_BF16: shrink_bf16(x, ldx, rows, n, a, r, d_in, row_scale, lora_scale, h); break;
    case PG_DTYPE_F16: shrink_f16(x, ldx, rows, n, a, r, d_in, row_scale, lora_scale, h); break;
    default: break;
    }
}

/* ================================================================ expand */

#define EX_MR 6 /* rows of h per full tile (at most 6: see expand_tile_dispatch) */
#define EX_MAXNV 8 /* most 8-wide column vectors in any tile (the one-row tile) */

/* Column vectors per tile for a tile of mr rows: 8 to 12 accumulators, leaving registers for the BF16
 * pair loads (larger shapes made clang spill an accumulator). */
PG_INL int ex_nv_for(int mr) {
    switch (mr) {
    case 1: return 8;
    case 2: return 4;
    case 3: return 3;
    default: return 2;
    }
}

/* Vector v of an expand tile's row j of Bt. With `pairs` (BF16, NV even), 16 values come from one 32-byte load
 * as two vectors: the even columns (low halves shifted up) in vector 2q and the odd columns (high halves
 * masked) in vector 2q + 1; the tile un-interleaves its accumulators before storing. */
PG_INL __m256 ex_ld(const int DT, const int pairs, const void *bt, size_t idx, int v) {
    if (pairs) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(const void *)PG_AT(bt, idx + (size_t)(v / 2) * 16, 2));
        if (v % 2 == 0) return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xFFFF0000u)));
    }
    return ld8(DT, bt, idx + (size_t)v * 8);
}

/* Where a result vector goes: stored, or (with a scatter list) added to what the row holds. */
PG_INL void ex_put(float *p, __m256 v, const int add) {
    _mm256_storeu_ps(p, add ? _mm256_add_ps(_mm256_loadu_ps(p), v) : v);
}

/* MR rows x NV*8 columns starting at column o: acc = fma(h[i, j], Bt[j, o..], acc) for j = 0..r-1, stored into row
 * i of y, or with `scatter` added into row scatter[i] of y */
PG_INL void expand_tile(const int MR, const int NV, const int DT, const float *h, size_t r, const void *bt,
                        size_t d_out, size_t o, float *y, size_t ldy, const int32_t *scatter) {
    const int pairs = DT == PG_DTYPE_BF16 && NV % 2 == 0;
    __m256 acc[EX_MR][EX_MAXNV];
    PG_UNROLL
    for (int i = 0; i < MR; i++) {
        PG_UNROLL
        for (int v = 0; v < NV; v++) acc[i][v] = _mm256_setzero_ps();
    }
    if (MR > NV) {
        /* the NV Bt vectors stay in registers, the broadcasts of h stream */
        for (size_t j = 0; j < r; j++) {
            __m256 bv[EX_MAXNV];
            PG_UNROLL
            for (int v = 0; v < NV; v++) bv[v] = ex_ld(DT, pairs, bt, j * d_out + o, v);
            PG_UNROLL
            for (int i = 0; i < MR; i++) {
                __m256 hv = _mm256_broadcast_ss(h + (size_t)i * r + j);
                PG_UNROLL
                for (int v = 0; v < NV; v++) acc[i][v] = _mm256_fmadd_ps(hv, bv[v], acc[i][v]);
            }
        }
    } else {
        /* the MR broadcasts stay in registers, the Bt vectors stream */
        for (size_t j = 0; j < r; j++) {
            __m256 hv[EX_MR];
            PG_UNROLL
            for (int i = 0; i < MR; i++) hv[i] = _mm256_broadcast_ss(h + (size_t)i * r + j);
            PG_UNROLL
            for (int v = 0; v < NV; v++) {
                __m256 bv = ex_ld(DT, pairs, bt, j * d_out + o, v);
                PG_UNROLL
                for (int i = 0; i < MR; i++) acc[i][v] = _mm256_fmadd_ps(hv[i], bv, acc[i][v]);
            }
        }
    }
    const int add = scatter != NULL;
    PG_UNROLL
    for (int i = 0; i < MR; i++) {
        float *yr = y + (add ? (size_t)scatter[i] : (size_t)i) * ldy + o;
        if (pairs) {
            PG_UNROLL
            for (int q = 0; q < NV / 2; q++) {
                __m256 lo = _mm256_unpacklo_ps(acc[i][2 * q], acc[i][2 * q + 1]); /* 0 1 2 3 | 8 9 10 11 */
                __m256 hi = _mm256_unpackhi_ps(acc[i][2 * q], acc[i][2 * q + 1]); /* 4 5 6 7 | 12 13 14 15 */
                ex_put(yr + 16 * q, _mm256_permute2f128_ps(lo, hi, 0x20), add);
                ex_put(yr + 16 * q + 8, _mm256_permute2f128_ps(lo, hi, 0x31), add);
            }
        } else {
            PG_UNROLL
            for (int v = 0; v < NV; v++) ex_put(yr + (size_t)v * 8, acc[i][v], add);
        }
    }
}

/* Every tile shape expand_generic uses: mr rows by ex_nv_for(mr) vectors, and 4, 2 or 1 at the end. */
#define EX_CASE(MR, NV)                                                                                          \
    case (MR) * 16 + (NV): expand_tile(MR, NV, DT, h, r, bt, d_out, o, y, ldy, scatter); break;

PG_INL void expand_tile_dispatch(const int DT, int mr, int nv, const float *h, size_t r, const void *bt, size_t d_out,
                                 size_t o, float *y, size_t ldy, const int32_t *scatter) {
    switch (mr * 16 + nv) {
        EX_CASE(1, 8) EX_CASE(1, 4) EX_CASE(1, 2) EX_CASE(1, 1)
        EX_CASE(2, 4) EX_CASE(2, 2) EX_CASE(2, 1)
        EX_CASE(3, 3) EX_CASE(3, 2) EX_CASE(3, 1)
        EX_CASE(4, 2) EX_CASE(4, 1)
        EX_CASE(5, 2) EX_CASE(5, 1)
        EX_CASE(6, 2) EX_CASE(6, 1)
    default: break;
    }
}

PG_INL void expand_generic(const int DT, const float *h, size_t n, size_t r, const void *bt, size_t d_out, float *y,
                           size_t ldy, const int32_t *scatter) {
    const size_t d8 = d_out & ~(size_t)7;
    /* rows outside, columns inside: the tile's rows of h stay in L1 while Bt (L2) streams past */
    for (size_t i0 = 0; i0 < n; i0 += EX_MR) {
        int mr = n - i0 >= EX_MR ? EX_MR : (int)(n - i0);
        int nvmax = ex_nv_for(mr);
        const float *hi = h + i0 * r;
        float *yi = scatter ? y : y + i0 * ldy;
        const int32_t *si = scatter ? scatter + i0 : NULL;
        size_t o = 0;
        while (o < d8) {
            size_t rem = (d8 - o) / 8;
            int nv = rem >= (size_t)nvmax ? nvmax : rem >= 4 ? 4 : rem >= 2 ? 2 : 1;
            expand_tile_dispatch(DT, mr, nv, hi, r, bt, d_out, o, yi, ldy, si);
            o += (size_t)nv * 8;
        }
    }
    /* the last d_out % 8 columns: the same FMA chain, one element at a time */
    if (d8 < d_out) {
        for (size_t i = 0; i < n; i++) {
            float *yr = y + (scatter ? (size_t)scatter[i] : i) * ldy;
            for (size_t o = d8; o < d_out; o++) {
                __m128 s = _mm_setzero_ps();
                for (size_t j = 0; j < r; j++)
                    s = _mm_fmadd_ss(_mm_set_ss(h[i * r + j]), _mm_set_ss(ld1(DT, bt, j * d_out + o)), s);
                yr[o] = scatter ? yr[o] + _mm_cvtss_f32(s) : _mm_cvtss_f32(s);
            }
        }
    }
}

PG_TARGET static void expand_f32(const float *h, size_t n, size_t r, const void *bt, size_t d_out, float *y,
                                 size_t ldy, const int32_t *scatter) {
    expand_generic(PG_DTYPE_F32, h, n, r, bt, d_out, y, ldy, scatter);
}

PG_TARGET static void expand_bf16(const float *h, size_t n, size_t r, const void *bt, size_t d_out, float *y,
                                  size_t ldy, const int32_t *scatter) {
    expand_generic(PG_DTYPE_BF16, h, n, r, bt, d_out, y, ldy, scatter);
}

PG_TARGET static void expand_f16(const float *h, size_t n, size_t r, const void *bt, size_t d_out, float *y,
                                 size_t ldy, const int32_t *scatter) {
    expand_generic(PG_DTYPE_F16, h, n, r, bt, d_out, y, ldy, scatter);
}

PG_TARGET void pg_avx2_lora_expand(const float *h, size_t n, size_t r, const void *bt, int b_dtype, size_t d_out,
                                   float *y, size_t ldy, const int32_t *scatter) {
    if (n == 0 || d_out == 0) return;
    switch (b_dtype) {
    case PG_DTYPE_F32: expand_f32(h, n, r, bt, d_out, y, ldy, scatter); break;
    case PG_DTYPE_BF16: expand_bf16(h, n, r, bt, d_out, y, ldy, scatter); break;
    case PG_DTYPE_F16: expand_f16(h, n, r, bt, d_out, y, ldy, scatter); break;
    default: break;
    }
}

/* ================================================================ add */

PG_TARGET void pg_avx2_add_f32(float *y, const float *x, size_t n) {
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 a0 = _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i));
        __m256 a1 = _mm256_add_ps(_mm256_loadu_ps(y + i + 8), _mm256_loadu_ps(x + i + 8));
        __m256 a2 = _mm256_add_ps(_mm256_loadu_ps(y + i + 16), _mm256_loadu_ps(x + i + 16));
        __m256 a3 = _mm256_add_ps(_mm256_loadu_ps(y + i + 24), _mm256_loadu_ps(x + i + 24));
        _mm256_storeu_ps(y + i, a0);
        _mm256_storeu_ps(y + i + 8, a1);
        _mm256_storeu_ps(y + i + 16, a2);
        _mm256_storeu_ps(y + i + 24, a3);
    }
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
    for (; i < n; i++) y[i] = y[i] + x[i];
}

/* y stays in registers across the rows: one read and one write of y per call instead of one per row. */
PG_TARGET void pg_avx2_add_rows_f32(float *y, const float *const *x, size_t count, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a0 = _mm256_loadu_ps(y + i), a1 = _mm256_loadu_ps(y + i + 8);
        for (size_t r = 0; r < count; r++) {
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x[r] + i));
            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x[r] + i + 8));
        }
        _mm256_storeu_ps(y + i, a0);
        _mm256_storeu_ps(y + i + 8, a1);
    }
    for (; i < n; i++) {
        float v = y[i];
        for (size_t r = 0; r < count; r++) v = v + x[r][i];
        y[i] = v;
    }
}

PG_TARGET double pg_avx2_fma_probe(size_t iterations) {
    volatile float seed = 0.999f;
    __m256 x = _mm256_set1_ps(seed), y = _mm256_set1_ps(1e-4f), a[12];
    for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps((float)i * 1e-3f);
    for (size_t r = 0; r < iterations; r++) {
        _Pragma("GCC unroll 12")
        for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], x, y);
    }
    __m256 s = a[0];
    for (int i = 1; i < 12; i++) s = _mm256_add_ps(s, a[i]);
    volatile float sink = hsum8(s);
    (void)sink;
    return 12.0 * 8 * 2 * (double)iterations;
}

#else

/* ISO C forbids an empty translation unit. */
typedef int pg_avx2_unavailable;

#endif /* PG_HAVE_AVX2_IMPL */
