/* attn.c - FlashAttention-2's forward pass on the CPU.
 *
 * Work item = (sequence b, query head h, block of BM query rows). For each item:
 *   pack Q once (fp32, scale folded in; scale*log2(e) when no softcap/ALiBi so exp2 applies
 *   directly), then for each tile of BN keys that the causal/window mask leaves visible:
 *     S = Q K^T (micro-kernel on K packed transposed), softcap / ALiBi / mask on S,
 *     online softmax (row max, rescale O only when the max grows, P = exp2(S - max), row sum),
 *     O += P V (same micro-kernel on V packed row-major).
 *   out = O / sum, lse = max*ln2 + ln(sum); a row that sees no key gets 0 and +inf.
 * Extra memory is one workspace per thread (a few tiles). Every output row is computed by one
 * thread in a fixed order, so results do not depend on the number of threads. */
#include "cpu/cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/kernels.h"
#include "cpu/pool.h"

#define MF_BM 48 /* query rows per item (a multiple of the micro-kernel's 6) */
#define MF_BN 64 /* keys per tile (a multiple of MF_NR) */

#define LN2 0.69314718055994531f
#define LOG2E 1.4426950408889634f

typedef struct job {
    const mf_problem *pb;
    const mf_cpu_kernels *kern;
    int64_t *item_start; /* per sequence: first item index; [batch] = total items */
    int64_t *n_blocks;   /* per sequence: query blocks */
    size_t esize;        /* element size of q/k/v/out */
    int bnp;             /* keys per tile, padded */
    int dvp;             /* Dv padded to MF_NR */
    size_t ws_floats;    /* per-worker workspace */
    float *ws;
} job;

static size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

static int find_seq(const job *jb, int64_t item) {
    int lo = 0, hi = jb->pb->p.batch - 1; /* last b with item_start[b] <= item */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (jb->item_start[mid] <= item) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

static void run_item(void *ctx, int64_t item, int worker) {
    const job *jb = (const job *)ctx;
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    const mf_cpu_kernels *kn = jb->kern;
    const size_t es = jb->esize;
    const int D = p->head_dim, Dv = p->head_dim_v, bnp = jb->bnp, dvp = jb->dvp;

    const int b = find_seq(jb, item);
    int64_t rem = item - jb->item_start[b];
    const int64_t nblk = jb->n_blocks[b];
    const int h = (int)(rem / nblk);
    const int64_t blk = nblk - 1 - rem % nblk; /* longest (causal) blocks first */
    int64_t start_q, sq, start_k, sk;
    mf_problem_seq(pb, b, &start_q, &sq, &start_k, &sk);
    const int64_t i0 = blk * MF_BM;
    const int m = (int)(sq - i0 < MF_BM ? sq - i0 : MF_BM);
    const int64_t off = sk - sq;
    const int hk = h / p->group;

    /* workspace */
    float *Q = jb->ws + (size_t)worker * jb->ws_floats;
    float *Kt = Q + round_up((size_t)MF_BM * D, 16);
    float *V = Kt + round_up((size_t)D * bnp, 16);
    float *S = V + (size_t)bnp * dvp;
    float *O = S + (size_t)MF_BM * bnp;
    float *mx = O + (size_t)MF_BM * dvp;
    float *sum = mx + MF_BM;
    float *row = sum + MF_BM;
    int64_t lo[MF_BM], hi[MF_BM];

    const int post = (p->flags & (MF_FLAG_SOFTCAP | MF_FLAG_ALIBI)) != 0;
    const float qscale = post ? p->scale : p->scale_log2;
    const char *qb = (const char *)pb->q + (b * p->q_stride_b + (start_q + i0) * p->q_stride_s +
                                            (int64_t)h * p->q_stride_h) * (int64_t)es;
    for (int r = 0; r < m; r++) kn->load(Q + (size_t)r * D, qb + r * p->q_stride_s * (int64_t)es, D, pb->dtype, qscale);

    for (int r = 0; r < m; r++) {
        int64_t i = i0 + r, l = 0, u = sk - 1;
        if (p->window_left >= 0 && i + off - p->window_left > l) l = i + off - p->window_left;
        if (p->window_right >= 0 && i + off + p->window_right < u) u = i + off + p->window_right;
        lo[r] = l;
        hi[r] = u;
        mx[r] = -INFINITY;
        sum[r] = 0.0f;
    }
    memset(O, 0, sizeof(float) * (size_t)m * dvp);
    memset(V, 0, sizeof(float) * (size_t)bnp * dvp);
    /* Both bounds grow with the row, so the block's visible keys are [lo[0], hi[m-1]]. */
    const int64_t kmin = lo[0], kmax = hi[m - 1];
    const float slope = (p->flags & MF_FLAG_ALIBI) ? pb->alibi[b * p->alibi_stride_b + h] : 0.0f;
    const char *kbase = (const char *)pb->k + (b * p->k_stride_b + start_k * p->k_stride_s +
                                               (int64_t)hk * p->k_stride_h) * (int64_t)es;
    const char *vbase = (const char *)pb->v + (b * p->v_stride_b + start_k * p->v_stride_s +
                                               (int64_t)hk * p->v_stride_h) * (int64_t)es;

    for (int64_t j0 = kmin; j0 <= kmax; j0 += bnp) {
        const int n = (int)(kmax - j0 + 1 < bnp ? kmax - j0 + 1 : bnp);
        /* K^T tile; columns past n are zero so S stays finite before masking */
        for (int c = 0; c < n; c++) {
            kn->load(row, kbase + (j0 + c) * p->k_stride_s * (int64_t)es, D, pb->dtype, 1.0f);
            for (int d = 0; d < D; d++) Kt[(size_t)d * bnp + c] = row[d];
        }
        if (n < bnp)
            for (int d = 0; d < D; d++) memset(Kt + (size_t)d * bnp + n, 0, sizeof(float) * (bnp - n));
        kn->gemm(m, bnp, D, Q, D, Kt, bnp, S, bnp, 0);

        for (int r = 0; r < m; r++) {
            float *s = S + (size_t)r * bnp;
            if (post) {
                const int64_t i = i0 + r;
                for (int c = 0; c < n; c++) {
                    float x = s[c];
                    if (p->flags & MF_FLAG_SOFTCAP) x = p->softcap * tanhf(x / p->softcap);
                    if (p->flags & MF_FLAG_ALIBI) x -= slope * (float)llabs(i + off - (j0 + c));
                    s[c] = x * LOG2E;
                }
            }
            /* mask: visible columns are [lo - j0, hi - j0] within [0, n) */
            int64_t a = lo[r] - j0, e = hi[r] - j0 + 1;
            if (a < 0) a = 0;
            if (e > n) e = n;
            if (e <= a) a = e = 0;
            for (int64_t c = 0; c < a; c++) s[c] = -INFINITY;
            for (int64_t c = e; c < bnp; c++) s[c] = -INFINITY;

            float m_new = kn->row_max(s, bnp);
            if (m_new > mx[r] || m_new != m_new) { /* the max grew (or is NaN): rescale */
                float alpha = exp2f(mx[r] - m_new);    /* 0 when nothing was visible before */
                sum[r] *= alpha;
                kn->scale(O + (size_t)r * dvp, dvp, alpha);
                mx[r] = m_new;
            }
            if (mx[r] == -INFINITY) { /* nothing visible in this row yet */
                memset(s, 0, sizeof(float) * bnp);
                continue;
            }
            sum[r] += kn->exp2_sum(s, bnp, mx[r]);
        }
        /* V tile; rows past n stay zero (P is zero there, and 0 * garbage could be NaN) */
        for (int c = 0; c < n; c++)
            kn->load(V + (size_t)c * dvp, vbase + (j0 + c) * p->v_stride_s * (int64_t)es, Dv, pb->dtype, 1.0f);
        if (n < bnp) memset(V + (size_t)n * dvp, 0, sizeof(float) * (size_t)(bnp - n) * dvp);
        kn->gemm(m, dvp, bnp, S, bnp, V, dvp, O, dvp, 1);
    }

    char *ob = (char *)pb->o + (b * p->o_stride_b + (start_q + i0) * p->o_stride_s +
                                (int64_t)h * p->o_stride_h) * (int64_t)es;
    float *lse = pb->lse ? pb->lse + b * p->lse_stride_b + (int64_t)h * p->lse_stride_h + start_q + i0 : NULL;
    for (int r = 0; r < m; r++) {
        char *orow = ob + r * p->o_stride_s * (int64_t)es;
        if (sum[r] == 0.0f) { /* the row sees no key */
            memset(O + (size_t)r * dvp, 0, sizeof(float) * Dv);
            kn->store(orow, O + (size_t)r * dvp, Dv, pb->dtype, 1.0f);
            if (lse) lse[r] = INFINITY;
            continue;
        }
        kn->store(orow, O + (size_t)r * dvp, Dv, pb->dtype, 1.0f / sum[r]);
        if (lse) lse[r] = mx[r] * LN2 + logf(sum[r]);
    }
}

/* varlen rows past cu_seqlens_q[batch] belong to no sequence: zero output, lse +inf */
static void fill_tail(const mf_problem *pb, const mf_cpu_kernels *kn, size_t es) {
    const mf_params *p = &pb->p;
    int64_t first = pb->cu_q[p->batch];
    if (first >= pb->total_q) return;
    float zero[MF_MAX_HEAD_DIM] = {0};
    for (int64_t t = first; t < pb->total_q; t++)
        for (int h = 0; h < p->heads_q; h++) {
            kn->store((char *)pb->o + (t * p->o_stride_s + (int64_t)h * p->o_stride_h) * (int64_t)es, zero,
                      p->head_dim_v, pb->dtype, 1.0f);
            if (pb->lse) pb->lse[(int64_t)h * p->lse_stride_h + t] = INFINITY;
        }
}

int mf_cpu_forward(const mf_problem *pb, int n_threads, mf_error *err) {
    const mf_params *p = &pb->p;
    job jb;
    memset(&jb, 0, sizeof jb);
    jb.pb = pb;
    jb.kern = mf_cpu_kernels_get();
    jb.esize = mf_dtype_size(pb->dtype);
    if (p->flags & MF_FLAG_VARLEN) fill_tail(pb, jb.kern, jb.esize);
    if (p->batch == 0) return MF_OK;

    jb.item_start = (int64_t *)malloc(sizeof(int64_t) * 2 * ((size_t)p->batch + 1));
    if (jb.item_start == NULL) return mf_fail(err, MF_ERR_MEMORY, "[%s] out of memory", pb->fn);
    jb.n_blocks = jb.item_start + p->batch + 1;
    int64_t total = 0, max_sk = 0;
    for (int b = 0; b < p->batch; b++) {
        int64_t sq0, sq, sk0, sk;
        mf_problem_seq(pb, b, &sq0, &sq, &sk0, &sk);
        jb.item_start[b] = total;
        jb.n_blocks[b] = (sq + MF_BM - 1) / MF_BM;
        total += jb.n_blocks[b] * p->heads_q;
        if (sk > max_sk) max_sk = sk;
    }
    jb.item_start[p->batch] = total;
    if (total == 0) {
        free(jb.item_start);
        return MF_OK;
    }
    jb.bnp = (int)round_up((size_t)(max_sk < MF_BN ? (max_sk > 0 ? max_sk : 1) : MF_BN), MF_NR);
    jb.dvp = (int)round_up((size_t)p->head_dim_v, MF_NR);
    const int D = p->head_dim;
    jb.ws_floats = round_up((size_t)MF_BM * D, 16) + round_up((size_t)D * jb.bnp, 16) +
                   (size_t)jb.bnp * jb.dvp + (size_t)MF_BM * jb.bnp + (size_t)MF_BM * jb.dvp +
                   2 * MF_BM + round_up((size_t)(D > p->head_dim_v ? D : p->head_dim_v), 16);
    jb.ws_floats = round_up(jb.ws_floats, 16); /* 64-byte aligned per worker */
    if (n_threads > total) n_threads = (int)total;
    jb.ws = (float *)aligned_alloc(64, sizeof(float) * jb.ws_floats * (size_t)n_threads);
    if (jb.ws == NULL) {
        free(jb.item_start);
        return mf_fail(err, MF_ERR_MEMORY, "[%s] out of memory for the CPU workspace", pb->fn);
    }
    mf_pool_run(n_threads, total, run_item, &jb);
    free(jb.ws);
    free(jb.item_start);
    return MF_OK;
}

const char *mf_cpu_simd_path(void) { return mf_cpu_kernels_get()->name; }
