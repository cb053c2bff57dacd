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

static inline size_t dtype_size(int dtype) { return dtype == PG_DTYPE_F32 ? 4u : 2u; }

/* Loads `cnt` (<= 8) elements of `dtype` at element index idx of base as F32 into out[0..cnt). */
static inline void load_chunk(const void *base, size_t idx, int dtype, size_t cnt, float *out) {
    if (dtype == PG_DTYPE_F32) {
        memcpy(out, (const unsigned char *)base + idx * sizeof(float), cnt * sizeof(float));
    } else {
        uint16_t tmp[PG_L];
        memcpy(tmp, (const uint16_t *)base + idx, cnt * sizeof(uint16_t));
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

/* MR rows of the f32 operand (row pointers ar) against NR rows of the typed operand (b, row stride ldb
 * elements), over k. Writes the MR x NR dot products to sums. */
static inline void nt_tile(const int MR, const int NR, const int DT, const float *const *ar, const void *b,
                           size_t ldb, size_t k, float sums[4][2]) {
    float acc[4][2][PG_L];
    float bv[2][PG_L];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            for (int l = 0; l < PG_L; l++) acc[i][j][l] = 0.0f;
    size_t k8 = k & ~(size_t)(PG_L - 1);
    for (size_t p = 0; p < k8; p += PG_L) {
        for (int j = 0; j < NR; j++) {
            load_chunk(b, (size_t)j * ldb + p, DT, PG_L, bv[j]);
        }
        for (int i = 0; i < MR; i++) {
            const float *ap = ar[i] + p;
            for (int j = 0; j < NR; j++)
                for (int l = 0; l < PG_L; l++) acc[i][j][l] = acc[i][j][l] + ap[l] * bv[j][l];
        }
    }
    size_t tail = k - k8;
    if (tail) {
        for (int j = 0; j < NR; j++) load_chunk(b, (size_t)j * ldb + k8, DT, tail, bv[j]);
        for (int i = 0; i < MR; i++) {
            const float *ap = ar[i] + k8;
            for (int j = 0; j < NR; j++)
                for (size_t l = 0; l < tail; l++) acc[i][j][l] = acc[i][j][l] + ap[l] * bv[j][l];
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) sums[i][j] = reduce8(acc[i][j]);
}

/* out[i*ldo + j] = ((row_scale ? row_scale[i] : 1) * alpha) * dot(xrow(i), b row j) for i < m, j < n. */
static inline void nt_generic(const int DT, const float *x, size_t ldx, const int32_t *rows, size_t m,
                              const void *b, size_t ldb, size_t n, size_t k, const float *row_scale,
                              float alpha, float *out, size_t ldo) {
    size_t es = dtype_size(DT);
    for (size_t i0 = 0; i0 < m; i0 += 2) {
        int mr = m - i0 >= 2 ? 2 : 1;
        const float *ar[4];
        float sc[2];
        for (int t = 0; t < mr; t++) {
            size_t src = rows ? (size_t)rows[i0 + t] : i0 + t;
            ar[t] = x + src * ldx;
            sc[t] = (row_scale ? row_scale[i0 + t] : 1.0f) * alpha;
        }
        for (size_t j0 = 0; j0 < n; j0 += 2) {
            int nr = n - j0 >= 2 ? 2 : 1;
            const void *bj = (const unsigned char *)b + j0 * ldb * es;
            float sums[4][2];
            if (mr == 2 && nr == 2)
                nt_tile(2, 2, DT, ar, bj, ldb, k, sums);
            else if (mr == 2)
                nt_tile(2, 1, DT, ar, bj, ldb, k, sums);
            else if (nr == 2)
                nt_tile(1, 2, DT, ar, bj, ldb, k, sums);
            else
                nt_tile(1, 1, DT, ar, bj, ldb, k, sums);
            for (int t = 0; t < mr; t++)
                for (int u = 0; u < nr; u++) out[(i0 + t) * ldo + j0 + u] = sc[t] * sums[t][u];
        }
    }
}

void pg_portable_gemm_nt_f32(const float *a, size_t lda, size_t m, const float *b, size_t ldb, size_t n,
                             size_t k, float alpha, float *c, size_t ldc) {
    if (m == 0 || n == 0) return;
    nt_generic(PG_DTYPE_F32, a, lda, NULL, m, b, ldb, n, k, NULL, alpha, c, ldc);
}

void pg_portable_lora_shrink(const float *x, size_t ldx, const int32_t *rows, size_t n, const void *a,
                             int a_dtype, size_t r, size_t d_in, const float *row_scale, float lora_scale,
                             float *h) {
    if (n == 0 || r == 0) return;
    switch (a_dtype) {
    case PG_DTYPE_F32:
        nt_generic(PG_DTYPE_F32, x, ldx, rows, n, a, d_in, r, d_in, row_scale, lora_scale, h, r);
        break;
    case PG_DTYPE_BF16:
        nt_generic(PG_DTYPE_BF16, x, ldx, rows, n, a, d_in, r, d_in, row_scale, lora_scale, h, r);
        break;
    case PG_DTYPE_F16:
        nt_generic(PG_DTYPE_F16, x, ldx, rows, n, a, d_in, r, d_in, row_scale, lora_scale, h, r);
        break;
    default:
        break;
    }
}

/* ---------------------------------------------------------------- expand */

#define PG_EXP_OB 32 /* output columns per pass */

/* MR rows (h row stride r) x cnt (<= PG_EXP_OB) columns starting at column o. */
static inline void expand_tile(const int MR, const int DT, const float *h, size_t r, const void *bt,
                               size_t d_out, size_t o, size_t cnt, float *y, size_t ldy) {
    float acc[4][PG_EXP_OB];
    float bv[PG_EXP_OB];
    for (int i = 0; i < MR; i++)
        for (size_t l = 0; l < PG_EXP_OB; l++) acc[i][l] = 0.0f;
    for (size_t j = 0; j < r; j++) {
        if (DT == PG_DTYPE_F32 && cnt == PG_EXP_OB) {
            memcpy(bv, (const unsigned char *)bt + (j * d_out + o) * sizeof(float), sizeof bv);
        } else {
            for (size_t c0 = 0; c0 < cnt; c0 += PG_L)
                load_chunk(bt, j * d_out + o + c0, DT, cnt - c0 < PG_L ? cnt - c0 : PG_L, bv + c0);
        }
        for (int i = 0; i < MR; i++) {
            float hv = h[(size_t)i * r + j];
            if (cnt == PG_EXP_OB) {
                for (size_t l = 0; l < PG_EXP_OB; l++) acc[i][l] = acc[i][l] + hv * bv[l];
            } else {
                for (size_t l = 0; l < cnt; l++) acc[i][l] = acc[i][l] + hv * bv[l];
            }
        }
    }
    for (int i = 0; i < MR; i++) memcpy(y + (size_t)i * ldy + o, acc[i], cnt * sizeof(float));
}

static inline void expand_generic(const int DT, const float *h, size_t n, size_t r, const void *bt, size_t d_out,
                                  float *y, size_t ldy) {
    for (size_t i0 = 0; i0 < n; i0 += 4) {
        size_t mr = n - i0 >= 4 ? 4 : n - i0;
        const float *hi = h + i0 * r;
        float *yi = y + i0 * ldy;
        for (size_t o = 0; o < d_out; o += PG_EXP_OB) {
            size_t cnt = d_out - o >= PG_EXP_OB ? PG_EXP_OB : d_out - o;
            switch (mr) {
            case 4: expand_tile(4, DT, hi, r, bt, d_out, o, cnt, yi, ldy); break;
            case 3: expand_tile(3, DT, hi, r, bt, d_out, o, cnt, yi, ldy); break;
            case 2: expand_tile(2, DT, hi, r, bt, d_out, o, cnt, yi, ldy); break;
            default: expand_tile(1, DT, hi, r, bt, d_out, o, cnt, yi, ldy); break;
            }
        }
    }
}

void pg_portable_lora_expand(const float *h, size_t n, size_t r, const void *bt, int b_dtype, size_t d_out,
                             float *y, size_t ldy) {
    if (n == 0 || d_out == 0) return;
    switch (b_dtype) {
    case PG_DTYPE_F32: expand_generic(PG_DTYPE_F32, h, n, r, bt, d_out, y, ldy); break;
    case PG_DTYPE_BF16: expand_generic(PG_DTYPE_BF16, h, n, r, bt, d_out, y, ldy); break;
    case PG_DTYPE_F16: expand_generic(PG_DTYPE_F16, h, n, r, bt, d_out, y, ldy); break;
    default: break;
    }
}

/* ---------------------------------------------------------------- add */

void pg_portable_add_f32(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = y[i] + x[i];
}
