/* cpu_numerics.c - the CPU backend's numerics, checked without Python.
 *
 * Builds problems through the backend's own API (mf_problem_build + mf_cpu_forward, the calls
 * module.c makes), runs them, and compares out and lse with an attention computed here in
 * double precision from the same (rounded) inputs. Written for the arm64 check in CI
 * (.ci/arm64_check.sh: cross-compiled with aarch64-linux-gnu-gcc and run under qemu-aarch64),
 * so that the code a Mac's CPU runs for CPU tensors and NumPy arrays (the baseline NEON path) is
 * exercised on every change; it builds and runs natively as well.
 *
 * Grid: causal (Sq < Sk, Sq > Sk: rows that see no key), windows, softcap, ALiBi (H) and (B, H),
 * GQA/MQA, varlen with an empty sequence and rows past the last offset, Dv != D, odd head dims,
 * a transposed q, split-KV decode, fp32/fp16/bf16, with and without lse, on 1 and 3 threads
 * (which must agree bitwise).
 *
 * Acceptance, per element: |out - ref| <= u * |ref| + tol, where u is the unit roundoff of the
 * output dtype (0 for fp32) and tol = 2e-5 * max(1, max|ref|) (fp32 accumulation); lse (fp32):
 * |lse - ref| <= 2e-5 * max(1, |ref|), and exactly +inf (with a zero output row) where a row sees
 * no key. Exit status 0 when every case passes.
 *
 *   cc -O2 -std=gnu11 -Icsrc -I. tests/native/cpu_numerics.c csrc/common.c csrc/problem.c \
 *      csrc/cpu/pool.c csrc/cpu/attn.c csrc/cpu/kernel_generic.c -lm -lpthread -o cpu_numerics
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu.h"
#include "problem.h"

/* ---- fp16 / bf16 conversions (round to nearest even), independent of the backend's ---- */

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint16_t to_bf16(float f) {
    uint32_t u = bits_of(f);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static float from_bf16(uint16_t h) { return float_of((uint32_t)h << 16); }
static float from_half(uint16_t h) {
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(m | 0x400), e - 25);
    return (h & 0x8000) ? -v : v;
}
static uint16_t to_half(float f) { /* inputs and outputs here are finite and small */
    uint16_t sign = (f < 0 || (f == 0 && signbit(f))) ? 0x8000 : 0;
    double a = fabs((double)f);
    if (a == 0) return sign;
    int e;
    frexp(a, &e); /* a = m * 2^e, m in [0.5, 1) */
    int q = e - 11 < -24 ? -24 : e - 11; /* quantum: 11 significant bits, subnormals at 2^-24 */
    double n = nearbyint(ldexp(a, -q));   /* round half to even (default rounding mode) */
    double r = ldexp(n, q);
    if (r >= 65520.0) return sign | 0x7c00;
    if (r < ldexp(1.0, -14)) return sign | (uint16_t)ldexp(r, 24);
    frexp(r, &e);
    int exp = e - 1;                      /* r = 1.f * 2^exp */
    uint16_t mant = (uint16_t)(ldexp(r, 10 - exp) - 1024.0);
    return sign | (uint16_t)((exp + 15) << 10) | mant;
}

/* ---- random inputs ---- */

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static double urand(void) { /* [0, 1) */
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (double)(g_rng >> 11) / 9007199254740992.0;
}
static float nrand(void) { /* sum of uniforms: roughly normal, unit variance */
    double s = 0;
    for (int i = 0; i < 4; i++) s += urand();
    return (float)((s - 2.0) * 1.7320508);
}

/* A buffer of n values in `dt`, and the same values widened to double. */
typedef struct buf {
    void *data;
    double *ref;
    int64_t n;
} buf;

static size_t elem_size(mf_dtype dt) { return dt == MF_F32 ? 4 : 2; }

static buf make_buf(mf_dtype dt, int64_t n, float scale) {
    buf b = {calloc((size_t)(n > 0 ? n : 1), elem_size(dt)), calloc((size_t)(n > 0 ? n : 1), sizeof(double)), n};
    for (int64_t i = 0; i < n; i++) {
        float x = nrand() * scale;
        if (dt == MF_F32) {
            ((float *)b.data)[i] = x;
            b.ref[i] = x;
        } else if (dt == MF_F16) {
            uint16_t h = to_half(x);
            ((uint16_t *)b.data)[i] = h;
            b.ref[i] = from_half(h);
        } else {
            uint16_t h = to_bf16(x);
            ((uint16_t *)b.data)[i] = h;
            b.ref[i] = from_bf16(h);
        }
    }
    return b;
}

static double read_out(mf_dtype dt, const void *p, int64_t i) {
    if (dt == MF_F32) return ((const float *)p)[i];
    if (dt == MF_F16) return from_half(((const uint16_t *)p)[i]);
    return from_bf16(((const uint16_t *)p)[i]);
}

static mf_tensor view(mf_dtype dt, void *data, int ndim, const int64_t *shape, const int64_t *stride) {
    mf_tensor t;
    memset(&t, 0, sizeof t);
    t.present = 1;
    t.is_numpy = 1;
    t.dtype = dt;
    t.device = MF_DEV_CPU;
    t.ndim = ndim;
    for (int i = 0; i < ndim; i++) {
        t.shape[i] = shape[i];
        t.stride[i] = stride[i];
    }
    t.data = data;
    snprintf(t.dtype_repr, sizeof t.dtype_repr, "%s", mf_dtype_name(dt));
    return t;
}

static void contiguous_strides(int ndim, const int64_t *shape, int64_t *stride) {
    int64_t s = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        stride[i] = s;
        s *= shape[i];
    }
}

/* ---- the cases ---- */

typedef struct tcase {
    const char *name;
    int B, Sq, Sk, Hq, Hk, D, Dv;
    int causal, wl, wr;   /* wl/wr < 0: unbounded */
    float softcap;
    int alibi;            /* 0 none, 1 (H,), 2 (B, H) */
    int varlen;           /* sequences of lengths from a table below */
    int transposed_q;     /* q stored as (B, H, S, D) and viewed as (B, S, H, D) */
    int lse;
} tcase;

static const tcase k_cases[] = {
    /* name               B  Sq   Sk  Hq Hk  D   Dv  c   wl  wr  cap  ali vl tq lse */
    {"plain",             2, 33,  33, 2, 2, 32,  32, 0, -1, -1, 0,    0, 0, 0, 1},
    {"causal Sq<Sk",      1, 20,  75, 4, 2, 64,  64, 1, -1, -1, 0,    0, 0, 0, 1},
    {"causal Sq>Sk",      1, 70,  30, 2, 1, 40,  40, 1, -1, -1, 0,    0, 0, 0, 1},
    {"window (8,4)",      1, 60,  60, 2, 1, 48,  48, 0,  8,  4, 0,    0, 0, 0, 1},
    {"window (0,0) Sq>Sk",1, 50,  20, 2, 2, 16,  16, 0,  0,  0, 0,    0, 0, 0, 1},
    {"causal+window",     1, 97,  97, 2, 2, 32,  32, 1, 16, -1, 0,    0, 0, 0, 0},
    {"softcap",           1, 40,  50, 2, 2, 64,  64, 1, -1, -1, 5.0f, 0, 0, 0, 1},
    {"alibi (H)",         1, 30,  45, 4, 4, 32,  32, 0, -1, -1, 0,    1, 0, 0, 1},
    {"alibi (B,H) causal",2, 25,  40, 4, 2, 32,  32, 1, -1, -1, 0,    2, 0, 0, 1},
    {"mqa Dv!=D",         1, 17, 100, 8, 1, 96,  64, 0, -1, -1, 0,    0, 0, 0, 1},
    {"odd D",             1, 19,  19, 3, 1, 59,  59, 1, -1, -1, 0,    0, 0, 0, 1},
    {"D=256 Dv=8",        1,  9,  30, 2, 2, 256,  8, 0, -1, -1, 0,    0, 0, 0, 1},
    {"transposed q",      2, 21,  21, 4, 2, 32,  32, 1, -1, -1, 0,    0, 0, 1, 1},
    {"decode split-KV",   1,  1, 2100, 4, 1, 64, 64, 1, -1, -1, 0,    0, 0, 0, 1},
    {"varlen causal",     3,  0,   0, 4, 2, 32,  32, 1, -1, -1, 0,    0, 1, 0, 1},
    {"varlen window+alibi+softcap", 3, 0, 0, 2, 2, 40, 24, 0, 6, 2, 8.0f, 2, 1, 0, 1},
};

/* varlen: lengths per sequence (one empty), and q gets 3 rows past the last offset */
static const int k_vl_q[3] = {13, 0, 31};
static const int k_vl_k[3] = {20, 7, 25};
#define VL_EXTRA_ROWS 3

/* fp64 attention for one (sequence, head) row; writes Dv values and returns lse (+inf: no key). */
static double ref_row(const tcase *c, const double *q, const double *k, const double *v,
                      int64_t q_off, int64_t k_base, int64_t k_row_stride, int64_t v_base,
                      int64_t v_row_stride, int Sk_b, int i, int Sq_b, double scale, double slope,
                      double *out) {
    const int64_t shift = (int64_t)Sk_b - Sq_b;
    double *s = malloc(sizeof(double) * (size_t)(Sk_b > 0 ? Sk_b : 1));
    double mx = -INFINITY;
    int64_t wl = c->wl, wr = c->causal ? 0 : c->wr;
    for (int j = 0; j < Sk_b; j++) {
        int visible = 1;
        if (wr >= 0 && j > i + shift + wr) visible = 0;
        if (wl >= 0 && j < i + shift - wl) visible = 0;
        if (!visible) {
            s[j] = -INFINITY;
            continue;
        }
        double dot = 0;
        for (int d = 0; d < c->D; d++) dot += q[q_off + d] * k[k_base + (int64_t)j * k_row_stride + d];
        double x = dot * scale;
        if (c->softcap > 0) x = c->softcap * tanh(x / c->softcap);
        x -= slope * fabs((double)(i + shift - j));
        s[j] = x;
        if (x > mx) mx = x;
    }
    for (int d = 0; d < c->Dv; d++) out[d] = 0;
    if (mx == -INFINITY) {
        free(s);
        return INFINITY;
    }
    double sum = 0;
    for (int j = 0; j < Sk_b; j++) {
        if (s[j] == -INFINITY) continue;
        double p = exp(s[j] - mx);
        sum += p;
        for (int d = 0; d < c->Dv; d++) out[d] += p * v[v_base + (int64_t)j * v_row_stride + d];
    }
    for (int d = 0; d < c->Dv; d++) out[d] /= sum;
    free(s);
    return mx + log(sum);
}

static double unit_roundoff(mf_dtype dt) { return dt == MF_F32 ? 0.0 : dt == MF_F16 ? ldexp(1.0, -11) : ldexp(1.0, -8); }

/* Runs one case in one dtype; returns the number of failures (0 or 1) and prints a line. */
static int run_case(const tcase *c, mf_dtype dt) {
    const int B = c->B, Hq = c->Hq, Hk = c->Hk, D = c->D, Dv = c->Dv;
    int32_t cu_q[4] = {0}, cu_k[4] = {0};
    int64_t rows_q, rows_k;
    int max_q = 0, max_k = 0;
    if (c->varlen) {
        for (int b = 0; b < B; b++) {
            cu_q[b + 1] = cu_q[b] + k_vl_q[b];
            cu_k[b + 1] = cu_k[b] + k_vl_k[b];
            if (k_vl_q[b] > max_q) max_q = k_vl_q[b];
            if (k_vl_k[b] > max_k) max_k = k_vl_k[b];
        }
        rows_q = cu_q[B] + VL_EXTRA_ROWS;
        rows_k = cu_k[B];
    } else {
        rows_q = (int64_t)B * c->Sq;
        rows_k = (int64_t)B * c->Sk;
    }
    buf q = make_buf(dt, rows_q * Hq * D, 1.0f);
    buf k = make_buf(dt, rows_k * Hk * D, 1.0f);
    buf v = make_buf(dt, rows_k * Hk * Dv, 1.0f);
    float slopes[2 * 8];
    for (int i = 0; i < 2 * 8; i++) slopes[i] = 0.05f + 0.1f * (float)urand();

    mf_tensor tq, tk, tv, to, tl, tcq, tck, tal, none;
    memset(&none, 0, sizeof none);
    int64_t shq[4], stq[4], shk[4], stk[4], shv[4], stv[4], sho[4], sto[4], shl[3], stl[3];
    int nd = c->varlen ? 3 : 4;
    if (c->varlen) {
        int64_t a[3] = {rows_q, Hq, D}, b2[3] = {rows_k, Hk, D}, c3[3] = {rows_k, Hk, Dv};
        memcpy(shq, a, sizeof a);
        memcpy(shk, b2, sizeof b2);
        memcpy(shv, c3, sizeof c3);
    } else {
        int64_t a[4] = {B, c->Sq, Hq, D}, b2[4] = {B, c->Sk, Hk, D}, c3[4] = {B, c->Sk, Hk, Dv};
        memcpy(shq, a, sizeof a);
        memcpy(shk, b2, sizeof b2);
        memcpy(shv, c3, sizeof c3);
    }
    contiguous_strides(nd, shq, stq);
    if (c->transposed_q) { /* memory (B, H, S, D) */
        stq[0] = (int64_t)Hq * c->Sq * D;
        stq[2] = (int64_t)c->Sq * D;
        stq[1] = D;
        stq[3] = 1;
    }
    contiguous_strides(nd, shk, stk);
    contiguous_strides(nd, shv, stv);
    tq = view(dt, q.data, nd, shq, stq);
    tk = view(dt, k.data, nd, shk, stk);
    tv = view(dt, v.data, nd, shv, stv);
    int64_t cus[1] = {B + 1}, cust[1] = {1};
    tcq = c->varlen ? view(MF_I32, cu_q, 1, cus, cust) : none;
    tck = c->varlen ? view(MF_I32, cu_k, 1, cus, cust) : none;
    int64_t sha[2], sta[2];
    if (c->alibi == 1) {
        sha[0] = Hq;
        sta[0] = 1;
        tal = view(MF_F32, slopes, 1, sha, sta);
    } else if (c->alibi == 2) {
        sha[0] = B;
        sha[1] = Hq;
        contiguous_strides(2, sha, sta);
        tal = view(MF_F32, slopes, 2, sha, sta);
    } else {
        tal = none;
    }
    mf_options opt;
    memset(&opt, 0, sizeof opt);
    opt.fn = "cpu_numerics";
    opt.varlen = c->varlen;
    opt.causal = c->causal;
    opt.window_left = c->wl;
    opt.window_right = c->wr;
    opt.softcap = c->softcap;
    opt.max_seqlen_q = max_q;
    opt.max_seqlen_k = max_k;
    opt.want_lse = c->lse;

    mf_problem pb;
    mf_error err = {MF_OK, ""};
    mf_inputs in; /* every tensor of the call; absent ones stay zeroed (present == 0) */
    memset(&in, 0, sizeof in);
    in.q = tq, in.k = tk, in.v = tv, in.cu_q = tcq, in.cu_k = tck, in.alibi = tal;
    if (mf_problem_build(&pb, &in, &opt, &err)) {
        printf("FAIL %-30s %-8s: validation: %s\n", c->name, mf_dtype_name(dt), err.msg);
        return 1;
    }
    int on = mf_problem_out_shape(&pb, sho), ln = mf_problem_lse_shape(&pb, shl);
    contiguous_strides(on, sho, sto);
    contiguous_strides(ln, shl, stl);
    int64_t n_out = 1, n_lse = 1;
    for (int i = 0; i < on; i++) n_out *= sho[i];
    for (int i = 0; i < ln; i++) n_lse *= shl[i];
    void *outs[2];
    float *lses[2];
    const int threads[2] = {1, 3};
    for (int r = 0; r < 2; r++) {
        outs[r] = malloc((size_t)n_out * elem_size(dt) + 1);
        lses[r] = malloc((size_t)n_lse * sizeof(float) + 1);
        memset(outs[r], 0x7f, (size_t)n_out * elem_size(dt)); /* garbage the backend must overwrite */
        for (int64_t i = 0; i < n_lse; i++) lses[r][i] = -12345.0f;
        to = view(dt, outs[r], on, sho, sto);
        tl = view(MF_F32, lses[r], ln, shl, stl);
        in.out = to;
        in.lse = c->lse ? tl : none;
        if (mf_problem_build(&pb, &in, &opt, &err) ||
            mf_cpu_forward(&pb, threads[r], &err)) {
            printf("FAIL %-30s %-8s: %s\n", c->name, mf_dtype_name(dt), err.msg);
            return 1;
        }
    }
    int fails = 0;
    if (memcmp(outs[0], outs[1], (size_t)n_out * elem_size(dt)) != 0 ||
        (c->lse && memcmp(lses[0], lses[1], (size_t)n_lse * sizeof(float)) != 0)) {
        printf("FAIL %-30s %-8s: 1 and 3 threads differ\n", c->name, mf_dtype_name(dt));
        fails = 1;
    }

    /* the fp64 reference, row by row */
    const double scale = 1.0 / sqrt((double)D);
    const double u = unit_roundoff(dt);
    double max_ref = 0, worst = 0, worst_lse = 0;
    double *ref = malloc(sizeof(double) * (size_t)n_out);
    double *ref_lse = malloc(sizeof(double) * (size_t)n_lse);
    for (int64_t i = 0; i < n_lse; i++) ref_lse[i] = INFINITY;
    for (int64_t i = 0; i < n_out; i++) ref[i] = 0; /* rows past the last offset: zero */
    double row[256];
    for (int b = 0; b < B; b++) {
        int Sq_b = c->varlen ? k_vl_q[b] : c->Sq, Sk_b = c->varlen ? k_vl_k[b] : c->Sk;
        int64_t q0 = c->varlen ? cu_q[b] : (int64_t)b * c->Sq, k0 = c->varlen ? cu_k[b] : (int64_t)b * c->Sk;
        for (int h = 0; h < Hq; h++) {
            int hk = h / (Hq / Hk);
            double slope = c->alibi == 0 ? 0.0 : slopes[(c->alibi == 2 ? b * Hq : 0) + h];
            for (int i = 0; i < Sq_b; i++) {
                int64_t qi = c->varlen ? (q0 + i) * stq[0] + h * stq[1]
                                       : b * stq[0] + i * stq[1] + h * stq[2];
                double l = ref_row(c, q.ref, k.ref, v.ref, qi, (k0 * Hk + hk) * D, (int64_t)Hk * D,
                                   (k0 * Hk + hk) * Dv, (int64_t)Hk * Dv, Sk_b, i, Sq_b, scale, slope, row);
                int64_t oi = ((q0 + i) * Hq + h) * Dv;
                for (int d = 0; d < Dv; d++) {
                    ref[oi + d] = row[d];
                    if (fabs(row[d]) > max_ref) max_ref = fabs(row[d]);
                }
                int64_t li = c->varlen ? (int64_t)h * rows_q + q0 + i : ((int64_t)b * Hq + h) * c->Sq + i;
                ref_lse[li] = l;
            }
        }
    }
    const double tol = 2e-5 * (max_ref > 1 ? max_ref : 1);
    for (int64_t i = 0; i < n_out && !fails; i++) {
        double got = read_out(dt, outs[0], i), e = fabs(got - ref[i]);
        if (!(e <= u * fabs(ref[i]) + tol)) {
            printf("FAIL %-30s %-8s: out[%lld] = %.8g, reference %.8g (error %.3g > bound %.3g)\n", c->name,
                   mf_dtype_name(dt), (long long)i, got, ref[i], e, u * fabs(ref[i]) + tol);
            fails = 1;
        }
        if (e > worst) worst = e;
    }
    int empty_rows = 0;
    for (int64_t i = 0; c->lse && i < n_lse && !fails; i++) {
        double got = lses[0][i];
        if (isinf(ref_lse[i])) {
            empty_rows++;
            if (!(isinf(got) && got > 0)) {
                printf("FAIL %-30s %-8s: lse[%lld] = %g for a row that sees no key (want +inf)\n", c->name,
                       mf_dtype_name(dt), (long long)i, got);
                fails = 1;
            }
            continue;
        }
        double e = fabs(got - ref_lse[i]);
        if (!(e <= 2e-5 * (fabs(ref_lse[i]) > 1 ? fabs(ref_lse[i]) : 1))) {
            printf("FAIL %-30s %-8s: lse[%lld] = %.8g, reference %.8g\n", c->name, mf_dtype_name(dt),
                   (long long)i, got, ref_lse[i]);
            fails = 1;
        }
        if (e > worst_lse) worst_lse = e;
    }
    if (!fails) {
        printf("ok   %-30s %-8s max|out-ref| %.2e (bound %.1e + %.1e*|ref|)", c->name, mf_dtype_name(dt),
               worst, tol, u);
        if (c->lse) printf(", max|lse-ref| %.2e, rows without keys %d", worst_lse, empty_rows);
        printf("\n");
    }
    free(ref);
    free(ref_lse);
    for (int r = 0; r < 2; r++) {
        free(outs[r]);
        free(lses[r]);
    }
    free(q.data);
    free(q.ref);
    free(k.data);
    free(k.ref);
    free(v.data);
    free(v.ref);
    return fails;
}

int main(void) {
    const mf_dtype dts[3] = {MF_F32, MF_F16, MF_BF16};
    int n = 0, fails = 0;
    printf("mtlflash CPU backend numerics: SIMD path '%s', %d cases x 3 dtypes\n", mf_cpu_simd_path(),
           (int)(sizeof k_cases / sizeof k_cases[0]));
    for (size_t i = 0; i < sizeof k_cases / sizeof k_cases[0]; i++)
        for (int d = 0; d < 3; d++) {
            fails += run_case(&k_cases[i], dts[d]);
            n++;
        }
    printf("%s: %d of %d cases passed\n", fails ? "FAIL" : "PASS", n - fails, n);
    return fails ? 1 : 0;
}
