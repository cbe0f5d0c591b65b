/* kernel_avx512.c - the CPU building blocks compiled with AVX-512 (F, VL) on top of AVX2+FMA+F16C
 * (x86-64 only; used only when the CPU and the OS support them). The GEMM runs in zmm registers;
 * the rest is the AVX2 code, which gains the 32 vector registers. */
#if defined(__x86_64__) || defined(_M_X64) /* universal2: empty in the arm64 slice */
#define MF_KERNEL_AVX2 1
#define MF_KERNEL_AVX512 1
#define MF_KTABLE mf_cpu_kernels_avx512
#include "cpu/kernel_impl.inc"
#endif
