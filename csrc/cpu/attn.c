/* attn.c - FlashAttention-2's forward pass on the CPU.
 *
 * Work item = (sequence b, kv head, a chunk of the query heads that share it, a block of query
 * rows). Its "columns" are the (query head, query row) pairs it owns: with grouped-query
 * attention the heads of one group are stacked, so each K/V tile is read and converted once for
 * all of them (decode: one query row, `group` heads). For each item:
 *   pack Q^T once (fp32, columns padded to MF_CW, scale folded in; scale*log2(e) when there is
 *   no softcap/ALiBi so exp2 applies directly); then for each tile of keys that the causal /
 *   window mask leaves visible:
 *     S^T = K Q^T with the register-blocked micro-kernel (K tile fp32, row-major); softcap /
 *     ALiBi, and the mask only on tiles that cross a mask boundary;
 *     one online-softmax step vectorised across columns (new max, rescale O only where the max
 *     grew, P = exp2(S - max), column sums);
 *     O += P V with the same micro-kernel.
 *   out = O / sum, lse = max*ln2 + ln(sum); a row that sees no key gets 0 and +inf.
 *
 * Where K/V come from:
 *   - shared packing (prefill: several items per kv head): the K and V of one (sequence, kv head)
 *     are converted to fp32 once, in parallel, into a buffer that all its items then read; heads
 *     are processed one after the other, so the buffer holds one head (<= MF_PACK_MAX_BYTES);
 *   - otherwise every item packs its own tiles, prefetching the next one;
 *   - few columns (decode): S^T by dot products along d and O += P V with V read in place, so
 *     K and V are never copied.
 *
 * Split-KV (few items, long keys, e.g. decode): each item's key range is cut into a number of
 * splits that depends only on the problem's shape, never on the thread count; a task runs one
 * split of every item of a sequence (the kv heads' rows at the same keys are neighbours in
 * memory), writes (O, max, sum) per item to a scratch buffer, and a second pass merges the
 * splits in index order.
 *
 * Every output row is computed by one fixed sequence of operations, so results are bitwise the
 * same for any number of threads. Extra memory: one workspace per thread (a few tiles), the
 * shared packing buffer of one kv head (at most 48 MiB, else per-item packing), and for
 * split-KV the partials (a few KiB per item and split). */
#include "cpu/cpu.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/kernels.h"
#include "cpu/philox.h"
#include "cpu/pool.h"

#ifndef MF_BC
#define MF_BC 48   /* columns (query rows x stacked heads) per item */
#endif
#ifndef MF_BN
#define MF_BN 96   /* keys per tile (a multiple of the micro-kernel's 6 rows) */
#endif
#ifndef MF_PREFETCH_TILES
#define MF_PREFETCH_TILES 1 /* how far ahead the K/V rows of an item are prefetched */
#endif
#define MF_SPLIT_ITEMS 16   /* split the keys only when there are fewer items than this */
#define MF_SPLIT_KEYS 1024  /* ... into splits of about this many keys */
#define MF_MAX_SPLITS 64
#define MF_GROUPED_TASKS 32 /* grouped decode: split the keys until batch x splits reaches this */

#define LN2 0.69314718055994531f

typedef struct job {
    const mf_problem *pb;
    const mf_cpu_kernels *kern;
    int64_t *item_start; /* per sequence: first item index; [batch] = total items */
    int64_t *n_blocks;   /* per sequence: query row blocks */
    size_t esize;        /* element size of q/k/v/out */
    int gh;              /* query heads per item (<= group) */
    int n_hc;            /* head chunks per kv head: ceil(group / gh) */
    int rows;            /* query rows per item */
    int cp;              /* columns per item, padded to MF_CW */
    int bn;              /* keys per tile */
    int dvp;             /* Dv padded to MF_CW */
    int splits;          /* key splits per item (1 = none) */
    size_t ws_floats;    /* per-worker workspace */
    float *ws;
    size_t part_floats;  /* per (item, split) partial when splits > 1 */
    float *part;
    /* shared packing: K [sk x D] and V [sk x dvp] of one (sequence, kv head) in fp32, packed
     * once and read by all of its items; NULL when every item packs its own tiles */
    float *pk, *pv;
    int pack_b, pack_hk;
    int64_t item_base;   /* added to the pool's item index */
    /* split-KV with the kv heads side by side in each key's row (e.g. (batch, seqlen, heads,
     * dim)): run_split reads each tile's rows of all heads once, in address order, before the
     * items compute on it; the items then find them in cache and skip their own prefetches */
    int span_touch;
} job;

#define MF_PACK_ROWS 256 /* keys per packing task */
#define MF_PACK_MAX_BYTES ((size_t)48 << 20)

/* what one item covers */
typedef struct item_desc {
    int b, h0, nh, m, cols;
    int64_t i0, start_q, sq, start_k, sk;
} item_desc;

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

static void describe(const job *jb, int64_t item, item_desc *it) {
    const mf_params *p = &jb->pb->p;
    const int b = find_seq(jb, item);
    const int64_t rem = item - jb->item_start[b];
    const int64_t nblk = jb->n_blocks[b];
    const int64_t hc_all = rem / nblk; /* kv head * n_hc + head chunk */
    const int64_t blk = nblk - 1 - rem % nblk; /* longest (causal) blocks first */
    const int hk = (int)(hc_all / jb->n_hc), hc = (int)(hc_all % jb->n_hc);
    it->b = b;
    it->h0 = hk * p->group + hc * jb->gh;
    it->nh = p->group - hc * jb->gh < jb->gh ? p->group - hc * jb->gh : jb->gh;
    mf_problem_seq(jb->pb, b, &it->start_q, &it->sq, &it->start_k, &it->sk);
    it->i0 = blk * jb->rows;
    it->m = (int)(it->sq - it->i0 < jb->rows ? it->sq - it->i0 : jb->rows);
    it->cols = it->nh * it->m;
}

/* Per-worker workspace: the tile buffers (K, V, S, a row), then `slots` item states (Q^T, O and
 * the per-column vectors). Split-KV tasks keep the states of all items of a sequence at once. */
typedef struct wspace {
    float *K, *V, *S, *row;                                  /* shared by the worker's items */
    float *QT, *O, *mx, *sum, *alpha, *slope;                /* one item */
    int32_t *lo, *hi, *pos;
} wspace;

static size_t tile_floats(const mf_params *p, int cp, int bn, int dvp) {
    const size_t D = (size_t)p->head_dim;
    return round_up((size_t)bn * D, 16) + round_up((size_t)bn * dvp, 16) + round_up((size_t)bn * cp, 16) +
           round_up((size_t)(D > (size_t)dvp ? D : (size_t)dvp), 16);
}

static size_t state_floats(const mf_params *p, int cp, int dvp) {
    return round_up((size_t)p->head_dim * cp, 16) + round_up((size_t)cp * dvp, 16) + round_up(7 * (size_t)cp, 16);
}

static void carve(const job *jb, int worker, int slot, wspace *w) {
    const mf_params *p = &jb->pb->p;
    const size_t cp = (size_t)jb->cp, D = (size_t)p->head_dim, dvp = (size_t)jb->dvp, bn = (size_t)jb->bn;
    float *f = jb->ws + (size_t)worker * jb->ws_floats;
    w->K = f; f += round_up(bn * D, 16);
    w->V = f; f += round_up(bn * dvp, 16);
    w->S = f; f += round_up(bn * cp, 16);
    w->row = f;
    f = jb->ws + (size_t)worker * jb->ws_floats + tile_floats(p, jb->cp, jb->bn, jb->dvp) +
        (size_t)slot * state_floats(p, jb->cp, jb->dvp);
    w->QT = f; f += round_up(D * cp, 16);
    w->O = f; f += round_up(cp * dvp, 16);
    w->mx = f; f += cp;
    w->sum = f; f += cp;
    w->alpha = f; f += cp;
    w->slope = f; f += cp;
    w->lo = (int32_t *)f; f += cp;
    w->hi = (int32_t *)f; f += cp;
    w->pos = (int32_t *)f;
}

/* rows [j0, j1] of a K or V head, each `bytes` long */
static void prefetch_rows(const char *base, int64_t stride, int64_t bytes, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j <= j1; j++) {
        const char *row = base + j * stride;
        for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(row + o, 0, 2);
        __builtin_prefetch(row + bytes - 1, 0, 2);
    }
}

/* rows [j0, j1] read once, one load per cache line in address order (volatile: the loads stay) */
static void touch_rows(const char *base, int64_t stride, int64_t bytes, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j <= j1; j++) {
        const volatile unsigned char *row = (const volatile unsigned char *)(base + j * stride);
        for (int64_t o = 0; o < bytes; o += 64) (void)row[o];
        (void)row[bytes - 1];
    }
}

/* Keys [j, j + n) of sequence b, kv head hk (start_k: the sequence's first row in dense varlen
 * K/V): the length of the leading run of them stored at the row stride (all n for dense K/V; up
 * to the end of j's block when paged) and the addresses of its first K and V rows. Every K/V
 * access goes through here, so a paged cache is read in place, block by block. */
static int64_t kv_run(const job *jb, int b, int hk, int64_t start_k, int64_t j, int64_t n, const char **kp,
                      const char **vp) {
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    const int64_t es = (int64_t)jb->esize;
    int64_t kb, row, len = n;
    if (p->flags & MF_FLAG_PAGED) {
        const int64_t page = j / p->page_size;
        row = j - page * p->page_size;
        kb = pb->kv_index[b * p->block_table_stride_b + page];
        if (p->page_size - row < len) len = p->page_size - row;
    } else {
        kb = mf_problem_kv_batch(pb, b);
        row = start_k + j;
    }
    *kp = (const char *)pb->k + (kb * p->k_stride_b + row * p->k_stride_s + (int64_t)hk * p->k_stride_h) * es;
    *vp = (const char *)pb->v + (kb * p->v_stride_b + row * p->v_stride_s + (int64_t)hk * p->v_stride_h) * es;
    return len;
}

/* prefetches the K and V rows of keys [j0, j1] of sequence b, kv head hk */
static void prefetch_keys(const job *jb, int b, int hk, int64_t start_k, int64_t j0, int64_t j1) {
    const mf_params *p = &jb->pb->p;
    const int64_t es = (int64_t)jb->esize;
    const char *kp, *vp;
    for (int64_t j = j0, len; j <= j1; j += len) {
        len = kv_run(jb, b, hk, start_k, j, j1 - j + 1, &kp, &vp);
        prefetch_rows(kp, p->k_stride_s * es, p->head_dim * es, 0, len - 1);
        prefetch_rows(vp, p->v_stride_s * es, p->head_dim_v * es, 0, len - 1);
    }
}

/* one (item, split) in progress */
typedef struct ustate {
    int64_t unit;
    item_desc it;
    wspace w;
    int64_t ks, ke, maxlo, minhi; /* keys of this unit; mask bounds over the item's columns */
    int hk;                       /* the item's kv head */
} ustate;

static void unit_init(const job *jb, int64_t unit, int worker, int slot, ustate *u) {
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    const mf_cpu_kernels *kn = jb->kern;
    const int64_t es = (int64_t)jb->esize;
    const int D = p->head_dim, dvp = jb->dvp, cp = jb->cp;
    const int64_t item = unit / jb->splits;
    const int split = (int)(unit % jb->splits);
    item_desc *it = &u->it;
    wspace *w = &u->w;
    u->unit = unit;
    describe(jb, item, it);
    carve(jb, worker, slot, w);
    const int cols = it->cols, m = it->m;
    const int64_t off = it->sk - it->sq;

    /* Q^T [D x cp], padding columns zero */
    const int post = (p->flags & (MF_FLAG_SOFTCAP | MF_FLAG_ALIBI)) != 0;
    const float qscale = post ? p->scale : p->scale_log2;
    memset(w->QT, 0, sizeof(float) * (size_t)D * cp);
    int64_t kmin = INT64_MAX, kmax = -1, maxlo = -1, minhi = INT64_MAX;
    const int64_t key_lo = mf_problem_key_lo(pb, it->b); /* a left-padded cache: keys before it are padding */
    for (int c = 0; c < cols; c++) {
        const int h = it->h0 + c / m;
        const int64_t i = it->i0 + c % m;
        const char *qrow = (const char *)pb->q +
                           (it->b * p->q_stride_b + (it->start_q + i) * p->q_stride_s + (int64_t)h * p->q_stride_h) * es;
        if (cp == MF_CW) { /* few columns: Q stays row-major for dot_qk */
            kn->load(w->QT + (size_t)c * D, qrow, D, pb->dtype, qscale);
        } else {
            kn->load(w->row, qrow, D, pb->dtype, qscale);
            for (int d = 0; d < D; d++) w->QT[(size_t)d * cp + c] = w->row[d];
        }
        int64_t l = key_lo, hi = it->sk - 1;
        if (p->window_left >= 0 && i + off - p->window_left > l) l = i + off - p->window_left;
        if (p->window_right >= 0 && i + off + p->window_right < hi) hi = i + off + p->window_right;
        if (l > it->sk) l = it->sk;
        if (hi < -1) hi = -1;
        w->lo[c] = (int32_t)l;
        w->hi[c] = (int32_t)hi;
        w->pos[c] = (int32_t)(i + off);
        w->slope[c] = (p->flags & MF_FLAG_ALIBI) ? pb->alibi[it->b * p->alibi_stride_b + h] : 0.0f;
        w->mx[c] = -INFINITY;
        w->sum[c] = 0.0f;
        if (l <= hi) {
            if (l < kmin) kmin = l;
            if (hi > kmax) kmax = hi;
        }
        if (l > maxlo) maxlo = l;
        if (hi < minhi) minhi = hi;
    }
    for (int c = cols; c < cp; c++) { /* padding columns see nothing */
        w->lo[c] = INT32_MAX;
        w->hi[c] = -1;
        w->pos[c] = 0;
        w->slope[c] = 0.0f;
        w->mx[c] = -INFINITY;
        w->sum[c] = 0.0f;
    }
    memset(w->O, 0, sizeof(float) * (size_t)cols * dvp);
    u->maxlo = maxlo;
    u->minhi = minhi;

    /* this unit's keys */
    u->ks = kmin;
    u->ke = kmax;
    if (jb->splits > 1 && kmin <= kmax) {
        const int64_t len = kmax - kmin + 1, ss = (len + jb->splits - 1) / jb->splits;
        u->ks = kmin + split * ss;
        u->ke = u->ks + ss - 1 < kmax ? u->ks + ss - 1 : kmax;
    }
    u->hk = it->h0 / p->group;
    if (u->ks <= u->ke && jb->pk == NULL) {
        const int64_t last = u->ke < u->ks + jb->bn - 1 ? u->ke : u->ks + jb->bn - 1;
        prefetch_keys(jb, it->b, u->hk, it->start_k, u->ks, last);
    }
}

/* the tile of keys starting at j0 (ks <= j0 <= ke) */
static void unit_tile(const job *jb, ustate *u, int64_t j0) {
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    const mf_cpu_kernels *kn = jb->kern;
    const int64_t es = (int64_t)jb->esize;
    const int D = p->head_dim, Dv = p->head_dim_v, dvp = jb->dvp, cp = jb->cp, cols = u->it.cols;
    wspace *w = &u->w;
    const int post = (p->flags & (MF_FLAG_SOFTCAP | MF_FLAG_ALIBI)) != 0;
    const int n = (int)(u->ke - j0 + 1 < jb->bn ? u->ke - j0 + 1 : jb->bn);
    const float *Kt = w->K, *Vt = w->V;
    const int64_t kst = p->k_stride_s * es, vst = p->v_stride_s * es;
    const item_desc *it = &u->it;
    const char *kp, *vp;
    int64_t len;
    if (jb->pk != NULL) { /* shared packing */
        Kt = jb->pk + j0 * D;
        Vt = jb->pv + j0 * dvp;
    } else {
        if (!jb->span_touch) { /* the next tile streams in from memory while this one is computed */
            const int64_t jn = j0 + MF_PREFETCH_TILES * jb->bn;
            const int64_t jn_end = u->ke < jn + jb->bn - 1 ? u->ke : jn + jb->bn - 1;
            prefetch_keys(jb, it->b, u->hk, it->start_k, jn, jn_end);
        }
        if (cp != MF_CW)
            for (int r = 0; r < n; r += (int)len) {
                len = kv_run(jb, it->b, u->hk, it->start_k, j0 + r, n - r, &kp, &vp);
                kn->pack(w->K + (size_t)r * D, D, kp, kst, (int)len, D, pb->dtype);
            }
    }
    /* few columns (decode): K and V read in place, row by row through a table of the tile's rows
     * (dense rows or the blocks of a paged cache alike), one kernel call per tile */
    const void *krows[MF_BN], *vrows[MF_BN];
    if (cp == MF_CW && jb->pk == NULL) {
        for (int r = 0; r < n; r += (int)len) {
            len = kv_run(jb, it->b, u->hk, it->start_k, j0 + r, n - r, &kp, &vp);
            for (int i = 0; i < len; i++) {
                krows[r + i] = kp + i * kst;
                vrows[r + i] = vp + i * vst;
            }
        }
        kn->dot_qk(w->S, cp, krows, n, D, pb->dtype, w->QT, cols);
    } else if (cp == MF_CW) {
        for (int r = 0; r < n; r++) krows[r] = Kt + (size_t)r * D;
        kn->dot_qk(w->S, cp, krows, n, D, MF_F32, w->QT, cols);
    } else
        kn->gemm(n, cp, D, Kt, D, 1, w->QT, cp, w->S, cp, 0);
    if (post)
        kn->post(w->S, n, cp, cp, (int32_t)j0, w->pos, (p->flags & MF_FLAG_ALIBI) ? w->slope : NULL,
                 (p->flags & MF_FLAG_SOFTCAP) ? p->softcap : 0.0f);
    if (j0 < u->maxlo || j0 + n - 1 > u->minhi) kn->mask(w->S, n, cp, cp, (int32_t)j0, w->lo, w->hi);
    kn->softmax(w->S, n, cp, cp, w->mx, w->sum, w->alpha);
    if (pb->drop.on) /* after the row sums (lse ignores dropout); 1 / (1 - p) is applied in unit_finish */
        mf_dropout_tile(&pb->drop, w->S, n, cp, cols, j0, it->b, it->h0, it->m, it->i0, 1.0f);
    for (int c = 0; c < cols; c++)
        if (w->alpha[c] != 1.0f) kn->scale(w->O + (size_t)c * dvp, dvp, w->alpha[c]);
    if (jb->pk == NULL && cp == MF_CW && Dv % 16 == 0) { /* decode: V read in place */
        kn->gemm_rows(cols, dvp, n, w->S, 1, cp, vrows, pb->dtype, w->O, dvp);
        return;
    }
    if (jb->pk == NULL) {
        for (int r = 0; r < n; r += (int)len) {
            len = kv_run(jb, it->b, u->hk, it->start_k, j0 + r, n - r, &kp, &vp);
            kn->pack(w->V + (size_t)r * dvp, dvp, vp, vst, (int)len, Dv, pb->dtype);
        }
        if (dvp > Dv)
            for (int r = 0; r < n; r++) memset(w->V + (size_t)r * dvp + Dv, 0, sizeof(float) * (dvp - Dv));
    }
    kn->gemm(cols, dvp, n, w->S, 1, cp, Vt, dvp, w->O, dvp, 1);
}

static void unit_finish(const job *jb, ustate *u) {
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    const mf_cpu_kernels *kn = jb->kern;
    const int64_t es = (int64_t)jb->esize;
    const int Dv = p->head_dim_v, dvp = jb->dvp, cp = jb->cp;
    const item_desc *it = &u->it;
    const wspace *w = &u->w;
    if (jb->splits > 1) { /* partial: O [cols x dvp], max [cp], sum [cp] */
        float *part = jb->part + (size_t)u->unit * jb->part_floats;
        memcpy(part, w->O, sizeof(float) * (size_t)it->cols * dvp);
        memcpy(part + (size_t)cp * dvp, w->mx, sizeof(float) * cp);
        memcpy(part + (size_t)cp * dvp + cp, w->sum, sizeof(float) * cp);
        return;
    }
    float *lse = pb->lse ? pb->lse + it->b * p->lse_stride_b + it->start_q + it->i0 : NULL;
    for (int c = 0; c < it->cols; c++) {
        const int h = it->h0 + c / it->m;
        const int64_t i = it->i0 + c % it->m;
        char *orow = (char *)pb->o + (it->b * p->o_stride_b + (it->start_q + i) * p->o_stride_s +
                                      (int64_t)h * p->o_stride_h) * es;
        float *lrow = lse ? lse + (int64_t)h * p->lse_stride_h + c % it->m : NULL;
        float *o = w->O + (size_t)c * dvp;
        if (w->sum[c] == 0.0f) { /* the row sees no key */
            memset(o, 0, sizeof(float) * Dv);
            kn->store(orow, o, Dv, pb->dtype, 1.0f);
            if (lrow) *lrow = INFINITY;
            continue;
        }
        kn->store(orow, o, Dv, pb->dtype, (pb->drop.on ? pb->drop.keep_scale : 1.0f) / w->sum[c]);
        if (lrow) *lrow = w->mx[c] * LN2 + logf(w->sum[c]);
    }
}

static void run_unit(void *ctx, int64_t unit, int worker) {
    const job *jb = (const job *)ctx;
    ustate u;
    unit_init(jb, unit + jb->item_base, worker, 0, &u);
    for (int64_t j0 = u.ks; j0 <= u.ke; j0 += jb->bn) unit_tile(jb, &u, j0);
    unit_finish(jb, &u);
}

/* split-KV task: split (task % splits) of every item of sequence (task / splits). The items
 * (kv heads) advance tile by tile together, so the rows of all heads at the same keys, which are
 * neighbours in memory, are read at the same time. Each item still sees its own tiles in order,
 * so its result is the same as when it runs alone. */
static void run_split(void *ctx, int64_t task, int worker) {
    const job *jb = (const job *)ctx;
    const int b = (int)(task / jb->splits), s = (int)(task % jb->splits);
    const int64_t first = jb->item_start[b];
    const int n_items = (int)(jb->item_start[b + 1] - first);
    ustate u[MF_SPLIT_ITEMS];
    for (int i = 0; i < n_items; i++) unit_init(jb, (first + i) * jb->splits + s, worker, i, &u[i]);
    const mf_params *p = &jb->pb->p;
    const int64_t es = (int64_t)jb->esize;
    int64_t kspan = 0, vspan = 0;
    if (jb->span_touch && n_items > 0) { /* the rows of all kv heads at one key, from head 0's */
        kspan = (int64_t)(p->heads_k - 1) * p->k_stride_h * es + (int64_t)p->head_dim * es;
        vspan = (int64_t)(p->heads_k - 1) * p->v_stride_h * es + (int64_t)p->head_dim_v * es;
    }
    for (int64_t t = 0;; t++) {
        int any = 0;
        if (kspan > 0 && u[0].ks <= u[0].ke && t * jb->bn <= u[0].ke - u[0].ks) { /* item 0's tile t */
            const int64_t j0 = u[0].ks + t * jb->bn, j1 = u[0].ke - j0 < jb->bn ? u[0].ke : j0 + jb->bn - 1;
            const char *kp, *vp, *kn_ = NULL, *vn_ = NULL;
            int64_t len = kv_run(jb, b, 0, u[0].it.start_k, j0, j1 - j0 + 1, &kp, &vp);
            for (int64_t j = j0; j <= j1;) { /* block by block when paged */
                int64_t next = 0;
                if (j + len <= j1) { /* the next block starts elsewhere: its first rows are on their way */
                    next = kv_run(jb, b, 0, u[0].it.start_k, j + len, j1 - j - len + 1, &kn_, &vn_);
                    prefetch_rows(kn_, p->k_stride_s * es, kspan, 0, next < 2 ? next - 1 : 1);
                    prefetch_rows(vn_, p->v_stride_s * es, vspan, 0, next < 2 ? next - 1 : 1);
                }
                touch_rows(kp, p->k_stride_s * es, kspan, 0, len - 1);
                touch_rows(vp, p->v_stride_s * es, vspan, 0, len - 1);
                j += len;
                kp = kn_, vp = vn_, len = next;
            }
        }
        for (int i = 0; i < n_items; i++) {
            if (u[i].ks > u[i].ke || t * jb->bn > u[i].ke - u[i].ks) continue; /* no tile t (no overflow) */
            unit_tile(jb, &u[i], u[i].ks + t * jb->bn);
            any = 1;
        }
        if (!any) break;
    }
    for (int i = 0; i < n_items; i++) unit_finish(jb, &u[i]);
}

/* shared packing task: keys [t*MF_PACK_ROWS, ...) of (pack_b, pack_hk) */
static void pack_task(void *ctx, int64_t t, int worker) {
    (void)worker;
    const job *jb = (const job *)ctx;
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    const int64_t es = (int64_t)jb->esize;
    const int D = p->head_dim, Dv = p->head_dim_v, dvp = jb->dvp;
    int64_t sq0, sq, sk0, sk;
    mf_problem_seq(pb, jb->pack_b, &sq0, &sq, &sk0, &sk);
    const int64_t r0 = t * MF_PACK_ROWS;
    const int rows = (int)(sk - r0 < MF_PACK_ROWS ? sk - r0 : MF_PACK_ROWS);
    const char *k, *v;
    for (int64_t r = 0, len; r < rows; r += len) {
        len = kv_run(jb, jb->pack_b, jb->pack_hk, sk0, r0 + r, rows - r, &k, &v);
        jb->kern->pack(jb->pk + (r0 + r) * D, D, k, p->k_stride_s * es, (int)len, D, pb->dtype);
        jb->kern->pack(jb->pv + (r0 + r) * dvp, dvp, v, p->v_stride_s * es, (int)len, Dv, pb->dtype);
    }
    if (dvp > Dv)
        for (int r = 0; r < rows; r++) memset(jb->pv + (r0 + r) * dvp + Dv, 0, sizeof(float) * (dvp - Dv));
}

/* merges the splits of one item in split order */
static void merge_item(void *ctx, int64_t item, int worker) {
    const job *jb = (const job *)ctx;
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    const mf_cpu_kernels *kn = jb->kern;
    const int64_t es = (int64_t)jb->esize;
    const int Dv = p->head_dim_v, dvp = jb->dvp, cp = jb->cp, S = jb->splits;
    item_desc it;
    describe(jb, item, &it);
    wspace w;
    carve(jb, worker, 0, &w);
    const float *part0 = jb->part + (size_t)item * S * jb->part_floats;
    float *lse = pb->lse ? pb->lse + it.b * p->lse_stride_b + it.start_q + it.i0 : NULL;
    for (int c = 0; c < it.cols; c++) {
        const int h = it.h0 + c / it.m;
        const int64_t i = it.i0 + c % it.m;
        char *orow = (char *)pb->o + (it.b * p->o_stride_b + (it.start_q + i) * p->o_stride_s +
                                      (int64_t)h * p->o_stride_h) * es;
        float *lrow = lse ? lse + (int64_t)h * p->lse_stride_h + c % it.m : NULL;
        float M = -INFINITY;
        for (int s = 0; s < S; s++) {
            const float ms = part0[(size_t)s * jb->part_floats + (size_t)cp * dvp + c];
            if (ms > M) M = ms;
        }
        float *o = w.O;
        memset(o, 0, sizeof(float) * dvp);
        float sum = 0.0f;
        if (M != -INFINITY) {
            for (int s = 0; s < S; s++) {
                const float *ps = part0 + (size_t)s * jb->part_floats;
                const float ms = ps[(size_t)cp * dvp + c], ls = ps[(size_t)cp * dvp + cp + c];
                if (ms == -INFINITY) continue; /* this split saw no key of the row */
                const float wgt = exp2f(ms - M);
                const float *os = ps + (size_t)c * dvp;
                for (int d = 0; d < Dv; d++) o[d] += os[d] * wgt;
                sum += ls * wgt;
            }
        }
        if (sum == 0.0f) {
            memset(o, 0, sizeof(float) * Dv);
            kn->store(orow, o, Dv, pb->dtype, 1.0f);
            if (lrow) *lrow = INFINITY;
            continue;
        }
        kn->store(orow, o, Dv, pb->dtype, 1.0f / sum);
        if (lrow) *lrow = M * LN2 + logf(sum);
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

    /* columns per item: all heads of a group (up to MF_BC) times as many rows as fit */
    jb.gh = p->group < MF_BC ? p->group : MF_BC;
    jb.n_hc = (p->group + jb.gh - 1) / jb.gh;
    jb.rows = MF_BC / jb.gh;

    int64_t small_buf[2 * 9];
    int64_t *ibuf = small_buf;
    if (p->batch > 8) {
        ibuf = (int64_t *)malloc(sizeof(int64_t) * 2 * ((size_t)p->batch + 1));
        if (ibuf == NULL) return mf_fail(err, MF_ERR_MEMORY, "[%s] out of memory", pb->fn);
    }
    jb.item_start = ibuf;
    jb.n_blocks = ibuf + p->batch + 1;
    int64_t total = 0, max_sk = 0, max_sq = 0;
    for (int b = 0; b < p->batch; b++) {
        int64_t sq0, sq, sk0, sk;
        mf_problem_seq(pb, b, &sq0, &sq, &sk0, &sk);
        jb.item_start[b] = total;
        jb.n_blocks[b] = (sq + jb.rows - 1) / jb.rows;
        total += jb.n_blocks[b] * p->heads_k * jb.n_hc;
        if (sk > max_sk) max_sk = sk;
        if (sq > max_sq) max_sq = sq;
    }
    jb.item_start[p->batch] = total;
    int rc = MF_OK;
    if (total == 0) goto done;

    {
        int64_t cols = (int64_t)jb.gh * (max_sq < jb.rows ? max_sq : jb.rows);
        jb.cp = (int)round_up((size_t)cols, MF_CW);
    }
    jb.bn = (int)(max_sk < MF_BN ? (max_sk > 0 ? max_sk : 1) : MF_BN);
    jb.dvp = (int)round_up((size_t)p->head_dim_v, MF_CW);
    /* Decode-like problems (few columns per item, every item of a sequence fits one task) run as
     * grouped tasks: all items (kv heads) of a sequence advance over the same keys together, so
     * each key's row of all heads is read once, in address order (run_split). Their keys are cut
     * into splits, merged afterwards, when the tasks would be few: always a function of the
     * shape alone, never of the thread count. */
    int64_t per_seq = 0;
    for (int b = 0; b < p->batch; b++)
        if (jb.item_start[b + 1] - jb.item_start[b] > per_seq) per_seq = jb.item_start[b + 1] - jb.item_start[b];
    const int groupable = per_seq <= MF_SPLIT_ITEMS;
    int grouped = 0;
    jb.splits = 1;
    if (pb->drop.on) { /* dropout: one unit per item (merge_item does not apply the dropout scale) */
    } else if (pb->num_splits_req == 0 && total < MF_SPLIT_ITEMS && max_sk >= 2 * MF_SPLIT_KEYS) {
        const int64_t s = max_sk / MF_SPLIT_KEYS;
        jb.splits = (int)(s > MF_MAX_SPLITS ? MF_MAX_SPLITS : s);
    } else if (pb->num_splits_req == 0 && groupable && jb.cp == MF_CW && max_sk >= 2 * MF_SPLIT_KEYS) {
        const int64_t want = (MF_GROUPED_TASKS + p->batch - 1) / p->batch, most = max_sk / MF_SPLIT_KEYS;
        jb.splits = (int)(want < most ? want : most);
        grouped = 1;
    } else if (pb->num_splits_req > 1 && groupable && max_sk >= 2) {
        /* the caller's count (flash_attn_with_kvcache's num_splits) */
        jb.splits = pb->num_splits_req > MF_MAX_SPLITS ? MF_MAX_SPLITS : pb->num_splits_req;
    }
    grouped = grouped || jb.splits > 1;
    const int slots = grouped ? MF_SPLIT_ITEMS : 1; /* grouped: every item of a sequence at once */
    jb.ws_floats = round_up(tile_floats(p, jb.cp, jb.bn, jb.dvp) + (size_t)slots * state_floats(p, jb.cp, jb.dvp), 16);
    const int64_t units = total * jb.splits;
    int nt = n_threads > units ? (int)units : n_threads;
    jb.ws = (float *)aligned_alloc(64, sizeof(float) * jb.ws_floats * (size_t)nt);
    if (jb.ws == NULL) {
        rc = mf_fail(err, MF_ERR_MEMORY, "[%s] out of memory for the CPU workspace", pb->fn);
        goto done;
    }
    if (jb.splits > 1) {
        jb.part_floats = round_up((size_t)jb.cp * jb.dvp + 2 * (size_t)jb.cp, 16);
        jb.part = (float *)aligned_alloc(64, sizeof(float) * jb.part_floats * (size_t)units);
        if (jb.part == NULL) {
            free(jb.ws);
            rc = mf_fail(err, MF_ERR_MEMORY, "[%s] out of memory for the split-KV partials", pb->fn);
            goto done;
        }
    }
    /* Shared packing pays when a (sequence, kv head) has several items to read the keys. */
    const size_t pack_bytes = sizeof(float) * (size_t)max_sk * ((size_t)p->head_dim + jb.dvp);
    const int64_t per_head = (int64_t)jb.n_hc * ((max_sq + jb.rows - 1) / jb.rows);
    if (jb.splits == 1 && per_head >= 2 && pack_bytes <= MF_PACK_MAX_BYTES)
        jb.pk = (float *)aligned_alloc(64, round_up(pack_bytes, 64));
    if (jb.pk != NULL) {
        jb.pv = jb.pk + (size_t)max_sk * p->head_dim;
        for (int b = 0; b < p->batch; b++) {
            int64_t sq0, sq, sk0, sk;
            mf_problem_seq(pb, b, &sq0, &sq, &sk0, &sk);
            const int64_t n_items = jb.n_blocks[b] * jb.n_hc;
            if (n_items == 0) continue;
            for (int hk = 0; hk < p->heads_k; hk++) {
                jb.pack_b = b;
                jb.pack_hk = hk;
                const int64_t tasks = (sk + MF_PACK_ROWS - 1) / MF_PACK_ROWS;
                if (tasks > 0) mf_pool_run(nt, tasks, pack_task, &jb);
                jb.item_base = jb.item_start[b] + hk * n_items;
                mf_pool_run(nt, n_items, run_unit, &jb);
            }
        }
        free(jb.pk);
    } else if (grouped) {
        /* one task = one key split of every item of a sequence: the items (kv heads) read the
         * same pages one after the other, so each page is mapped once and read from memory once */
        { /* measured on a 2-core Xeon, decode Sk=32768 Hk=8 D=128 bf16: 25-28 ms without the
           * ordered read, 15-18 with it, 12-14 with K/V stored head by head */
            const int64_t es = (int64_t)jb.esize;
            const int64_t kh = p->k_stride_h < 0 ? -p->k_stride_h : p->k_stride_h;
            const int64_t vh = p->v_stride_h < 0 ? -p->v_stride_h : p->v_stride_h;
            const int64_t ks = ((int64_t)(p->heads_k - 1) * kh + p->head_dim) * es;
            const int64_t vs = ((int64_t)(p->heads_k - 1) * vh + p->head_dim_v) * es;
            /* the span lies within one key's row and holds little besides the heads' rows */
            jb.span_touch = p->k_stride_h >= 0 && p->v_stride_h >= 0 && ks <= p->k_stride_s * es && vs <= p->v_stride_s * es &&
                            ks <= 2 * (int64_t)p->heads_k * p->head_dim * es &&
                            vs <= 2 * (int64_t)p->heads_k * p->head_dim_v * es;
        }
        mf_pool_run(nt, (int64_t)p->batch * jb.splits, run_split, &jb);
    } else {
        mf_pool_run(nt, units, run_unit, &jb);
    }
    if (jb.splits > 1) {
        mf_pool_run(nt, total, merge_item, &jb);
        free(jb.part);
    }
    free(jb.ws);
done:
    if (ibuf != small_buf) free(ibuf);
    return rc;
}

const char *mf_cpu_simd_path(void) { return mf_cpu_kernels_get()->name; }
