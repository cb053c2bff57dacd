/*
 * phatgoose_kernels.h - numeric kernels for Phatgoose (PHATGOOSE mixture-of-LoRA-experts routing on CPUs).
 *
 * Every kernel exists as a portable C implementation and an x86-64 AVX2+FMA+F16C implementation; the
 * products (gemm_nt, gemm_packed, lora_shrink, lora_expand) and LayerNorm also as an AVX-512 implementation. The implementation
 * ("ISA") is chosen once, at the first call, from the CPU's features; pg_isa_set can force one (tests,
 * benchmarks).
 *
 * Conventions shared by all functions:
 *  - Matrices are row-major; every leading dimension (ld*) is counted in elements, not bytes.
 *  - Pointers need no particular alignment. A pointer may be NULL when the call touches no element
 *    through it (for example, any size argument that makes the output empty is zero).
 *  - Outputs must not overlap inputs, except where a function says otherwise.
 *  - No function allocates, starts threads or keeps state, apart from the ISA choice. All kernels are
 *    safe to call concurrently from several threads on disjoint outputs. Stack use is at most ~20 KiB.
 *  - Speed: F32 rows that start on a 64-byte boundary avoid cache-line-split loads (10-20% faster);
 *    typed weights behind void pointers may sit at any byte address.
 *  - Determinism: for a given ISA every output element is bitwise reproducible. Its value does not
 *    depend on how many rows or columns the call covers, where the row sits in the batch, or how the
 *    caller splits the work into calls. Different ISAs may differ in the last bits (FMA versus
 *    separate multiply and add).
 *  - dtype arguments take a pg_dtype value; any other value makes the call do nothing (a count is 0).
 */
#ifndef PHATGOOSE_KERNELS_H
#define PHATGOOSE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element types of weights and activations. */
typedef enum { PG_DTYPE_F32 = 0, PG_DTYPE_F16 = 1, PG_DTYPE_BF16 = 2 } pg_dtype;

/* Kernel implementations. Each CPU that runs one runs those with lower values. PG_ISA_AVX512 uses
 * AVX-512 for the products and LayerNorm and the AVX2 versions of the other kernels. */
typedef enum { PG_ISA_PORTABLE = 0, PG_ISA_AVX2 = 1, PG_ISA_AVX512 = 2 } pg_isa;

/* The best ISA this CPU and OS support. PG_ISA_AVX2 needs AVX2, FMA, F16C and OS support for the
 * YMM state (XGETBV); PG_ISA_AVX512 needs that and AVX-512 F, BW and VL with OS support for the opmask
 * and ZMM state; on other architectures it is always PG_ISA_PORTABLE. */
int pg_isa_best(void);

/* The ISA the kernels currently use (pg_isa_best() unless pg_isa_set chose another). */
int pg_isa_active(void);

/* Forces an ISA for all later calls, for tests and benchmarks. Returns 0 on success, -1 if the ISA is
 * unknown or this CPU cannot run it (the active ISA is then unchanged). The switch itself is atomic,
 * but do not call it while other threads run kernels: a kernel already running keeps its ISA, so
 * results computed around the switch would mix ISAs. */
int pg_isa_set(int isa);

/* Forces an ISA for kernels called from the calling thread only (-1 removes the override); other threads keep
 * the process-wide choice. Returns 0 on success, -1 if the ISA is unsupported here. For tests and benchmarks that
 * compare ISAs while other threads compute. */
int pg_isa_set_thread(int isa);

/* A static name for an ISA: "portable", "avx2", "avx512", or "unknown". */
const char *pg_isa_name(int isa);

/* dst[i] = src[i] as F32, for n elements of type dtype. Exact for every dtype (F16 subnormals too).
 * BF16 is widened bit for bit (u16 << 16), F32 copied; an F16 NaN becomes a quiet NaN with sign and
 * payload kept (as VCVTPH2PS). */
void pg_convert_to_f32(const void *src, int dtype, float *dst, size_t n);

/* dst[i] = src[i] rounded to dtype, for n elements: round to nearest, ties to even; overflow gives
 * +-inf, inf stays inf, a NaN stays a NaN (quiet; sign and the top payload bits kept), F16 subnormal
 * results are exact. PG_DTYPE_F32 copies. */
void pg_convert_from_f32(const float *src, int dtype, void *dst, size_t n);

/* The CRC-32 of zip archives (reflected polynomial 0xEDB88320) of n bytes, continuing from crc (0 to start):
 * pg_crc32(pg_crc32(0, a, n), b, m) is the CRC of a followed by b. Little-endian hosts only. */
uint32_t pg_crc32(uint32_t crc, const void *data, size_t n);

/* The number of elements among n elements of type dtype that are NaN or +-inf. */
size_t pg_count_nonfinite(const void *src, int dtype, size_t n);

/* LayerNorm without affine, per row: out[i,:] = (x[i,:] - mean) / sqrt(var + eps) for i < rows, over
 * d columns, where var is the biased variance. Mean and variance are accumulated in double (two passes:
 * the mean, then the sum of squared deviations); the scaling is done in double, rounded to F32 once.
 * out may equal x when ldo == ldx (in place). */
void pg_layernorm_rows(const float *x, size_t ldx, size_t rows, size_t d, float eps, float *out, size_t ldo);

/* C[i,j] = alpha * sum_k A[i,k] * B[j,k] for i < m, j < n; A is m x k, B is n x k, C is m x n; C is
 * overwritten. With k == 0, C = alpha * 0. */
void pg_gemm_nt_f32(const float *a, size_t lda, size_t m, const float *b, size_t ldb, size_t n, size_t k,
                    float alpha, float *c, size_t ldc);

/* Column panels for pg_gemm_packed_f32: output columns per panel. */
#define PG_PANEL_WIDTH 16

/* Floats that pg_pack_panels writes for an n x k matrix: ceil(n / 16) * 16 * k. */
size_t pg_pack_panel_floats(size_t n, size_t k);

/* Packs B (n x k, row-major, leading dimension ldb) into column panels: panel p holds rows 16p..16p+15 of B, and
 * for each kk < k their 16 values B[16p + c][kk] are contiguous at (p * k + kk) * 16 + c, zero past row n.
 * packed holds pg_pack_panel_floats(n, k) floats and must start on a 64-byte boundary. Plain C, no ISA. */
void pg_pack_panels(const float *b, size_t ldb, size_t n, size_t k, float *packed);

/* C[i,j] = alpha * sum_k A[i,k] * B[j,k] for i < m, j < n, with B packed by pg_pack_panels (n, k as packed;
 * 64-byte aligned). Panels are independent: to compute columns 16p .. 16p + n' - 1 alone, pass
 * packed + p * 16 * k, n' and c + 16p. Every output is, per k-block of 128 from k = 0, one chain acc = acc + a*b in
 * order from +0 (fused under AVX2 and AVX-512, which agree bit for bit; separately rounded in portable C); the block
 * sums are added in block order from +0, then multiplied by alpha. */
void pg_gemm_packed_f32(const float *a, size_t lda, size_t m, const float *packed, size_t n, size_t k, float alpha,
                        float *c, size_t ldc);

/* LoRA shrink with gather and per-row scale, for i < n and j < r:
 *   h[i*r + j] = (row_scale ? row_scale[i] : 1) * lora_scale * sum_k x[rows[i]*ldx + k] * A[j*d_in + k]
 * The factor is rounded as (row_scale[i] * lora_scale) before it multiplies the sum. rows may be NULL
 * (row i of x is used); its entries must be >= 0. A is r x d_in, contiguous, in a_dtype. h is n x r,
 * contiguous, overwritten. */
void pg_lora_shrink(const float *x, size_t ldx, const int32_t *rows, size_t n, const void *a, int a_dtype,
                    size_t r, size_t d_in, const float *row_scale, float lora_scale, float *h);

/* LoRA expand: y[i*ldy + o] = sum_{j<r} h[i*r + j] * Bt[j*d_out + o] for i < n, o < d_out, accumulated
 * over j = 0..r-1 in order; y is overwritten (r == 0 gives zeros). Bt is B transposed, r x d_out,
 * contiguous, in b_dtype. */
void pg_lora_expand(const float *h, size_t n, size_t r, const void *bt, int b_dtype, size_t d_out, float *y,
                    size_t ldy);

/* LoRA expand added into scattered rows: y[rows[i]*ldy + o] = y[rows[i]*ldy + o] + e[i, o], where e[i, o] is the
 * value pg_lora_expand gives (the same bits); one rounding for the add. rows must hold n distinct entries >= 0
 * (each row of y is read and written once). Used to expand straight into a caller's output where no other
 * thread adds into the same rows. */
void pg_lora_expand_add(const float *h, size_t n, size_t r, const void *bt, int b_dtype, size_t d_out, float *y,
                        size_t ldy, const int32_t *rows);

/* y[i] += x[i] for i < n. x may equal y; no other overlap. */
void pg_add_f32(float *y, const float *x, size_t n);

/* y[i] = (((y[i] + x[0][i]) + x[1][i]) + ...) + x[count-1][i] for i < n: the same bits as count calls of pg_add_f32
 * in row order, reading and writing y once. The rows must not overlap y. */
void pg_add_rows_f32(float *y, const float *const *x, size_t count, size_t n);

/* Machine probe, not a kernel: runs `iterations` rounds of independent FMA chains that need no memory (24 chains of
 * 16 lanes under AVX-512, 12 of 8 under AVX2, 8 scalar multiply-adds in portable C) and returns the floating-point
 * operations done (2 per lane per FMA). Timed on every core at once, it gives the core's FMA issue peak, the upper
 * bound of any F32 kernel's rate. */
double pg_fma_probe(size_t iterations);

#ifdef __cplusplus
}
#endif

#endif /* PHATGOOSE_KERNELS_H */
