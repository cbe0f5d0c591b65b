/* profile.c - where the CPU backend's time goes, for benchmarks/bench_cpu.py (which compiles it at
 * run time against csrc/cpu/kernel_*.c). One thread; the kernels are the ones the library runs
 * (mf_cpu_kernels_get() picks the same SIMD path), called the way csrc/cpu/attn.c calls them.
 *
 *   profile prefill <D>   one prefill tile, fp32: S^T = K Q^T (96 keys x 48 columns x D), the
 *                         online-softmax step, O += P V; data in cache. Prints
 *                         "<qk_us> <softmax_us> <pv_us> <flops>" per tile.
 *   profile decode <Sk>   decode for one kv head: D=128, bf16 K and V read in place, 4 query rows
 *                         (4 query heads per kv head), tiles of 96 keys. Prints
 *                         "<qk_ns> <softmax_ns> <pv_ns> <total_ns>" per key, where total is the
 *                         time of the whole loop (Sk=960 keeps K and V in cache; a large Sk makes
 *                         them stream from memory).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu/kernels.h"

#define BN 96 /* keys per tile (MF_BN in attn.c) */
#define BC 48 /* columns per prefill item (MF_BC) */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void *alloc(size_t bytes) {
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (p == NULL) {
        fprintf(stderr, "profile: out of memory\n");
        exit(1);
    }
    return p;
}

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return (float)((*s >> 8) & 0xffff) / 65536.0f - 0.5f;
}

static int prefill(int D) {
    const mf_cpu_kernels *kn = mf_cpu_kernels_get();
    float *K = alloc(sizeof(float) * BN * D), *QT = alloc(sizeof(float) * D * BC);
    float *V = alloc(sizeof(float) * BN * D), *S = alloc(sizeof(float) * BN * BC);
    float *O = alloc(sizeof(float) * BC * D);
    float mx[BC], sum[BC], alpha[BC];
    unsigned seed = 1;
    for (int i = 0; i < BN * D; i++) K[i] = frand(&seed), V[i] = frand(&seed);
    for (int i = 0; i < D * BC; i++) QT[i] = frand(&seed);
    for (int c = 0; c < BC; c++) mx[c] = -INFINITY, sum[c] = 0.0f;
    memset(O, 0, sizeof(float) * BC * D);
    double tq = 1e9, ts = 1e9, tv = 1e9;
    const int reps = 200;
    for (int round = 0; round < 7; round++) {
        double t0 = now();
        for (int r = 0; r < reps; r++) kn->gemm(BN, BC, D, K, D, 1, QT, BC, S, BC, 0);
        double t1 = now();
        for (int r = 0; r < reps; r++) {
            kn->softmax(S, BN, BC, BC, mx, sum, alpha);
            for (int c = 0; c < BC; c++) /* the rescale of O that follows every softmax step */
                if (alpha[c] != 1.0f) kn->scale(O + (size_t)c * D, D, alpha[c]);
        }
        double t2 = now();
        for (int r = 0; r < reps; r++) kn->gemm(BC, D, BN, S, 1, BC, V, D, O, D, 1);
        double t3 = now();
        tq = fmin(tq, (t1 - t0) / reps), ts = fmin(ts, (t2 - t1) / reps), tv = fmin(tv, (t3 - t2) / reps);
        kn->gemm(BN, BC, D, K, D, 1, QT, BC, S, BC, 0); /* fresh scores for the next round */
    }
    printf("%.4f %.4f %.4f %.0f\n", tq * 1e6, ts * 1e6, tv * 1e6, 2.0 * 2.0 * BN * BC * D);
    return (int)O[1] & 0; /* keep O alive */
}

static int decode(int Sk) {
    const mf_cpu_kernels *kn = mf_cpu_kernels_get();
    const int D = 128, cols = 4, cp = MF_CW;
    const size_t row = (size_t)D * 2;
    uint16_t *K = alloc(row * Sk), *V = alloc(row * Sk);
    float *Q = alloc(sizeof(float) * cp * D), *S = alloc(sizeof(float) * BN * cp), *O = alloc(sizeof(float) * cp * D);
    float mx[MF_CW], sum[MF_CW], alpha[MF_CW];
    const void *krows[BN], *vrows[BN]; /* the tile's rows, as attn.c hands them to the kernels */
    unsigned seed = 2;
    for (size_t i = 0; i < (size_t)D * Sk; i++) { /* bf16 of small random values */
        float a = frand(&seed), b = frand(&seed);
        uint32_t ua, ub;
        memcpy(&ua, &a, 4);
        memcpy(&ub, &b, 4);
        K[i] = (uint16_t)(ua >> 16), V[i] = (uint16_t)(ub >> 16);
    }
    memset(Q, 0, sizeof(float) * cp * D);
    for (int i = 0; i < cols * D; i++) Q[i] = frand(&seed);
    const int passes = Sk >= 65536 ? 3 : 3 + 2000000 / Sk;
    double best_total = 1e9, best_q = 1e9, best_s = 1e9, best_v = 1e9;
    for (int round = 0; round < 3; round++) {
        double tq = 0, ts = 0, tv = 0, t_start = now();
        for (int pass = 0; pass < passes; pass++) {
            for (int c = 0; c < cp; c++) mx[c] = -INFINITY, sum[c] = 0.0f;
            memset(O, 0, sizeof(float) * cp * D);
            for (int j0 = 0; j0 < Sk; j0 += BN) {
                const int n = Sk - j0 < BN ? Sk - j0 : BN;
                double t0 = now();
                for (int r = 0; r < n; r++) {
                    krows[r] = (const char *)K + (size_t)(j0 + r) * row;
                    vrows[r] = V + (size_t)(j0 + r) * D;
                }
                kn->dot_qk(S, cp, krows, n, D, MF_BF16, Q, cols);
                double t1 = now();
                kn->softmax(S, n, cp, cp, mx, sum, alpha);
                for (int c = 0; c < cols; c++)
                    if (alpha[c] != 1.0f) kn->scale(O + (size_t)c * D, D, alpha[c]);
                double t2 = now();
                kn->gemm_rows(cols, D, n, S, 1, cp, vrows, MF_BF16, O, D);
                tv += now() - t2, ts += t2 - t1, tq += t1 - t0;
            }
        }
        const double keys = (double)Sk * passes, total = now() - t_start;
        best_total = fmin(best_total, total / keys), best_q = fmin(best_q, tq / keys);
        best_s = fmin(best_s, ts / keys), best_v = fmin(best_v, tv / keys);
    }
    printf("%.2f %.2f %.2f %.2f\n", best_q * 1e9, best_s * 1e9, best_v * 1e9, best_total * 1e9);
    return (int)O[1] & 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "prefill") == 0) return prefill(atoi(argv[2]));
    if (argc == 3 && strcmp(argv[1], "decode") == 0) return decode(atoi(argv[2]));
    fprintf(stderr, "usage: profile prefill <D> | profile decode <Sk>\n");
    return 2;
}
