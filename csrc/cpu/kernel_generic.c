/* kernel_generic.c - the CPU building blocks for the baseline instruction set (SSE2 on x86-64,
 * NEON on arm64), plus the run-time choice between paths. */
#include <stdlib.h>
#include <string.h>

#define MF_KTABLE mf_cpu_kernels_generic
#include "cpu/kernel_impl.inc"

const mf_cpu_kernels *mf_cpu_kernels_get(void) {
    static const mf_cpu_kernels *chosen;
    if (chosen != NULL) return chosen;
    const mf_cpu_kernels *k = &mf_cpu_kernels_generic;
#ifdef MF_HAVE_AVX2_TU
    const char *isa = getenv("MTLFLASH_CPU_ISA");
    int forced_generic = isa != NULL && strcmp(isa, "generic") == 0;
    __builtin_cpu_init();
    if (!forced_generic && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        k = &mf_cpu_kernels_avx2;
#endif
    chosen = k;
    return k;
}
