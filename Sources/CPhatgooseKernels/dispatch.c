/* Run-time choice of the kernel implementation, and the public entry points. */
#include "pg_internal.h"

#include <stdatomic.h>

#if PG_HAVE_AVX2_IMPL
#include <cpuid.h>

/* AVX2 + FMA + F16C, and the OS saves the YMM state (OSXSAVE and XCR0 bits 1-2). */
static int cpu_has_avx2_fma_f16c(void) {
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
    const unsigned int fma = 1u << 12, osxsave = 1u << 27, avx = 1u << 28, f16c = 1u << 29;
    if ((ecx & (fma | osxsave | avx | f16c)) != (fma | osxsave | avx | f16c)) return 0;
    unsigned int xcr0_lo = 0, xcr0_hi = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    (void)xcr0_hi;
    if ((xcr0_lo & 0x6u) != 0x6u) return 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
    return (ebx >> 5) & 1u; /* AVX2 */
}

/* AVX-512 F, BW and VL, and the OS saves the opmask and ZMM state (XCR0 bits 5-7). Checked after
 * cpu_has_avx2_fma_f16c. */
static int cpu_has_avx512(void) {
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    unsigned int xcr0_lo = 0, xcr0_hi = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    (void)xcr0_hi;
    if ((xcr0_lo & 0xE6u) != 0xE6u) return 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
    const unsigned int f = 1u << 16, bw = 1u << 30, vl = 1u << 31;
    return (ebx & (f | bw | vl)) == (f | bw | vl);
}
#endif

/* -1 until resolved. Resolution is idempotent, so racing first calls are harmless. */
static atomic_int pg_best_isa = -1;
static atomic_int pg_active_isa = -1;

int pg_isa_best(void) {
    int best = atomic_load_explicit(&pg_best_isa, memory_order_relaxed);
    if (best < 0) {
#if PG_HAVE_AVX2_IMPL
        best = !cpu_has_avx2_fma_f16c() ? PG_ISA_PORTABLE : cpu_has_avx512() ? PG_ISA_AVX512 : PG_ISA_AVX2;
#else
        best = PG_ISA_PORTABLE;
#endif
        atomic_store_explicit(&pg_best_isa, best, memory_order_relaxed);
    }
    return best;
}

/* A per-thread override set by pg_isa_set_thread (tests and benchmarks), -1 when none. */
static _Thread_local int pg_thread_isa = -1;

static inline int active(void) {
    if (pg_thread_isa >= 0) return pg_thread_isa;
    int isa = atomic_load_explicit(&pg_active_isa, memory_order_relaxed);
    if (isa < 0) {
        int expected = -1;
        atomic_compare_exchange_strong_explicit(&pg_active_isa, &expected, pg_isa_best(), memory_order_relaxed,
                                                memory_order_relaxed);
        isa = atomic_load_explicit(&pg_active_isa, memory_order_relaxed);
    }
    return isa;
}

int pg_isa_active(void) { return active(); }

/* The ISAs form a chain (portable < AVX2 < AVX-512): a CPU that runs one runs those below it. */
static int supported(int isa) { return isa >= PG_ISA_PORTABLE && isa <= PG_ISA_AVX512 && isa <= pg_isa_best(); }

int pg_isa_set(int isa) {
    if (supported(isa)) {
        atomic_store_explicit(&pg_active_isa, isa, memory_order_relaxed);
        return 0;
    }
    return -1;
}

int pg_isa_set_thread(int isa) {
    if (isa == -1 || supported(isa)) {
        pg_thread_isa = isa;
        return 0;
    }
    return -1;
}

const char *pg_isa_name(int isa) {
    switch (isa) {
    case PG_ISA_PORTABLE: return "portable";
    case PG_ISA_AVX2: return "avx2";
    case PG_ISA_AVX512: return "avx512";
    default: return "unknown";
    }
}

/* PG_DISPATCH: kernels without an AVX-512 version (the AVX-512 ISA runs their AVX2 version);
 * PG_DISPATCH3: the products and LayerNorm, which have one. */
#if PG_HAVE_AVX2_IMPL
#define PG_DISPATCH(call)                                                                                        \
    do {                                                                                                         \
        if (active() >= PG_ISA_AVX2)                                                                             \
            pg_avx2_##call;                                                                                      \
        else                                                                                                     \
            pg_portable_##call;                                                                                  \
    } while (0)
#define PG_DISPATCH3(call)                                                                                       \
    do {                                                                                                         \
        int isa_ = active();                                                                                     \
        if (isa_ == PG_ISA_AVX512)                                                                               \
            pg_avx512_##call;                                                                                    \
        else if (isa_ == PG_ISA_AVX2)                                                                            \
            pg_avx2_##call;                                                                                      \
        else                                                                                                     \
            pg_portable_##call;                                                                                  \
    } while (0)
#define PG_DISPATCH_RETURN(call) return active() >= PG_ISA_AVX2 ? pg_avx2_##call : pg_portable_##call
#else
#define PG_DISPATCH(call) pg_portable_##call
#define PG_DISPATCH3(call) pg_portable_##call
#define PG_DISPATCH_RETURN(call) return pg_portable_##call
#endif

void pg_convert_to_f32(const void *src, int dtype, float *dst, size_t n) {
    PG_DISPATCH(convert_to_f32(src, dtype, dst, n));
}

void pg_convert_from_f32(const float *src, int dtype, void *dst, size_t n) {
    PG_DISPATCH(convert_from_f32(src, dtype, dst, n));
}

size_t pg_count_nonfinite(const void *src, int dtype, size_t n) {
    PG_DISPATCH_RETURN(count_nonfinite(src, dtype, n));
}

void pg_layernorm_rows(const float *x, size_t ldx, size_t rows, size_t d, float eps, float *out, size_t ldo) {
    PG_DISPATCH3(layernorm_rows(x, ldx, rows, d, eps, out, ldo));
}

void pg_gemm_nt_f32(const float *a, size_t lda, size_t m, const float *b, size_t ldb, size_t n, size_t k,
                    float alpha, float *c, size_t ldc) {
    PG_DISPATCH3(gemm_nt_f32(a, lda, m, b, ldb, n, k, alpha, c, ldc));
}

void pg_gemm_packed_f32(const float *a, size_t lda, size_t m, const float *packed, size_t n, size_t k, float alpha,
                        float *c, size_t ldc) {
    if (m == 0 || n == 0) return;
    PG_DISPATCH3(gemm_packed_f32(a, lda, m, packed, n, k, alpha, c, ldc));
}

void pg_lora_shrink(const float *x, size_t ldx, const int32_t *rows, size_t n, const void *a, int a_dtype,
                    size_t r, size_t d_in, const float *row_scale, float lora_scale, float *h) {
    PG_DISPATCH3(lora_shrink(x, ldx, rows, n, a, a_dtype, r, d_in, row_scale, lora_scale, h));
}

void pg_lora_expand(const float *h, size_t n, size_t r, const void *bt, int b_dtype, size_t d_out, float *y,
                    size_t ldy) {
    PG_DISPATCH3(lora_expand(h, n, r, bt, b_dtype, d_out, y, ldy, NULL));
}

void pg_lora_expand_add(const float *h, size_t n, size_t r, const void *bt, int b_dtype, size_t d_out, float *y,
                        size_t ldy, const int32_t *rows) {
    PG_DISPATCH3(lora_expand(h, n, r, bt, b_dtype, d_out, y, ldy, rows));
}

void pg_add_f32(float *y, const float *x, size_t n) { PG_DISPATCH(add_f32(y, x, n)); }

double pg_fma_probe(size_t iterations) {
#if PG_HAVE_AVX2_IMPL
    int isa = active();
    if (isa == PG_ISA_AVX512) return pg_avx512_fma_probe(iterations);
    if (isa == PG_ISA_AVX2) return pg_avx2_fma_probe(iterations);
#endif
    return pg_portable_fma_probe(iterations);
}

void pg_add_rows_f32(float *y, const float *const *x, size_t count, size_t n) {
    PG_DISPATCH(add_rows_f32(y, x, count, n));
}
