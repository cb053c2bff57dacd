/* Internal declarations shared by the CPhatgooseKernels sources (not part of the public header). */
#ifndef PG_INTERNAL_H
#define PG_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "phatgoose_kernels.h"

#if defined(__GNUC__) || defined(__clang__)
#define PG_HIDDEN __attribute__((visibility("hidden")))
#else
#define PG_HIDDEN
#endif

#if defined(__x86_64__)
#define PG_HAVE_AVX2_IMPL 1
#else
#define PG_HAVE_AVX2_IMPL 0
#endif

/* Correctly rounded IEEE square root without a libm dependency (the package links no libm explicitly):
 * SQRTSD on x86-64 (SSE2 is baseline), FSQRT on AArch64, sqrt() elsewhere. */
#if defined(__x86_64__)
#include <emmintrin.h>
static inline double pg_sqrt(double x) { return _mm_cvtsd_f64(_mm_sqrt_sd(_mm_setzero_pd(), _mm_set_sd(x))); }
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
static inline double pg_sqrt(double x) {
    double r;
    __asm__("fsqrt %d0, %d1" : "=w"(r) : "w"(x));
    return r;
}
#else
#include <math.h>
static inline double pg_sqrt(double x) { return sqrt(x); }
#endif

/* ---- Scalar conversions (bit manipulation only; shared by both implementations) ---- */

static inline uint32_t pg_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float pg_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* BF16 -> F32 is exact. */
static inline float pg_bf16_to_f32(uint16_t h) { return pg_bits_f32((uint32_t)h << 16); }

/* F16 -> F32, exact; subnormals normalized; NaN made quiet, sign and payload kept (as VCVTPH2PS). */
static inline float pg_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu;
    uint32_t m = h & 0x3FFu;
    if (e == 0x1Fu) return pg_bits_f32(sign | 0x7F800000u | (m ? (0x00400000u | (m << 13)) : 0u));
    if (e != 0) return pg_bits_f32(sign | ((e + 112u) << 23) | (m << 13));
    if (m == 0) return pg_bits_f32(sign);
    /* subnormal: m * 2^-24; shift the leading 1 up to bit 10 */
    uint32_t exp = 113;
    while ((m & 0x400u) == 0) {
        m <<= 1;
        exp--;
    }
    return pg_bits_f32(sign | (exp << 23) | ((m & 0x3FFu) << 13));
}

/* F32 -> BF16, round to nearest even; NaN made quiet (sign, top payload bits kept). */
static inline uint16_t pg_f32_to_bf16(float f) {
    uint32_t u = pg_f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* F32 -> F16, round to nearest even; overflow -> inf; exact subnormals; NaN made quiet with sign and
 * the top payload bits kept (as VCVTPS2PH). */
static inline uint16_t pg_f32_to_f16(float f) {
    uint32_t u = pg_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
    if (a >= 0x47800000u) return (uint16_t)(sign | 0x7C00u); /* >= 65536: inf (also inf itself) */
    if (a >= 0x38800000u) {                                   /* normal F16 range (rounding may carry to inf) */
        uint32_t t = a - 0x38000000u;                          /* rebias exponent 127 -> 15 */
        t += 0x0FFFu + ((t >> 13) & 1u);
        return (uint16_t)(sign | (t >> 13));
    }
    if (a < 0x33000000u) return sign; /* <= 2^-25 rounds to zero (2^-25 itself is a tie to even 0) */
    /* subnormal result: value = mant * 2^(e-150), unit 2^-24 -> q = mant >> (126 - e), RNE */
    uint32_t e = a >> 23;
    uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t s = 126u - e; /* 14..24 */
    uint32_t q = mant >> s;
    uint32_t rem = mant & ((1u << s) - 1u);
    uint32_t half = 1u << (s - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
}

/* Data behind void pointers may have any alignment, so it is addressed in bytes and read with unaligned loads or
 * memcpy only. */
#define PG_AT(base, idx, size) ((const unsigned char *)(base) + (idx) * (size))

/* ---- Implementations (same contracts as the public functions) ---- */

#define PG_DECLARE_IMPL(prefix)                                                                               \
    PG_HIDDEN void prefix##_convert_to_f32(const void *src, int dtype, float *dst, size_t n);                 \
    PG_HIDDEN void prefix##_convert_from_f32(const float *src, int dtype, void *dst, size_t n);               \
    PG_HIDDEN size_t prefix##_count_nonfinite(const void *src, int dtype, size_t n);                          \
    PG_HIDDEN void prefix##_layernorm_rows(const float *x, size_t ldx, size_t rows, size_t d, float eps,      \
                                           float *out, size_t ldo);                                           \
    PG_HIDDEN void prefix##_gemm_nt_f32(const float *a, size_t lda, size_t m, const float *b, size_t ldb,     \
                                        size_t n, size_t k, float alpha, float *c, size_t ldc);               \
    PG_HIDDEN void prefix##_lora_shrink(const float *x, size_t ldx, const int32_t *rows, size_t n,            \
                                        const void *a, int a_dtype, size_t r, size_t d_in,                    \
                                        const float *row_scale, float lora_scale, float *h);                  \
    PG_HIDDEN void prefix##_lora_expand(const float *h, size_t n, size_t r, const void *bt, int b_dtype,      \
                                        size_t d_out, float *y, size_t ldy, const int32_t *scatter);          \
    PG_HIDDEN void prefix##_add_f32(float *y, const float *x, size_t n);                                      \
    PG_HIDDEN void prefix##_add_rows_f32(float *y, const float *const *x, size_t count, size_t n);             \
    PG_HIDDEN double prefix##_fma_probe(size_t iterations);                                                    \
    PG_HIDDEN void prefix##_gemm_packed_f32(const float *a, size_t lda, size_t m, const float *packed,        \
                                            size_t n, size_t k, float alpha, float *c, size_t ldc);

PG_DECLARE_IMPL(pg_portable)
#if PG_HAVE_AVX2_IMPL
PG_DECLARE_IMPL(pg_avx2)
/* The AVX-512 ISA has its own products and LayerNorm; the other kernels are the AVX2 ones. */
PG_HIDDEN void pg_avx512_gemm_nt_f32(const float *a, size_t lda, size_t m, const float *b, size_t ldb, size_t n,
                                     size_t k, float alpha, float *c, size_t ldc);
PG_HIDDEN void pg_avx512_lora_shrink(const float *x, size_t ldx, const int32_t *rows, size_t n, const void *a,
                                     int a_dtype, size_t r, size_t d_in, const float *row_scale, float lora_scale,
                                     float *h);
PG_HIDDEN void pg_avx512_gemm_packed_f32(const float *a, size_t lda, size_t m, const float *packed, size_t n,
                                         size_t k, float alpha, float *c, size_t ldc);
PG_HIDDEN double pg_avx512_fma_probe(size_t iterations);
PG_HIDDEN void pg_avx512_layernorm_rows(const float *x, size_t ldx, size_t rows, size_t d, float eps, float *out,
                                        size_t ldo);
PG_HIDDEN void pg_avx512_lora_expand(const float *h, size_t n, size_t r, const void *bt, int b_dtype, size_t d_out,
                                     float *y, size_t ldy, const int32_t *scatter);
#endif

#endif /* PG_INTERNAL_H */
