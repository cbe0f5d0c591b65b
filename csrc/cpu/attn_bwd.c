/* attn_bwd.c - FlashAttention-2's backward pass on the CPU.
 *
 * Given dO, O and the forward's lse, per (query row i, key j) of a head:
 *   P = exp(s - lse)  (s recomputed exactly as in the forward: scale, softcap, ALiBi, mask)
 *   Delta_i = sum_d dO[i,d] O[i,d]                     (fp32, pass 0, also returned as softmax_d)
 *   dV_j += P_ij Z_ij dO_i,  dP_ij = Z_ij (dO_i . V_j),  dS_ij = P_ij (dP_ij - Delta_i)
 *   (times 1 - tanh^2(s_scaled / softcap) under softcap), dQ_i += scale dS_ij K_j,
 *   dK_j += scale dS_ij Q_i,  where Z = dropout mask / (1 - p) (1 without dropout).
 *
 * Decomposition: two passes without atomics, each output row owned by exactly one work item
 * (the choice of metal-flash-attention; FA2 on CUDA instead adds dQ with atomics, or with per-
 * split buffers in its deterministic mode):
 *   pass 1 (dK, dV): item = (sequence, kv head, block of MF_BWD_BK1 keys). Its K/V block is packed
 *     once; it walks every block of columns (query rows x the query heads of the group, stacked as
 *     in the forward) that the causal/window mask lets see these keys, and accumulates dK, dV in
 *     fp32 registers-to-workspace. Summing the group's heads inside one item is what makes GQA/MQA
 *     gradients a plain sum in a fixed order.
 *   pass 2 (dQ): item = the forward's (sequence, kv head, head chunk, block of query rows); it walks
 *     the visible key tiles in order and accumulates dQ in fp32.
 * Pass 2 recomputes S and dP (7 matrix products instead of FA2's 5), the price of needing no dQ
 * accumulator in memory and no atomics: each output element is produced by one fixed sequence of
 * operations, so results are bitwise identical for any thread count. Extra memory: a workspace of
 * a few tiles per thread; softmax_d is an output (like lse). Never O(L^2), never a full-size fp32
 * gradient copy.
 *
 * Layout: as in the forward, a tile of scores is stored transposed, S^T[key][column], so every
 * per-column quantity (lse, Delta, mask bounds) is a vector across columns. */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu.h"
#include "cpu/kernels.h"
#include "cpu/philox.h"
#include "cpu/pool.h"

#ifndef MF_BWD_BC
#define MF_BWD_BC 48 /* columns per block */
#endif
#ifndef MF_BWD_BK
#define MF_BWD_BK 96 /* keys per tile of the dQ pass */
#endif
#ifndef MF_BWD_BK1
#define MF_BWD_BK1 192 /* keys per item of the dK/dV pass (its Q/dO packing is shared by more keys) */
#endif
#define LOG2E 1.4426950408889634f

typedef struct bjob {
    const mf_problem *pb;
    const mf_cpu_kernels *kern;
    int64_t es;
    int gh, n_hc, rows; /* heads per column block, head chunks per kv head, query rows per block */
    int cp, bk, bk1, dp, dvp; /* columns (padded), keys per tile (dQ pass) and per item (dK/dV pass), D and Dv
                               * padded to MF_CW */
    int post;            /* softcap or ALiBi: scores leave the GEMM in natural units */
    float qscale;        /* folded into Q^T: scale, or scale * log2(e) when !post */
    int64_t *q_start, *n_qb; /* per sequence: first pass-2 item, query row blocks; [batch] = total */
    int64_t *k_start, *n_kb; /* per sequence: first pass-1 item, key blocks */
    size_t ws_floats;
    float *ws;
} bjob;

/* per-thread buffers */
typedef struct bws {
    float *K, *V, *S, *dP, *T, *Z, *QT, *Q, *dO, *dOT, *acc, *accv, *row;
    float *mlog, *delta, *slope;
    int32_t *lo, *hi, *pos;
} bws;

static size_t rup(size_t x) { return (x + 15) / 16 * 16; }

static size_t ws_layout(const bjob *jb, float *base, bws *w) {
    const size_t cp = (size_t)jb->cp, bk = (size_t)(jb->bk1 > jb->bk ? jb->bk1 : jb->bk), dp = (size_t)jb->dp,
                 dvp = (size_t)jb->dvp;
    const size_t big = bk > cp ? bk : cp;
    size_t off = 0;
#define TAKE(field, n)                                                                                         \
    do {                                                                                                       \
        if (base) w->field = (void *)(base + off);                                                             \
        off += rup(n);                                                                                         \
    } while (0)
    TAKE(K, bk * dp);
    TAKE(V, bk * dvp);
    TAKE(S, bk * cp);
    TAKE(dP, bk * cp);
    TAKE(T, bk * cp);
    TAKE(Z, bk * cp);
    TAKE(QT, dp * cp);
    TAKE(Q, cp * dp);
    TAKE(dO, cp * dvp);
    TAKE(dOT, dvp * cp);
    TAKE(acc, big * dp);
    TAKE(accv, bk * dvp);
    TAKE(row, dp > dvp ? dp : dvp);
    TAKE(mlog, cp);
    TAKE(delta, cp);
    TAKE(slope, cp);
    TAKE(lo, cp);
    TAKE(hi, cp);
    TAKE(pos, cp);
#undef TAKE
    return off;
}

/* where rows live */
static const char *q_row(const bjob *jb, int b, int64_t sq0, int64_t i, int h) {
    const mf_params *p = &jb->pb->p;
    return (const char *)jb->pb->q + (b * p->q_stride_b + (sq0 + i) * p->q_stride_s + (int64_t)h * p->q_stride_h) * jb->es;
}
static const char *do_row(const bjob *jb, int b, int64_t sq0, int64_t i, int h) {
    const int64_t *s = jb->pb->grad.do_stride;
    return (const char *)jb->pb->grad.dout + (b * s[0] + (sq0 + i) * s[1] + (int64_t)h * s[2]) * jb->es;
}
static const char *k_row(const bjob *jb, int b, int64_t sk0, int64_t j, int hk, int v) {
    const mf_params *p = &jb->pb->p;
    if (v)
        return (const char *)jb->pb->v + (b * p->v_stride_b + (sk0 + j) * p->v_stride_s + (int64_t)hk * p->v_stride_h) * jb->es;
    return (const char *)jb->pb->k + (b * p->k_stride_b + (sk0 + j) * p->k_stride_s + (int64_t)hk * p->k_stride_h) * jb->es;
}

/* one block of columns: query heads h0 .. h0 + nh - 1, rows i0 .. i0 + m - 1 of sequence b */
typedef struct cblock {
    int b, h0, nh, m, cols;
    int64_t i0, sq0, sq, sk0, sk;
    int64_t kmin, kmax, maxlo, minhi; /* visible keys over the block; tightest mask bounds */
} cblock;

/* Loads a block's columns: Q^T (scaled), and when `full` also Q and dO row-major; always dO^T and
 * the per-column vectors. */
static void load_block(const bjob *jb, cblock *cb, bws *w, int full) {
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    const mf_cpu_kernels *kn = jb->kern;
    const int D = p->head_dim, Dv = p->head_dim_v, cp = jb->cp, dp = jb->dp, dvp = jb->dvp;
    const int64_t off = cb->sk - cb->sq;
    cb->kmin = INT64_MAX;
    cb->kmax = -1;
    cb->maxlo = -1;
    cb->minhi = INT64_MAX;
    if (cb->cols < cp) { /* padding columns: zero inputs, see nothing */
        for (int d = 0; d < D; d++) memset(w->QT + (size_t)d * cp + cb->cols, 0, sizeof(float) * (cp - cb->cols));
        for (int d = 0; d < Dv; d++) memset(w->dOT + (size_t)d * cp + cb->cols, 0, sizeof(float) * (cp - cb->cols));
    }
    for (int c = 0; c < cb->cols; c++) {
        const int h = cb->h0 + c / cb->m;
        const int64_t i = cb->i0 + c % cb->m;
        const char *qr = q_row(jb, cb->b, cb->sq0, i, h), *dr = do_row(jb, cb->b, cb->sq0, i, h);
        kn->load(w->row, qr, D, pb->dtype, jb->qscale);
        for (int d = 0; d < D; d++) w->QT[(size_t)d * cp + c] = w->row[d];
        if (full) kn->load(w->Q + (size_t)c * dp, qr, D, pb->dtype, 1.0f);
        kn->load(w->row, dr, Dv, pb->dtype, 1.0f);
        for (int d = 0; d < Dv; d++) w->dOT[(size_t)d * cp + c] = w->row[d];
        if (full) memcpy(w->dO + (size_t)c * dvp, w->row, sizeof(float) * Dv);
        int64_t l = 0, hi = cb->sk - 1;
        if (p->window_left >= 0 && i + off - p->window_left > l) l = i + off - p->window_left;
        if (p->window_right >= 0 && i + off + p->window_right < hi) hi = i + off + p->window_right;
        if (l > cb->sk) l = cb->sk;
        if (hi < -1) hi = -1;
        w->lo[c] = (int32_t)l;
        w->hi[c] = (int32_t)hi;
        w->pos[c] = (int32_t)(i + off);
        w->slope[c] = (p->flags & MF_FLAG_ALIBI) ? pb->alibi[cb->b * p->alibi_stride_b + h] : 0.0f;
        const int64_t li = (int64_t)cb->b * p->lse_stride_b + (int64_t)h * p->lse_stride_h + cb->sq0 + i;
        w->mlog[c] = pb->lse[li] * LOG2E; /* +inf for a row that sees no key: P = 0 */
        w->delta[c] = pb->grad.delta[(int64_t)cb->b * pb->grad.delta_stride_b +
                                     (int64_t)h * pb->grad.delta_stride_h + cb->sq0 + i];
        if (l <= hi) {
            if (l < cb->kmin) cb->kmin = l;
            if (hi > cb->kmax) cb->kmax = hi;
        }
        if (l > cb->maxlo) cb->maxlo = l;
        if (hi < cb->minhi) cb->minhi = hi;
    }
    for (int c = cb->cols; c < cp; c++) {
        w->lo[c] = INT32_MAX;
        w->hi[c] = -1;
        w->pos[c] = 0;
        w->slope[c] = 0.0f;
        w->mlog[c] = INFINITY;
        w->delta[c] = 0.0f;
    }
}

/* Keys [j0, j0 + n) (K, V packed row-major in Kt, Vt) against a loaded column block: leaves P in
 * w->S (dropped and scaled in w->Z when dropout is on) and dS in w->dP. */
static void tile(const bjob *jb, const cblock *cb, bws *w, const float *Kt, const float *Vt, int64_t j0, int n,
                 int need_z) {
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    const mf_cpu_kernels *kn = jb->kern;
    const int cp = jb->cp, D = p->head_dim, Dv = p->head_dim_v;
    const float softcap = (p->flags & MF_FLAG_SOFTCAP) ? p->softcap : 0.0f;
    kn->gemm(n, cp, D, Kt, jb->dp, 1, w->QT, cp, w->S, cp, 0);
    if (softcap > 0.0f) /* the derivative of softcap * tanh(x / softcap) */
        for (int r = 0; r < n; r++)
            for (int c = 0; c < cp; c++) {
                const float t = tanhf(w->S[(size_t)r * cp + c] / softcap);
                w->T[(size_t)r * cp + c] = 1.0f - t * t;
            }
    if (jb->post)
        kn->post(w->S, n, cp, cp, (int32_t)j0, w->pos, (p->flags & MF_FLAG_ALIBI) ? w->slope : NULL, softcap);
    if (j0 < cb->maxlo || j0 + n - 1 > cb->minhi) kn->mask(w->S, n, cp, cp, (int32_t)j0, w->lo, w->hi);
    kn->bwd_exp(w->S, n, cp, cp, w->mlog);
    if (pb->drop.on && need_z) {
        memcpy(w->Z, w->S, sizeof(float) * (size_t)n * cp);
        mf_dropout_tile(&pb->drop, w->Z, n, cp, cb->cols, j0, cb->b, cb->h0, cb->m, cb->i0, pb->drop.keep_scale);
    }
    kn->gemm(n, cp, Dv, Vt, jb->dvp, 1, w->dOT, cp, w->dP, cp, 0);
    if (pb->drop.on)
        mf_dropout_tile(&pb->drop, w->dP, n, cp, cb->cols, j0, cb->b, cb->h0, cb->m, cb->i0, pb->drop.keep_scale);
    kn->bwd_ds(w->dP, w->S, n, cp, cp, w->delta);
    if (softcap > 0.0f)
        for (size_t e = 0; e < (size_t)n * cp; e++) w->dP[e] *= w->T[e];
}

static void pack_keys(const bjob *jb, bws *w, int b, int64_t sk0, int hk, int64_t j0, int n) {
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    jb->kern->pack(w->K, jb->dp, k_row(jb, b, sk0, j0, hk, 0), p->k_stride_s * jb->es, n, p->head_dim, pb->dtype);
    jb->kern->pack(w->V, jb->dvp, k_row(jb, b, sk0, j0, hk, 1), p->v_stride_s * jb->es, n, p->head_dim_v, pb->dtype);
}

static int find_seq(const int64_t *start, int batch, int64_t item) {
    int lo = 0, hi = batch - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (start[mid] <= item) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* pass 0: Delta = rowsum(dO * O) in fp32, one item per (sequence, query head) */
static void delta_item(void *ctx, int64_t item, int worker) {
    const bjob *jb = (const bjob *)ctx;
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    const int Dv = p->head_dim_v;
    const int b = (int)(item / p->heads_q), h = (int)(item % p->heads_q);
    bws w;
    ws_layout(jb, jb->ws + (size_t)worker * jb->ws_floats, &w);
    int64_t sq0, sq, sk0, sk;
    mf_problem_seq(pb, b, &sq0, &sq, &sk0, &sk);
    float *o = w.accv, *g = w.row;
    for (int64_t i = 0; i < sq; i++) {
        const char *orow = (const char *)pb->o + (b * p->o_stride_b + (sq0 + i) * p->o_stride_s + (int64_t)h * p->o_stride_h) * jb->es;
        jb->kern->load(o, orow, Dv, pb->dtype, 1.0f);
        jb->kern->load(g, do_row(jb, b, sq0, i, h), Dv, pb->dtype, 1.0f);
        float acc[8] = {0};
        int d = 0;
        for (; d + 8 <= Dv; d += 8)
            for (int e = 0; e < 8; e++) acc[e] += o[d + e] * g[d + e];
        for (; d < Dv; d++) acc[d % 8] += o[d] * g[d];
        pb->grad.delta[(int64_t)b * pb->grad.delta_stride_b + (int64_t)h * pb->grad.delta_stride_h + sq0 + i] =
            ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
}

/* pass 1: dK, dV of one block of keys of one kv head */
static void dkdv_item(void *ctx, int64_t item, int worker) {
    const bjob *jb = (const bjob *)ctx;
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    const mf_cpu_kernels *kn = jb->kern;
    const int D = p->head_dim, Dv = p->head_dim_v, dp = jb->dp, dvp = jb->dvp, cp = jb->cp;
    bws w;
    ws_layout(jb, jb->ws + (size_t)worker * jb->ws_floats, &w);
    cblock cb;
    const int b = find_seq(jb->k_start, p->batch, item);
    const int64_t rem = item - jb->k_start[b];
    const int hk = (int)(rem / jb->n_kb[b]);
    const int64_t kb = rem % jb->n_kb[b];
    mf_problem_seq(pb, b, &cb.sq0, &cb.sq, &cb.sk0, &cb.sk);
    cb.b = b;
    const int64_t j0 = kb * jb->bk1;
    const int n = (int)(cb.sk - j0 < jb->bk1 ? cb.sk - j0 : jb->bk1);
    const int64_t j1 = j0 + n - 1, off = cb.sk - cb.sq;
    pack_keys(jb, &w, b, cb.sk0, hk, j0, n);
    memset(w.acc, 0, sizeof(float) * (size_t)n * dp);
    memset(w.accv, 0, sizeof(float) * (size_t)n * dvp);
    /* rows that may see keys [j0, j1] */
    int64_t ilo = 0, ihi = cb.sq - 1;
    if (p->window_right >= 0 && j0 - off - p->window_right > ilo) ilo = j0 - off - p->window_right;
    if (p->window_left >= 0 && j1 - off + p->window_left < ihi) ihi = j1 - off + p->window_left;
    for (int hc = 0; hc < jb->n_hc; hc++) {
        cb.h0 = hk * p->group + hc * jb->gh;
        cb.nh = p->group - hc * jb->gh < jb->gh ? p->group - hc * jb->gh : jb->gh;
        for (int64_t blk = 0; blk < jb->n_qb[b]; blk++) {
            cb.i0 = blk * jb->rows;
            cb.m = (int)(cb.sq - cb.i0 < jb->rows ? cb.sq - cb.i0 : jb->rows);
            if (cb.i0 > ihi || cb.i0 + cb.m - 1 < ilo) continue;
            cb.cols = cb.nh * cb.m;
            load_block(jb, &cb, &w, 1);
            if (cb.kmin > j1 || cb.kmax < j0) continue;
            tile(jb, &cb, &w, w.K, w.V, j0, n, 1);
            /* dV += (P Z)^T dO, dK += dS^T Q (sums over the block's columns: rows and the group's heads) */
            kn->gemm(n, dvp, cb.cols, pb->drop.on ? w.Z : w.S, cp, 1, w.dO, dvp, w.accv, dvp, 1);
            kn->gemm(n, dp, cb.cols, w.dP, cp, 1, w.Q, dp, w.acc, dp, 1);
        }
    }
    for (int r = 0; r < n; r++) {
        const int64_t *ks = pb->grad.dk_stride, *vs = pb->grad.dv_stride;
        char *dk = (char *)pb->grad.dk + (b * ks[0] + (cb.sk0 + j0 + r) * ks[1] + (int64_t)hk * ks[2]) * jb->es;
        char *dv = (char *)pb->grad.dv + (b * vs[0] + (cb.sk0 + j0 + r) * vs[1] + (int64_t)hk * vs[2]) * jb->es;
        kn->store(dk, w.acc + (size_t)r * dp, D, pb->dtype, p->scale);
        kn->store(dv, w.accv + (size_t)r * dvp, Dv, pb->dtype, 1.0f);
    }
}

/* pass 2: dQ of one block of columns */
static void dq_item(void *ctx, int64_t item, int worker) {
    const bjob *jb = (const bjob *)ctx;
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    const mf_cpu_kernels *kn = jb->kern;
    const int D = p->head_dim, dp = jb->dp, cp = jb->cp;
    bws w;
    ws_layout(jb, jb->ws + (size_t)worker * jb->ws_floats, &w);
    cblock cb;
    const int b = find_seq(jb->q_start, p->batch, item);
    const int64_t rem = item - jb->q_start[b];
    const int64_t nblk = jb->n_qb[b];
    const int64_t hc_all = rem / nblk, blk = nblk - 1 - rem % nblk;
    const int hk = (int)(hc_all / jb->n_hc), hc = (int)(hc_all % jb->n_hc);
    mf_problem_seq(pb, b, &cb.sq0, &cb.sq, &cb.sk0, &cb.sk);
    cb.b = b;
    cb.h0 = hk * p->group + hc * jb->gh;
    cb.nh = p->group - hc * jb->gh < jb->gh ? p->group - hc * jb->gh : jb->gh;
    cb.i0 = blk * jb->rows;
    cb.m = (int)(cb.sq - cb.i0 < jb->rows ? cb.sq - cb.i0 : jb->rows);
    cb.cols = cb.nh * cb.m;
    load_block(jb, &cb, &w, 0);
    memset(w.acc, 0, sizeof(float) * (size_t)cp * dp);
    for (int64_t j0 = cb.kmin; j0 <= cb.kmax; j0 += jb->bk) {
        const int n = (int)(cb.kmax - j0 + 1 < jb->bk ? cb.kmax - j0 + 1 : jb->bk);
        pack_keys(jb, &w, b, cb.sk0, hk, j0, n);
        tile(jb, &cb, &w, w.K, w.V, j0, n, 0);
        kn->gemm(cb.cols, dp, n, w.dP, 1, cp, w.K, dp, w.acc, dp, 1); /* dQ += dS K */
    }
    for (int c = 0; c < cb.cols; c++) {
        const int h = cb.h0 + c / cb.m;
        const int64_t i = cb.i0 + c % cb.m;
        const int64_t *qs = pb->grad.dq_stride;
        char *dq = (char *)pb->grad.dq + (b * qs[0] + (cb.sq0 + i) * qs[1] + (int64_t)h * qs[2]) * jb->es;
        kn->store(dq, w.acc + (size_t)c * dp, D, pb->dtype, p->scale);
    }
}

/* varlen rows past the last sequence get zero gradients (and Delta 0) */
static void zero_tails(const mf_problem *pb, const mf_cpu_kernels *kn, int64_t es) {
    const mf_params *p = &pb->p;
    const mf_grad *g = &pb->grad;
    static const float zero[MF_MAX_HEAD_DIM] = {0};
    for (int64_t t = pb->cu_q[p->batch]; t < pb->total_q; t++)
        for (int h = 0; h < p->heads_q; h++) {
            kn->store((char *)g->dq + (t * g->dq_stride[1] + (int64_t)h * g->dq_stride[2]) * es, zero, p->head_dim,
                      pb->dtype, 1.0f);
            g->delta[(int64_t)h * g->delta_stride_h + t] = 0.0f;
        }
    for (int64_t t = pb->cu_k[p->batch]; t < g->total_k; t++)
        for (int h = 0; h < p->heads_k; h++) {
            kn->store((char *)g->dk + (t * g->dk_stride[1] + (int64_t)h * g->dk_stride[2]) * es, zero, p->head_dim,
                      pb->dtype, 1.0f);
            kn->store((char *)g->dv + (t * g->dv_stride[1] + (int64_t)h * g->dv_stride[2]) * es, zero, p->head_dim_v,
                      pb->dtype, 1.0f);
        }
}

int mf_cpu_backward(const mf_problem *pb, int n_threads, mf_error *err) {
    const mf_params *p = &pb->p;
    bjob jb;
    memset(&jb, 0, sizeof jb);
    jb.pb = pb;
    jb.kern = mf_cpu_kernels_get();
    jb.es = (int64_t)mf_dtype_size(pb->dtype);
    if (p->flags & MF_FLAG_VARLEN) zero_tails(pb, jb.kern, jb.es);
    if (p->batch == 0) return MF_OK;
    jb.gh = p->group < MF_BWD_BC ? p->group : MF_BWD_BC;
    jb.n_hc = (p->group + jb.gh - 1) / jb.gh;
    jb.rows = MF_BWD_BC / jb.gh;
    jb.cp = (MF_BWD_BC + MF_CW - 1) / MF_CW * MF_CW;
    jb.bk = MF_BWD_BK;
    jb.bk1 = MF_BWD_BK1;
    jb.dp = (p->head_dim + MF_CW - 1) / MF_CW * MF_CW;
    jb.dvp = (p->head_dim_v + MF_CW - 1) / MF_CW * MF_CW;
    jb.post = (p->flags & (MF_FLAG_SOFTCAP | MF_FLAG_ALIBI)) != 0;
    jb.qscale = jb.post ? p->scale : p->scale_log2;

    int rc = MF_OK;
    int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * 4 * ((size_t)p->batch + 1));
    if (idx == NULL) return mf_fail(err, MF_ERR_MEMORY, "[%s] out of memory", pb->fn);
    jb.q_start = idx;
    jb.n_qb = idx + (p->batch + 1);
    jb.k_start = idx + 2 * (p->batch + 1);
    jb.n_kb = idx + 3 * (p->batch + 1);
    int64_t tq = 0, tk = 0;
    for (int b = 0; b < p->batch; b++) {
        int64_t sq0, sq, sk0, sk;
        mf_problem_seq(pb, b, &sq0, &sq, &sk0, &sk);
        jb.q_start[b] = tq;
        jb.n_qb[b] = (sq + jb.rows - 1) / jb.rows;
        tq += jb.n_qb[b] * p->heads_k * jb.n_hc;
        jb.k_start[b] = tk;
        jb.n_kb[b] = (sk + jb.bk1 - 1) / jb.bk1;
        tk += jb.n_kb[b] * p->heads_k;
    }
    jb.q_start[p->batch] = tq;
    jb.k_start[p->batch] = tk;
    jb.ws_floats = ws_layout(&jb, NULL, NULL);
    const int64_t most = tq > tk ? tq : tk;
    const int nt = n_threads > most ? (int)(most > 0 ? most : 1) : n_threads;
    jb.ws = (float *)aligned_alloc(64, sizeof(float) * jb.ws_floats * (size_t)nt);
    if (jb.ws == NULL) {
        rc = mf_fail(err, MF_ERR_MEMORY, "[%s] out of memory for the CPU workspace", pb->fn);
        goto done;
    }
    memset(jb.ws, 0, sizeof(float) * jb.ws_floats * (size_t)nt); /* padding lanes stay zero */
    mf_pool_run(nt, (int64_t)p->batch * p->heads_q, delta_item, &jb);
    if (tk > 0) mf_pool_run(nt, tk, dkdv_item, &jb);
    if (tq > 0) mf_pool_run(nt, tq, dq_item, &jb);
    free(jb.ws);
done:
    free(idx);
    return rc;
}
