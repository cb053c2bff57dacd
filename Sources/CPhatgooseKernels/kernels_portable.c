/* Portable C implementations of the Phatgoose kernels.
 *
 * Dot products use one fixed schedule everywhere in this file: 8 lane accumulators (lane l takes the
 * elements k with k % 8 == l, in increasing k), each updated as acc = acc + a*b with a separately rounded
 * product; then the fixed reduction ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)). The register-blocked loops
 * only interleave independent lanes, so an element's value never depends on the blocking.
 * Floating-point contraction is switched off so that no compiler fuses a*b+c into an FMA in some loops
 * and not in others (compilers never reassociate without -ffast-math, which is not assumed). */
#include "pg_internal.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define PG_L 8 /* lanes of the dot-product schedule */

static inline float reduce8(const float *acc) {
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* Loads `cnt` (<= 8) elements of `dtype` at element index idx of base as F32 into out[0..cnt). */
static inline void load_chunk(const void *base, size_t idx, int dtype, size_t cnt, float *out) {
    if (dtype == PG_DTYPE_F32) {
        memcpy(out, (const unsigned char *)base + idx * sizeof(float), cnt * sizeof(float));
    } else {
        uint16_t tmp[PG_L];
        memcpy(tmp, (const unsigned char *)base + idx * sizeof(uint16_t), cnt * sizeof(uint16_t));
        if (dtype == PG_DTYPE_BF16) {
            for (size_t l = 0; l < cnt; l++) out[l] = pg_bf16_to_f32(tmp[l]);
        } else {
            for (size_t l = 0; l < cnt; l++) out[l] = pg_f16_to_f32(tmp[l]);
        }
    }
}

/* ---------------------------------------------------------------- conversions */

void pg_portable_convert_to_f32(const void *src, int dtype, float *dst, size_t n) {
    if (n == 0) return;
    if (dtype == PG_DTYPE_F32) {
        memmove(dst, src, n * sizeof(float));
    } else if (dtype == PG_DTYPE_BF16) {
        const unsigned char *s = (const unsigned char *)src;
        for (size_t i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, s + 2 * i, 2);
            dst[i] = pg_bf16_to_f32(v);
        }
    } else if (dtype == PG_DTYPE_F16) {
        const unsigned char *s = (const unsigned char *)src;
        for (size_t i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, s + 2 * i, 2);
            dst[i] = pg_f16_to_f32(v);
        }
    }
}

void pg_portable_convert_from_f32(const float *src, int dtype, void *dst, size_t n) {
    if (n == 0) return;
    if (dtype == PG_DTYPE_F32) {
        memmove(dst, src, n * sizeof(float));
    } else if (dtype == PG_DTYPE_BF16) {
        unsigned char *d = (unsigned char *)dst;
        for (size_t i = 0; i < n; i++) {
            uint16_t v = pg_f32_to_bf16(src[i]);
            memcpy(d + 2 * i, &v, 2);
        }
    } else if (dtype == PG_DTYPE_F16) {
        unsigned char *d = (unsigned char *)dst;
        for (size_t i = 0; i < n; i++) {
            uint16_t v = pg_f32_to_f16(src[i]);
            memcpy(d + 2 * i, &v, 2);
        }
    }
}

size_t pg_portable_count_nonfinite(const void *src, int dtype, size_t n) {
    size_t count = 0;
    const unsigned char *s = (const unsigned char *)src;
    if (n == 0) return 0;
    if (dtype == PG_DTYPE_F32) {
        for (size_t i = 0; i < n; i++) {
            uint32_t v;
            memcpy(&v, s + 4 * i, 4);
            count += (v & 0x7F800000u) == 0x7F800000u;
        }
    } else if (dtype == PG_DTYPE_BF16 || dtype == PG_DTYPE_F16) {
        uint16_t mask = dtype == PG_DTYPE_BF16 ? 0x7F80u : 0x7C00u;
        for (size_t i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, s + 2 * i, 2);
            count += (uint16_t)(v & mask) == mask;
        }
    }
    return count;
}

/* ---------------------------------------------------------------- layernorm */

void pg_portable_layernorm_rows(const float *x, size_t ldx, size_t rows, size_t d, float eps, float *out,
                                size_t ldo) {
    if (d == 0) return;
    for (size_t i = 0; i < rows; i++) {
        const float *xr = x + i * ldx;
        float *orow = out + i * ldo;
        double acc[4] = {0, 0, 0, 0};
        size_t d4 = d & ~(size_t)3;
        for (size_t t = 0; t < d4; t += 4)
            for (size_t l = 0; l < 4; l++) acc[l] += (double)xr[t + l];
        for (size_t t = d4; t < d; t++) acc[t - d4] += (double)xr[t];
        double mean = ((acc[0] + acc[2]) + (acc[1] + acc[3])) / (double)d;

        double q[4] = {0, 0, 0, 0};
        for (size_t t = 0; t < d4; t += 4)
            for (size_t l = 0; l < 4; l++) {
                double dv = (double)xr[t + l] - mean;
                q[l] += dv * dv;
            }
        for (size_t t = d4; t < d; t++) {
            double dv = (double)xr[t] - mean;
            q[t - d4] += dv * dv;
        }
        double var = ((q[0] + q[2]) + (q[1] + q[3])) / (double)d;
        double inv = 1.0 / pg_sqrt(var + (double)eps);
        for (size_t t = 0; t < d; t++) orow[t] = (float)(((double)xr[t] - mean) * inv);
    }
}

/* ---------------------------------------------------------------- NT products (gemm, shrink) */

#define PT_MB 32  /* rows of the f32 operand per block */
#define PT_KC 256 /* k-block, a multiple of PG_L */

/* Accumulates MR rows of the f32 operand (ar[i] + p0) against NR f32 rows br[j] over kc8 elements (a
 * multiple of PG_L) and then `tail` more, into the lane accumulators acc[i][j][l], kept in memory between
 * k-blocks. */
static inline void nt_tile(const int MR, const int NR, const float *const *ar, size_t p0, const float *const *br,
                           size_t kc8, size_t tail, float acc[][2][PG_L], int load) {
    float t[2][2][PG_L];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            for (int l = 0; l < PG_L; l++) t[i][j][l] = load ? acc[i][j][l] : 0.0f;
    for (size_t p = 0; p < kc8; p += PG_L) {
        for (int i = 0; i < MR; i++) {
            const float *ap = ar[i] + p0 + p;
            for (int j = 0; j < NR; j++) {
                const float *bp = br[j] + p;
                for (int l = 0; l < PG_L; l++) t[i][j][l] = t[i][j][l] + ap[l] * bp[l];
            }
        }
    }
    if (tail) {
        for (int i = 0; i < MR; i++) {
            const float *ap = ar[i] + p0 + kc8;
            for (int j = 0; j < NR; j++) {
                const float *bp = br[j] + kc8;
                for (size_t l = 0; l < tail; l++) t[i][j][l] = t[i][j][l] + ap[l] * bp[l];
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            for (int l = 0; l < PG_L; l++) acc[i][j][l] = t[i][j][l];
}

/* out[i*ldo + j] = ((row_scale ? row_scale[i] : 1) * alpha) * dot(xrow(i), b row j) for i < m, j < n.
 * Blocks of PT_MB rows of x, pairs of b rows and PT_KC-element k-blocks; a k-block of the b pair is
 * converted to F32 once (unless `direct`: F32 rows read in place) and used by all rows of the x block. */
static inline void nt_generic(const int DT, const int direct, const float *x, size_t ldx, const int32_t *rows,
                              size_t m, const void *b, size_t ldb, size_t n, size_t k, const float *row_scale,
                              float alpha, float *out, size_t ldo) {
    const size_t k8 = k & ~(size_t)(PG_L - 1);
    const size_t tail = k - k8;
    float acc[PT_MB][2][PG_L];
    float cbuf[2][PT_KC + PG_L]; /* the last k-block also holds the tail */
    const float *ar[PT_MB];
    float sc[PT_MB];
    for (size_t i0 = 0; i0 < m; i0 += PT_MB) {
        size_t mb = m - i0 >= PT_MB ? PT_MB : m - i0;
        for (size_t t = 0; t < mb; t++) {
            size_t src = rows ? (size_t)rows[i0 + t] : i0 + t;
            ar[t] = x + src * ldx;
            sc[t] = (row_scale ? row_scale[i0 + t] : 1.0f) * alpha;
        }
        for (size_t j0 = 0; j0 < n; j0 += 2) {
            int nr = n - j0 >= 2 ? 2 : 1;
            size_t p0 = 0;
            for (;;) {
                size_t p1 = k8 - p0 > PT_KC ? p0 + PT_KC : k8;
                int last = p1 == k8;
                size_t tl = last ? tail : 0;
                size_t cnt = p1 - p0 + tl;
                const float *br[2];
                for (int u = 0; u < nr; u++) {
                    size_t base = (j0 + (size_t)u) * ldb + p0;
                    if (direct) {
                        br[u] = (const float *)b + base;
                    } else {
                        for (size_t c = 0; c < cnt; c += PG_L)
                            load_chunk(b, base + c, DT, cnt - c < PG_L ? cnt - c : PG_L, cbuf[u] + c);
                        br[u] = cbuf[u];
                    }
                }
                for (size_t ii = 0; ii < mb; ii += 2) {
                    int mr = mb - ii >= 2 ? 2 : 1;
                    if (mr == 2 && nr == 2)
                        nt_tile(2, 2, ar + ii, p0, br, p1 - p0, tl, acc + ii, p0 > 0);
                    else if (mr == 2)
                        nt_tile(2, 1, ar + ii, p0, br, p1 - p0, tl, acc + ii, p0 > 0);
                    else if (nr == 2)
                        nt_tile(1, 2, ar + ii, p0, br, p1 - p0, tl, acc + ii, p0 > 0);
                    else
                        nt_tile(1, 1, ar + ii, p0, br, p1 - p0, tl, acc + ii, p0 > 0);
                }
                if (last) break;
                p0 = p1;
            }
            for (size_t t = 0; t < mb; t++)
                for (int u = 0; u < nr; u++) out[(i0 + t) * ldo + j0 + (size_t)u] = sc[t] * reduce8(acc[t][u]);
        }
    }
}

void pg_portable_gemm_nt_f32(const float *a, size_t lda, size_t m, const float *b, size_t ldb, size_t n,
                             size_t k, float alpha, float *c, size_t ldc) {
    if (m == 0 || n == 0) return;
    nt_generic(PG_DTYPE_F32, 1, a, lda, NULL, m, b, ldb, n, k, NULL, alpha, c, ldc);
}

void pg_portable_lora_shrink(const float *x, size_t ldx, const int32_t *rows, size_t n, const void *a,
                             int a_dtype, size_t r, size_t d_in, const float *row_scale, float lora_scale,
                             float *h) {
    if (n == 0 || r == 0) return;
    switch (a_dtype) {
    case PG_DTYPE_F32:
        nt_generic(PG_DTYPE_F32, 0, x, ldx, rows, n, a, d_in, r, d_in, row_scale, lora_scale, h, r);
        break;
    case PG_DTYPE_BF16:
        nt_generic(PG_DTYPE_BF16, 0, x, ldx, rows, n, a, d_in, r, d_in, row_scale, lora_scale, h, r);
        break;
    case PG_DTYPE_F16:
        nt_generic(PG_DTYPE_F16, 0, x, ldx, rows, n, a, d_in, r, d_in, row_scale, lora_scale, h, r);
        break;
    default:
        break;
    }
}

/* ---------------------------------------------------------------- expand */

#define PG_EXP_OB 32 /* output columns per pass */
#define PG_EXP_RMAX 64 /* ranks whose Bt column block is converted at once */

/* MR rows (h row stride r) x cnt (<= PG_EXP_OB) columns; bv holds r rows of PG_EXP_OB F32 values. */
static inline void expand_tile(const int MR, const float *h, size_t r, size_t j0, size_t j1, const float *bv,
                               size_t cnt, float acc[4][PG_EXP_OB]) {
    for (size_t j = j0; j < j1; j++) {
        const float *bj = bv + (j - j0) * PG_EXP_OB;
        for (int i = 0; i < MR; i++) {
            float hv = h[(size_t)i * r + j];
            if (cnt == PG_EXP_OB) {
                for (size_t l = 0; l < PG_EXP_OB; l++) acc[i][l] = acc[i][l] + hv * bj[l];
            } else {
                for (size_t l = 0; l < cnt; l++) acc[i][l] = acc[i][l] + hv * bj[l];
            }
        }
    }
}

/* Column blocks of PG_EXP_OB outputs; for each, Bt's block (up to PG_EXP_RMAX ranks at a time) is converted
 * to F32 once and used by every row of h. Each output is the chain acc = acc + h*b over j in order. */
static inline void expand_generic(const int DT, const float *h, size_t n, size_t r, const void *bt, size_t d_out,
                                  float *y, size_t ldy, const int32_t *scatter) {
    float bv[PG_EXP_RMAX * PG_EXP_OB];
    float acc[4][PG_EXP_OB];
    for (size_t o = 0; o < d_out; o += PG_EXP_OB) {
        size_t cnt = d_out - o >= PG_EXP_OB ? PG_EXP_OB : d_out - o;
        if (r <= PG_EXP_RMAX) {
            for (size_t j = 0; j < r; j++)
                for (size_t c0 = 0; c0 < cnt; c0 += PG_L)
                    load_chunk(bt, j * d_out + o + c0, DT, cnt - c0 < PG_L ? cnt - c0 : PG_L, bv + j * PG_EXP_OB + c0);
        }
        for (size_t i0 = 0; i0 < n; i0 += 4) {
            int mr = n - i0 >= 4 ? 4 : (int)(n - i0);
            const float *hi = h + i0 * r;
            for (int i = 0; i < mr; i++)
                for (size_t l = 0; l < PG_EXP_OB; l++) acc[i][l] = 0.0f;
            for (size_t j0 = 0; j0 < r; j0 += PG_EXP_RMAX) {
                size_t j1 = r - j0 > PG_EXP_RMAX ? j0 + PG_EXP_RMAX : r;
                if (r > PG_EXP_RMAX) { /* rare: convert this rank block for this row block */
                    for (size_t j = j0; j < j1; j++)
                        for (size_t c0 = 0; c0 < cnt; c0 += PG_L)
                            load_chunk(bt, j * d_out + o + c0, DT, cnt - c0 < PG_L ? cnt - c0 : PG_L,
                                       bv + (j - j0) * PG_EXP_OB + c0);
                }
                switch (mr) {
                case 4: expand_tile(4, hi, r, j0, j1, bv, cnt, acc); break;
                case 3: expand_tile(3, hi, r, j0, j1, bv, cnt, acc); break;
                case 2: expand_tile(2, hi, r, j0, j1, bv, cnt, acc); break;
                default: expand_tile(1, hi, r, j0, j1, bv, cnt, acc); break;
                }
            }
            for (int i = 0; i < mr; i++) {
                if (scatter) {
                    float *yr = y + (size_t)scatter[i0 + (size_t)i] * ldy + o;
                    for (size_t l = 0; l < cnt; l++) yr[l] = yr[l] + acc[i][l];
                } else {
                    memcpy(y + (i0 + (size_t)i) * ldy + o, acc[i], cnt * sizeof(float));
                }
            }
        }
    }
}

void pg_portable_lora_expand(const float *h, size_t n, size_t r, const void *bt, int b_dtype, size_t d_out,
                             float *y, size_t ldy, const int32_t *scatter) {
    if (n == 0 || d_out == 0) return;
    switch (b_dtype) {
    case PG_DTYPE_F32: expand_generic(PG_DTYPE_F32, h, n, r, bt, d_out, y, ldy, scatter); break;
    case PG_DTYPE_BF16: expand_generic(PG_DTYPE_BF16, h, n, r, bt, d_out, y, ldy, scatter); break;
    case PG_DTYPE_F16: expand_generic(PG_DTYPE_F16, h, n, r, bt, d_out, y, ldy, scatter); break;
    default: break;
    }
}

/* ---------------------------------------------------------------- add */

void pg_portable_add_f32(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = y[i] + x[i];
}

void pg_portable_add_rows_f32(float *y, const float *const *x, size_t count, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float v = y[i];
        for (size_t r = 0; r < count; r++) v = v + x[r][i];
        y[i] = v;
    }
}

double pg_portable_fma_probe(size_t iterations) {
    volatile float seed = 0.999f;
    float x = seed, y = 1e-4f, a[8];
    for (int i = 0; i < 8; i++) a[i] = (float)i * 1e-3f;
    for (size_t r = 0; r < iterations; r++)
        for (int i = 0; i < 8; i++) a[i] = a[i] * x + y;
    volatile float sink = a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
    (void)sink;
    return 16.0 * (double)iterations;
}
