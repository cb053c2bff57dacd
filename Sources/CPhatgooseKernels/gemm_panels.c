/* The routing-score GEMM against a pre-packed matrix: C = alpha * A B^T with B (the gate matrix of a layer, fixed
 * while the layer is served) packed once into column panels, so that the product runs as an outer-product
 * (broadcast-FMA) kernel: per k, one aligned panel load serves every row of the tile, and no horizontal reduction
 * is left at the end. The dot-product kernels (gemm_nt) load both operands per FMA instead; this form reached about
 * 1.7x their rate with AVX-512 on the project's machine.
 *
 * Layout (pg_pack_panels): panel p holds columns 16p .. 16p+15 of the output, i.e. rows 16p.. of B; for each kk < k
 * its 16 values B[16p + c][kk] are contiguous at (p * k + kk) * 16 + c, zero where 16p + c >= n.
 *
 * Determinism and accuracy: k is cut into blocks of PG_PANEL_KB from kk = 0; in each block every output is one
 * chain acc = acc + a[i,kk] * B[j,kk] in order from +0 (a fused multiply-add under AVX2 and AVX-512, which give the
 * same bits as each other; separately rounded in portable C); the block sums are added in block order from +0
 * (total = total + acc), then multiplied once by alpha. Blocking keeps the rounding error of k = 2048 near that of
 * the dot-product kernels' 8- or 16-lane partial sums rather than that of one 2048-long chain. Tiles and panels only interleave independent chains, so an output does not depend on
 * its row, its column, the batch size or how a caller splits rows or panels between calls. */
#include "pg_internal.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define PANEL PG_PANEL_WIDTH
#define KB 128 /* k-block of the partial sums */

size_t pg_pack_panel_floats(size_t n, size_t k) { return (n + PANEL - 1) / PANEL * PANEL * k; }

void pg_pack_panels(const float *b, size_t ldb, size_t n, size_t k, float *packed) {
    size_t panels = (n + PANEL - 1) / PANEL;
    for (size_t p = 0; p < panels; p++) {
        float *dst = packed + p * k * PANEL;
        for (size_t kk = 0; kk < k; kk++) {
            for (size_t c = 0; c < PANEL; c++) {
                size_t j = p * PANEL + c;
                dst[kk * PANEL + c] = j < n ? b[j * ldb + kk] : 0.0f;
            }
        }
    }
}

/* Stores the first `cols` of the 16 values of one row's panel, times alpha. */
static inline void store_cols(float *crow, const float *vals, size_t cols, float alpha) {
    for (size_t c = 0; c < cols; c++) crow[c] = alpha * vals[c];
}

void pg_portable_gemm_packed_f32(const float *a, size_t lda, size_t m, const float *packed, size_t n, size_t k,
                                 float alpha, float *c, size_t ldc) {
    size_t panels = (n + PANEL - 1) / PANEL;
    for (size_t i = 0; i < m; i++) {
        const float *ar = a + i * lda;
        for (size_t p = 0; p < panels; p++) {
            const float *bp = packed + p * k * PANEL;
            float total[PANEL] = {0};
            for (size_t k0 = 0; k0 < k; k0 += KB) {
                size_t k1 = k - k0 > KB ? k0 + KB : k;
                float acc[PANEL] = {0};
                for (size_t kk = k0; kk < k1; kk++) {
                    float x = ar[kk];
                    for (size_t l = 0; l < PANEL; l++) acc[l] = acc[l] + x * bp[kk * PANEL + l];
                }
                for (size_t l = 0; l < PANEL; l++) total[l] = total[l] + acc[l];
            }
            size_t cols = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
            store_cols(c + i * ldc + p * PANEL, total, cols, alpha);
        }
    }
}

#if PG_HAVE_AVX2_IMPL
#include <immintrin.h>

#define AVX2_INL static inline __attribute__((always_inline, target("avx2,fma,f16c")))
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define P5_INL static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define P5_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define UNROLL _Pragma("GCC unroll 16")

/* AVX2: MR rows x one panel (2 vectors): 12 accumulators, 2 panel loads and MR broadcasts per kk. */
#define A2_MR 6

AVX2_INL void a2_tile(const int MR, const float *a, size_t lda, const float *bp, size_t k, float alpha, float *c,
                      size_t ldc, size_t cols) {
    __m256 acc[A2_MR][2], total[A2_MR][2];
    UNROLL
    for (int i = 0; i < MR; i++) total[i][0] = total[i][1] = _mm256_setzero_ps();
    for (size_t k0 = 0; k0 < k; k0 += KB) {
        size_t k1 = k - k0 > KB ? k0 + KB : k;
        UNROLL
        for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        for (size_t kk = k0; kk < k1; kk++) {
            __m256 b0 = _mm256_load_ps(bp + kk * PANEL), b1 = _mm256_load_ps(bp + kk * PANEL + 8);
            UNROLL
            for (int i = 0; i < MR; i++) {
                __m256 x = _mm256_broadcast_ss(a + (size_t)i * lda + kk);
                acc[i][0] = _mm256_fmadd_ps(x, b0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(x, b1, acc[i][1]);
            }
        }
        UNROLL
        for (int i = 0; i < MR; i++) {
            total[i][0] = _mm256_add_ps(total[i][0], acc[i][0]);
            total[i][1] = _mm256_add_ps(total[i][1], acc[i][1]);
        }
    }
    const __m256 va = _mm256_set1_ps(alpha);
    UNROLL
    for (int i = 0; i < MR; i++) {
        float *crow = c + (size_t)i * ldc;
        if (cols == PANEL) {
            _mm256_storeu_ps(crow, _mm256_mul_ps(va, total[i][0]));
            _mm256_storeu_ps(crow + 8, _mm256_mul_ps(va, total[i][1]));
        } else {
            float vals[PANEL];
            _mm256_storeu_ps(vals, total[i][0]);
            _mm256_storeu_ps(vals + 8, total[i][1]);
            store_cols(crow, vals, cols, alpha);
        }
    }
}

AVX2_TARGET void pg_avx2_gemm_packed_f32(const float *a, size_t lda, size_t m, const float *packed, size_t n,
                                         size_t k, float alpha, float *c, size_t ldc) {
    size_t panels = (n + PANEL - 1) / PANEL;
    for (size_t i0 = 0; i0 < m; i0 += A2_MR) {
        int mr = m - i0 >= A2_MR ? A2_MR : (int)(m - i0);
        for (size_t p = 0; p < panels; p++) {
            size_t cols = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
            const float *ai = a + i0 * lda, *bp = packed + p * k * PANEL;
            float *ci = c + i0 * ldc + p * PANEL;
            switch (mr) {
            case 6: a2_tile(6, ai, lda, bp, k, alpha, ci, ldc, cols); break;
            case 5: a2_tile(5, ai, lda, bp, k, alpha, ci, ldc, cols); break;
            case 4: a2_tile(4, ai, lda, bp, k, alpha, ci, ldc, cols); break;
            case 3: a2_tile(3, ai, lda, bp, k, alpha, ci, ldc, cols); break;
            case 2: a2_tile(2, ai, lda, bp, k, alpha, ci, ldc, cols); break;
            default: a2_tile(1, ai, lda, bp, k, alpha, ci, ldc, cols); break;
            }
        }
    }
}

/* AVX-512: MR rows x NP panels (one vector each): up to 24 accumulators, NP aligned panel loads and MR broadcasts
 * per kk. Rows outside, panel pairs inside: the tile's rows of A (12 x k floats) stay in L1/L2 while the panels
 * stream from L2. */
#define A5_MR 12

P5_INL void a5_tile(const int MR, const int NP, const float *a, size_t lda, const float *bp, size_t k, float alpha,
                    float *c, size_t ldc, size_t cols_last) {
    __m512 acc[A5_MR][2];
    float total[A5_MR][2][PANEL] __attribute__((aligned(64))); /* block sums: 24 more vectors do not fit in registers */
    const size_t pstride = k * PANEL;
    for (size_t k0 = 0; k0 < k; k0 += KB) {
        size_t k1 = k - k0 > KB ? k0 + KB : k;
        UNROLL
        for (int i = 0; i < MR; i++) {
            UNROLL
            for (int q = 0; q < NP; q++) acc[i][q] = _mm512_setzero_ps();
        }
        for (size_t kk = k0; kk < k1; kk++) {
            __m512 bv[2];
            UNROLL
            for (int q = 0; q < NP; q++) bv[q] = _mm512_load_ps(bp + (size_t)q * pstride + kk * PANEL);
            UNROLL
            for (int i = 0; i < MR; i++) {
                __m512 x = _mm512_set1_ps(a[(size_t)i * lda + kk]);
                UNROLL
                for (int q = 0; q < NP; q++) acc[i][q] = _mm512_fmadd_ps(x, bv[q], acc[i][q]);
            }
        }
        UNROLL
        for (int i = 0; i < MR; i++) {
            UNROLL
            for (int q = 0; q < NP; q++) {
                __m512 t = k0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(total[i][q]);
                _mm512_store_ps(total[i][q], _mm512_add_ps(t, acc[i][q]));
            }
        }
    }
    if (k == 0) {
        UNROLL
        for (int i = 0; i < MR; i++) {
            UNROLL
            for (int q = 0; q < NP; q++) _mm512_store_ps(total[i][q], _mm512_setzero_ps());
        }
    }
    const __m512 va = _mm512_set1_ps(alpha);
    const __mmask16 last = (__mmask16)((1u << cols_last) - 1u);
    UNROLL
    for (int i = 0; i < MR; i++) {
        float *crow = c + (size_t)i * ldc;
        UNROLL
        for (int q = 0; q < NP; q++) {
            __m512 v = _mm512_mul_ps(va, _mm512_load_ps(total[i][q]));
            if (q == NP - 1 && cols_last < PANEL)
                _mm512_mask_storeu_ps(crow + q * PANEL, last, v);
            else
                _mm512_storeu_ps(crow + q * PANEL, v);
        }
    }
}

#define A5_CASE(MR)                                                                                               \
    case MR:                                                                                                      \
        if (np == 2)                                                                                              \
            a5_tile(MR, 2, ai, lda, bp, k, alpha, ci, ldc, cols_last);                                            \
        else                                                                                                      \
            a5_tile(MR, 1, ai, lda, bp, k, alpha, ci, ldc, cols_last);                                            \
        break;

/* One tile: rows i0.. (at most A5_MR) by the panel pair (or single panel) at p. */
P5_INL void a5_tile_at(const float *a, size_t lda, size_t m, const float *packed, size_t n, size_t k, float alpha,
                       float *c, size_t ldc, size_t i0, size_t p, size_t panels) {
    int mr = m - i0 >= A5_MR ? A5_MR : (int)(m - i0);
    int np = panels - p >= 2 ? 2 : 1;
    size_t end = (p + (size_t)np) * PANEL;
    size_t cols_last = end <= n ? PANEL : PANEL - (end - n);
    const float *ai = a + i0 * lda, *bp = packed + p * k * PANEL;
    float *ci = c + i0 * ldc + p * PANEL;
    switch (mr) {
        A5_CASE(12) A5_CASE(11) A5_CASE(10) A5_CASE(9) A5_CASE(8) A5_CASE(7)
        A5_CASE(6) A5_CASE(5) A5_CASE(4) A5_CASE(3) A5_CASE(2) A5_CASE(1)
    default: break;
    }
}

/* Loop order: while all panels fit in about half of L2 (1 MiB), row tiles outside, so a tile's rows of A stay in
 * L1/L2 across the panels. Larger packed matrices (W2: 1.4 MiB, W4 at d_in 5120: 3.4 MiB) would then stream from L3
 * once per row tile, so panel pairs go outside and each pair (256-640 KiB) stays in L2 while the rows pass: W4's
 * score GEMM measured 86 against 105 GFLOP/s on one core, in the two orders. */
P5_TARGET void pg_avx512_gemm_packed_f32(const float *a, size_t lda, size_t m, const float *packed, size_t n,
                                         size_t k, float alpha, float *c, size_t ldc) {
    size_t panels = (n + PANEL - 1) / PANEL;
    if (panels * k * PANEL * sizeof(float) <= ((size_t)1 << 20)) {
        for (size_t i0 = 0; i0 < m; i0 += A5_MR)
            for (size_t p = 0; p < panels; p += 2) a5_tile_at(a, lda, m, packed, n, k, alpha, c, ldc, i0, p, panels);
    } else {
        for (size_t p = 0; p < panels; p += 2)
            for (size_t i0 = 0; i0 < m; i0 += A5_MR) a5_tile_at(a, lda, m, packed, n, k, alpha, c, ldc, i0, p, panels);
    }
}

#endif /* PG_HAVE_AVX2_IMPL */
