/* kernels.h - the SIMD building blocks of the CPU backend, one table per instruction-set path.
 *
 * kernel_impl.inc holds the only implementation; kernel_generic.c compiles it for the baseline
 * ISA and kernel_avx2.c with AVX2+FMA+F16C. mf_cpu_kernels_get() picks one at run time. */
#ifndef MF_KERNELS_H
#define MF_KERNELS_H

#include <stdint.h>

#include "mf_common.h"

#define MF_NR 16 /* micro-kernel columns: every n passed to gemm is a multiple of this */

typedef struct mf_cpu_kernels {
    const char *name;
    /* C[m x n] = (accumulate ? C : 0) + A[m x k] * B[k x n]; row-major, leading dims in floats */
    void (*gemm)(int m, int n, int k, const float *a, int64_t lda, const float *b, int64_t ldb,
                 float *c, int64_t ldc, int accumulate);
    /* dst[i] = (float)src[i] * scale */
    void (*load)(float *dst, const void *src, int n, mf_dtype dt, float scale);
    /* dst[i] = (dt)(src[i] * scale), rounded to nearest even */
    void (*store)(void *dst, const float *src, int n, mf_dtype dt, float scale);
    /* max of x[0..n) (n % MF_NR == 0); a NaN element may make it NaN */
    float (*row_max)(const float *x, int n);
    /* x[i] = exp2(x[i] - m) for i < n (exp2(-inf) = 0); returns the sum (n % MF_NR == 0) */
    float (*exp2_sum)(float *x, int n, float m);
    /* x[i] *= a */
    void (*scale)(float *x, int n, float a);
} mf_cpu_kernels;

extern const mf_cpu_kernels mf_cpu_kernels_generic;
#ifdef MF_HAVE_AVX2_TU
extern const mf_cpu_kernels mf_cpu_kernels_avx2;
#endif

/* The best table for this CPU (MTLFLASH_CPU_ISA=generic forces the baseline one). */
const mf_cpu_kernels *mf_cpu_kernels_get(void);

#endif /* MF_KERNELS_H */
