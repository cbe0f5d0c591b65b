/* kernels.h - the SIMD building blocks of the CPU backend, one table per instruction-set path.
 *
 * kernel_impl.inc holds the only implementation; kernel_generic.c compiles it for the baseline
 * ISA, kernel_avx2.c with AVX2+FMA+F16C and kernel_avx512.c with AVX-512 on top (its GEMM in
 * zmm registers). mf_cpu_kernels_get() picks one at run time.
 *
 * Layout used by attn.c: a tile of scores is stored transposed, S^T[key][column], where a column
 * is one query row of one head; every per-column quantity (max, sum, mask bounds) is a vector
 * across columns, so the softmax needs no horizontal reductions. Column counts are padded to a
 * multiple of MF_CW. */
#ifndef MF_KERNELS_H
#define MF_KERNELS_H

#include <stdint.h>

#include "mf_common.h"

#define MF_KERNEL_MAX_D 576 /* largest head dim (MF_MAX_HEAD_DIM) */
#define MF_CW 8 /* column granularity: every n passed to gemm and every column count is a multiple */

typedef struct mf_cpu_kernels {
    const char *name;
    /* C[m x n] = (accumulate ? C : 0) + A[m x k] B[k x n]; A(r, p) = a[r*rsa + p*csa];
     * B and C row-major with leading dims in floats; n % MF_CW == 0. Each element of C is
     * accumulated over p in increasing order, whatever m and n are. */
    void (*gemm)(int m, int n, int k, const float *a, int64_t rsa, int64_t csa, const float *b,
                 int64_t ldb, float *c, int64_t ldc, int accumulate);
    /* C[m x n] += A B, as gemm, with B read in place: row p at brows[p] (rows anywhere in memory,
     * e.g. the blocks of a paged cache), stored as fp32, bf16 or fp16 (n % 16 == 0) */
    void (*gemm_rows)(int m, int n, int k, const float *a, int64_t rsa, int64_t csa, const void *const *brows,
                      mf_dtype dt, float *c, int64_t ldc);
    /* dst[i] = (float)src[i] * scale */
    void (*load)(float *dst, const void *src, int n, mf_dtype dt, float scale);
    /* dst[r*ldd + i] = (float)src[r*stride + i] for r < rows, i < n (stride in bytes) */
    void (*pack)(float *dst, int64_t ldd, const void *src, int64_t stride, int rows, int n, mf_dtype dt);
    /* Few-column S^T = K Q^T for decode: s[r*ld + c] = sum_d K[r][d] q[c*D + d] for r < n,
     * c < cols (<= MF_CW), 0 for cols <= c < MF_CW; q holds MF_CW rows of D floats, rows past
     * cols zero; K row r read (and converted) in place at krows[r], each once for all columns;
     * every dot product vectorised along d and reduced in a fixed order */
    void (*dot_qk)(float *s, int ld, const void *const *krows, int n, int D, mf_dtype dt, const float *q,
                   int cols);
    /* dst[i] = (dt)(src[i] * scale), rounded to nearest even */
    void (*store)(void *dst, const float *src, int n, mf_dtype dt, float scale);
    /* s[r*ld + c] = -inf unless lo[c] <= j0 + r <= hi[c]; r < n, c < cp (cp % MF_CW == 0) */
    void (*mask)(float *s, int n, int ld, int cp, int32_t j0, const int32_t *lo, const int32_t *hi);
    /* scores in natural units -> log2 units: x = softcap*tanh(x/softcap) if softcap > 0,
     * x -= slope[c]*|pos[c] - (j0 + r)| if slope != NULL, then x *= log2(e) */
    void (*post)(float *s, int n, int ld, int cp, int32_t j0, const int32_t *pos, const float *slope,
                 float softcap);
    /* One online-softmax step over a tile S^T[n x cp] in log2 units, per column c:
     * m' = max(mx[c], max_r s[r][c]); s[r][c] = exp2(s[r][c] - m') (0 where m' = -inf);
     * alpha[c] = exp2(mx[c] - m') where the max grew, else exactly 1;
     * sum[c] = sum[c]*alpha[c] + sum_r s[r][c] (rows added in order); mx[c] = m'. */
    void (*softmax)(float *s, int n, int ld, int cp, float *mx, float *sum, float *alpha);
    /* x[i] *= a */
    void (*scale)(float *x, int n, float a);
    /* backward: s[r*ld + c] = exp2(s[r*ld + c] - m[c]) for r < n, c < cp (0 where the difference
     * is -inf or below -126, so m[c] = +inf gives a zero column) */
    void (*bwd_exp)(float *s, int n, int ld, int cp, const float *m);
    /* backward: ds[r*ld + c] = p[r*ld + c] * (ds[r*ld + c] - delta[c]) */
    void (*bwd_ds)(float *ds, const float *p, int n, int ld, int cp, const float *delta);
} mf_cpu_kernels;

extern const mf_cpu_kernels mf_cpu_kernels_generic;
#ifdef MF_HAVE_AVX2_TU
extern const mf_cpu_kernels mf_cpu_kernels_avx2;
#endif
#ifdef MF_HAVE_AVX512_TU
extern const mf_cpu_kernels mf_cpu_kernels_avx512;
#endif

/* The best table for this CPU (MTLFLASH_CPU_ISA=generic or avx2 caps the choice). */
const mf_cpu_kernels *mf_cpu_kernels_get(void);

#endif /* MF_KERNELS_H */
