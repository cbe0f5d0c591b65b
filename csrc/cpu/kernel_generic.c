/* kernel_generic.c - the CPU building blocks for the baseline instruction set (SSE2 on x86-64,
 * NEON on arm64), plus the run-time choice between paths. */
#include <stdlib.h>
#include <string.h>

#define MF_KTABLE mf_cpu_kernels_generic
#include "cpu/kernel_impl.inc"

#ifdef MF_HAVE_AVX2_TU
#include <cpuid.h>
/* F16C from CPUID leaf 1 (ECX bit 29): not every compiler's __builtin_cpu_supports knows it */
static int cpu_has_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
}
#endif

const mf_cpu_kernels *mf_cpu_kernels_get(void) {
    static const mf_cpu_kernels *chosen;
    if (chosen != NULL) return chosen;
    const mf_cpu_kernels *k = &mf_cpu_kernels_generic;
#ifdef MF_HAVE_AVX2_TU
    /* MTLFLASH_CPU_ISA=generic or avx2 caps the path; best (or unset) does not; plan.c refuses others */
    const char *isa = getenv("MTLFLASH_CPU_ISA");
    const int cap_generic = isa != NULL && strcmp(isa, "generic") == 0;
    const int cap_avx2 = isa != NULL && strcmp(isa, "avx2") == 0;
    __builtin_cpu_init(); /* libgcc/compiler-rt also check that the OS saves the wider registers */
    if (!cap_generic && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c()) {
        k = &mf_cpu_kernels_avx2;
#ifdef MF_HAVE_AVX512_TU
        if (!cap_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
            k = &mf_cpu_kernels_avx512;
#else
        (void)cap_avx2;
#endif
    }
#endif
    chosen = k;
    return k;
}
