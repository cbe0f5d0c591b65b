/* kernel_avx2.c - the CPU building blocks compiled with -mavx2 -mfma -mf16c (x86-64 only; used
 * only when the CPU reports those features). */
#if defined(__x86_64__) || defined(_M_X64) /* universal2: empty in the arm64 slice */
#define MF_KERNEL_AVX2 1
#define MF_KTABLE mf_cpu_kernels_avx2
#include "cpu/kernel_impl.inc"
#endif
