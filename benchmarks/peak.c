/* peak.c - the machine's ceilings, for benchmarks/bench_cpu.py (compiled by it at run time).
 *
 *   peak fma <threads> <seconds>    fp32 FMA throughput: 12 independent FMA chains of PEAK_W
 *                                   lanes per thread (PEAK_W 8: AVX2+FMA, 4-wide SSE/NEON code
 *                                   from the same source elsewhere; PEAK_W 16 with -mavx512f:
 *                                   zmm registers); prints GFLOP/s (2 FLOP per lane per FMA)
 *   peak read <threads> <MiB>       streaming read bandwidth over a buffer much larger than the
 *                                   caches; prints GB/s (best of 5 passes)
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef PEAK_W
#define PEAK_W 8
#endif
typedef float v8 __attribute__((vector_size(32)));
typedef float vw __attribute__((vector_size(4 * PEAK_W))); /* the FMA loop's vectors */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

typedef struct arg {
    double seconds, flops;
    const float *buf;
    size_t n;
    float sink;
} arg;

static void *fma_loop(void *p) {
    arg *a = (arg *)p;
    vw acc[12], x, y;
    for (int l = 0; l < PEAK_W; l++) x[l] = 1.0f;
    y = x * 0.999999f;
    for (int i = 0; i < 12; i++) acc[i] = x * (float)i;
    const int inner = 1 << 16;
    long rounds = 0;
    double t0 = now();
    do {
        for (int r = 0; r < inner; r++) {
#pragma GCC unroll 12
            for (int i = 0; i < 12; i++) acc[i] = acc[i] * y + x;
        }
        rounds++;
    } while (now() - t0 < a->seconds);
    double t = now() - t0;
    vw s = acc[0];
    for (int i = 1; i < 12; i++) s += acc[i];
    a->sink = s[0];
    a->flops = (double)rounds * inner * 12 * PEAK_W * 2 / t;
    return NULL;
}

static void *read_loop(void *p) {
    arg *a = (arg *)p;
    const v8 *v = (const v8 *)a->buf;
    v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    for (size_t i = 0; i + 4 <= a->n / 8; i += 4) {
        s0 += v[i];
        s1 += v[i + 1];
        s2 += v[i + 2];
        s3 += v[i + 3];
    }
    v8 s = (s0 + s1) + (s2 + s3);
    a->sink = s[0];
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: peak fma <threads> <seconds> | peak read <threads> <MiB>\n");
        return 2;
    }
    int nt = atoi(argv[2]);
    if (nt < 1 || nt > 256) nt = 1;
    pthread_t th[256];
    arg args[256];
    if (strcmp(argv[1], "fma") == 0) {
        for (int t = 0; t < nt; t++) {
            memset(&args[t], 0, sizeof args[t]);
            args[t].seconds = atof(argv[3]);
            pthread_create(&th[t], NULL, fma_loop, &args[t]);
        }
        double total = 0;
        for (int t = 0; t < nt; t++) {
            pthread_join(th[t], NULL);
            total += args[t].flops;
        }
        printf("%.2f\n", total / 1e9);
        return 0;
    }
    size_t bytes = (size_t)atol(argv[3]) << 20;
    float *buf = (float *)aligned_alloc(64, bytes);
    if (buf == NULL) return 1;
    memset(buf, 0, bytes);
    size_t per = bytes / sizeof(float) / (size_t)nt / 32 * 32;
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now();
        for (int t = 0; t < nt; t++) {
            memset(&args[t], 0, sizeof args[t]);
            args[t].buf = buf + (size_t)t * per;
            args[t].n = per;
            pthread_create(&th[t], NULL, read_loop, &args[t]);
        }
        for (int t = 0; t < nt; t++) pthread_join(th[t], NULL);
        double gbs = (double)per * nt * sizeof(float) / (now() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    printf("%.2f\n", best);
    free(buf);
    return 0;
}
