/* dispatch.c - see dispatch.h.
 *
 * Which tiers can serve (mf_metal_tier_serves; also what MTLFLASH_KERNEL may force):
 *
 *   tier       | serves when
 *   -----------+------------------------------------------------------------------------------
 *   tensorops  | never yet (not implemented)
 *   simdgroup  | Apple7+ (every M-series GPU); head dims <= 256; dense or varlen K/V only (no
 *              | kv cache, no block table: those go to vec)
 *   vec        | Apple7+ (32-wide simdgroups, simd_sum); head dims up to 576 (q/k) and 512 (v);
 *              | every kv layout: paged (MF_PAGED=1, any page size), cache_batch_idx, seqused_k
 *              | (cache_seqlens + new rows), leftpad, varlen + paged; the append + rotary pass
 *   (all)      | bfloat16 inputs need Metal 3.1 (macOS 14)
 *
 * Automatic choice (mf_metal_choose):
 *   - kv caches, paged K/V and head dims > 256: vec (the only tier that serves them);
 *   - decode shapes (at most MF_DECODE_ROWS query rows per sequence): vec, whose split-KV path
 *     keeps the GPU busy over long key sequences;
 *   - few rows against long keys (MF_DECODE_ROWS < rows per sequence <= MF_SPLIT_ROWS, at least
 *     MF_VEC_SPLIT_MIN_KEYS keys, and fewer than MF_SG_FEW_GROUPS threadgroups for the simdgroup
 *     tier: chunked prefill, speculative decoding): vec's split-KV path. The simdgroup tier has
 *     no key splitting, so such a call would run on a handful of threadgroups; vec splits the
 *     keys over up to MF_VEC_MAX_SPLITS threadgroups per row and merges in a second pass (the
 *     same kernels as decode, proven in the emulator with 9-64 rows);
 *   - other prefill: simdgroup where it serves, else vec.
 * Key splits on vec (mf_metal_vec_splits): ceil(keys / MF_VEC_SPLIT_KEYS) up to
 * MF_VEC_MAX_SPLITS when few rows meet long keys (as above), else none; a kv cache call's
 * num_splits overrides it (1: none, n: n splits, FA2 caps n at 128); the fp32 partials are kept
 * under MF_VEC_SCRATCH_MAX by halving the splits.
 *
 * Launch plans: vec = [mf_attn_vec] or [mf_attn_vec_split, mf_attn_vec_merge], defines MF_DTYPE,
 * MF_MAX_D, MF_MAX_DV, MF_PAGED; simdgroup = [mf_attn_simdgroup], defines MF_DTYPE, MF_D, MF_DV,
 * MF_SG, MF_BK. A kv cache call with new k/v adds the append pass (kv_append.metal,
 * mf_kv_append, define MF_DTYPE) before them: plan->append.
 *
 * Every bound below is a constant of the kernels (see the comment at the top of each .metal). */
#include "metal/dispatch.h"

#include <stdio.h>
#include <string.h>

#define MF_VEC_ROWS 4            /* simdgroups (query rows) per vec threadgroup: 1..32 */
#define MF_VEC_SPLIT_MIN_KEYS 1024 /* split the keys only for long key sequences ... */
#define MF_VEC_SPLIT_MAX_ROWS 256  /* ... met by few rows */
#define MF_VEC_SPLIT_KEYS 512    /* target keys per split */
#define MF_VEC_MAX_SPLITS 32
#define MF_DECODE_ROWS 8         /* query rows per sequence up to which a call is "decode" */
#define MF_SPLIT_ROWS 64         /* ... and up to which few rows over long keys still split (vec) */
#define MF_SG_FEW_GROUPS 64      /* simdgroup threadgroups below which such a call goes to vec */
#define MF_VEC_SCRATCH_MAX (1u << 24) /* fp32 scratch of the split path at most (64 MiB) */
#define MF_SG_MAX_HEAD_DIM 256   /* the simdgroup tier's tiles */

/* simdgroup tier tiles (attn_simdgroup.metal): 8 query rows per simdgroup, rows padded by
 * MF_SG_PAD elements in threadgroup memory, at most 32 KiB of it */
#define MF_SG_PAD 4
#define MF_TG_MEMORY_MAX 32768

static uint32_t ceil_div(uint64_t a, uint64_t b) { return (uint32_t)((a + b - 1) / b); }

static int kv_layout(const mf_problem *pb) {
    return (pb->p.flags & (MF_FLAG_PAGED | MF_FLAG_KV_BATCH_IDX | MF_FLAG_SEQUSED_K | MF_FLAG_LEFTPAD_K)) != 0 ||
           pb->app.present;
}

/* threadgroups the simdgroup tier would launch (32 query rows each at most) */
static uint64_t sg_groups(const mf_params *p) {
    return (uint64_t)p->batch * (uint64_t)p->heads_q * (((uint64_t)p->seqlen_q + 31) / 32);
}

/* few rows per sequence against long keys: the vec tier's split-KV path pays */
static int few_rows_long_keys(const mf_params *p) {
    if (p->seqlen_k < MF_VEC_SPLIT_MIN_KEYS) return 0;
    if ((int64_t)p->batch * p->heads_q * p->seqlen_q <= MF_VEC_SPLIT_MAX_ROWS) return 1;
    return p->seqlen_q <= MF_SPLIT_ROWS && sg_groups(p) < MF_SG_FEW_GROUPS;
}

int mf_metal_vec_splits(const mf_problem *pb) {
    const mf_params *p = &pb->p;
    int s;
    if (pb->num_splits_req >= 1) { /* a kv cache call's num_splits: 1 never splits, n splits n ways */
        s = pb->num_splits_req;
    } else {
        if (!few_rows_long_keys(p)) return 1;
        s = (int)ceil_div((uint64_t)p->seqlen_k, MF_VEC_SPLIT_KEYS);
        if (s > MF_VEC_MAX_SPLITS) s = MF_VEC_MAX_SPLITS;
    }
    /* keep the partials within the scratch budget */
    const uint64_t rec = (uint64_t)p->batch * p->heads_q * p->seqlen_q * (uint64_t)(p->head_dim_v + 2);
    while (s > 1 && rec * (uint64_t)s > MF_VEC_SCRATCH_MAX) s /= 2;
    return s < 1 ? 1 : s;
}

int mf_metal_tier_serves(mf_tier tier, const mf_problem *pb, const mf_metal_caps *caps, char *reason,
                         size_t n) {
    if (tier == MF_TIER_TENSOROPS) {
        snprintf(reason, n, "the tensorops tier is not implemented yet");
        return 0;
    }
    if (tier != MF_TIER_VEC && tier != MF_TIER_SIMDGROUP) {
        snprintf(reason, n, "not a Metal tier");
        return 0;
    }
    /* vec and simdgroup alike: 32-wide simdgroups (simd_sum, simdgroup_matrix) */
    if (caps->apple_family < 7) {
        snprintf(reason, n, "the Metal kernels need an Apple7+ GPU (M1 or newer), this one is Apple%d",
                 caps->apple_family);
        return 0;
    }
    if (pb->dtype == MF_BF16 && !caps->bfloat) {
        snprintf(reason, n, "bfloat16 needs Metal 3.1 (macOS 14 or newer)");
        return 0;
    }
    if (tier == MF_TIER_VEC) {
        if (pb->p.head_dim > MF_MAX_HEAD_DIM || pb->p.head_dim_v > MF_MAX_HEAD_DIM_V) {
            snprintf(reason, n, "head dims above %d (q/k) or %d (v)", MF_MAX_HEAD_DIM, MF_MAX_HEAD_DIM_V);
            return 0;
        }
        return 1;
    }
    if (pb->p.head_dim > MF_SG_MAX_HEAD_DIM || pb->p.head_dim_v > MF_SG_MAX_HEAD_DIM) {
        snprintf(reason, n, "head dims above %d (the vec tier serves up to %d / %d)", MF_SG_MAX_HEAD_DIM,
                 MF_MAX_HEAD_DIM, MF_MAX_HEAD_DIM_V);
        return 0;
    }
    if (kv_layout(pb)) {
        snprintf(reason, n, "kv caches and paged K/V are served by the vec tier only");
        return 0;
    }
    return 1;
}

mf_tier mf_metal_choose(const mf_problem *pb, const mf_metal_caps *caps) {
    char reason[160];
    const mf_params *p = &pb->p;
    const int vec_splits = p->seqlen_q <= MF_SPLIT_ROWS && few_rows_long_keys(p);
    if (p->seqlen_q > MF_DECODE_ROWS && !vec_splits &&
        mf_metal_tier_serves(MF_TIER_SIMDGROUP, pb, caps, reason, sizeof reason))
        return MF_TIER_SIMDGROUP;
    if (mf_metal_tier_serves(MF_TIER_VEC, pb, caps, reason, sizeof reason)) return MF_TIER_VEC;
    return MF_NUM_TIERS;
}

static uint32_t sg_tg_bytes(int d8, int dv8, int sg, int bk, int eb) {
    int q_elems = 8 * sg * (d8 + MF_SG_PAD);
    int k_elems = d8 * (bk + MF_SG_PAD), v_elems = bk * (dv8 + MF_SG_PAD);
    return (uint32_t)((q_elems + (k_elems > v_elems ? k_elems : v_elems)) * eb);
}

/* Tiles of the simdgroup tier: the first (simdgroups, keys per block) of (4, bk0), (4, bk0/2),
 * (2, bk0), (2, bk0/2), (1, 8) that fits 32 KiB with both head dims at the larger one, where
 * bk0 = 32 for head dims up to 96, else 16. */
static int sg_tiles(const mf_params *p, mf_dtype dt, int *d8, int *dv8, int *sg, int *bk, uint32_t *bytes) {
    const int eb = (int)mf_dtype_size(dt);
    *d8 = (p->head_dim + 7) / 8 * 8;
    *dv8 = (p->head_dim_v + 7) / 8 * 8;
    const int big = *d8 > *dv8 ? *d8 : *dv8, bk0 = big <= 96 ? 32 : 16;
    const int options[5][2] = {{4, bk0}, {4, bk0 / 2}, {2, bk0}, {2, bk0 / 2}, {1, 8}};
    for (int i = 0; i < 5; i++) {
        if (sg_tg_bytes(big, big, options[i][0], options[i][1], eb) <= MF_TG_MEMORY_MAX) {
            *sg = options[i][0];
            *bk = options[i][1];
            *bytes = sg_tg_bytes(*d8, *dv8, *sg, *bk, eb);
            return 1;
        }
    }
    return 0;
}

/* smallest per-lane register bound (MF_MAX_D / MF_MAX_DV) covering a head dim */
static int vec_bound(int d, int largest) {
    static const int choices[4] = {64, 128, 256, 384};
    for (int i = 0; i < 4; i++)
        if (d <= choices[i]) return choices[i];
    return largest;
}

/* The append pass of a kv cache call with new k/v (plan->append). */
static void plan_append(const mf_problem *pb, mf_metal_plan *plan) {
    const mf_append *a = &pb->app;
    const mf_params *p = &pb->p;
    mf_metal_append *ap = &plan->append;
    const int rotate_q = mf_problem_rotates_q(pb);
    const uint64_t kv_rows = (uint64_t)p->batch * (uint64_t)a->seqlen_new;
    const uint64_t q_rows = rotate_q ? (uint64_t)p->batch * (uint64_t)p->seqlen_q : 0;
    const int heads = rotate_q && p->heads_q > p->heads_k ? p->heads_q : p->heads_k;
    if (kv_rows + q_rows == 0) return; /* nothing to write */
    ap->present = 1;
    ap->source = "kv_append.metal";
    ap->n_defines = 1;
    ap->defines[0] = (mf_metal_define){"MF_DTYPE", (int)pb->dtype};
    ap->launch = (mf_metal_launch){"mf_kv_append", {(uint32_t)heads, (uint32_t)(kv_rows + q_rows), 1}, {32, 1, 1}};
    mf_append_params *x = &ap->params;
    memset(x, 0, sizeof *x);
    x->kn_stride_b = a->kn_stride[0];
    x->kn_stride_s = a->kn_stride[1];
    x->kn_stride_h = a->kn_stride[2];
    x->vn_stride_b = a->vn_stride[0];
    x->vn_stride_s = a->vn_stride[1];
    x->vn_stride_h = a->vn_stride[2];
    if (rotate_q) {
        x->qs_stride_b = a->qs_stride[0];
        x->qs_stride_s = a->qs_stride[1];
        x->qs_stride_h = a->qs_stride[2];
    }
    x->cos_stride = a->cos_stride;
    x->sin_stride = a->sin_stride;
    x->seqlen_new = (mf_i32)a->seqlen_new;
    x->rotary_dim = a->rotary_dim;
    x->interleaved = a->interleaved;
    x->q_per_row = a->q_per_row;
    x->rotate_q = rotate_q;
}

int mf_metal_plan_make(const mf_problem *pb, mf_tier tier, const mf_metal_caps *caps, mf_metal_plan *plan,
                       mf_error *err) {
    char reason[160];
    memset(plan, 0, sizeof *plan);
    if (!mf_metal_tier_serves(tier, pb, caps, reason, sizeof reason))
        return mf_fail(err, MF_ERR_RUNTIME, "[%s] the %s tier cannot run this call: %s", pb->fn,
                       mf_tier_name(tier), reason);
    if ((uint64_t)pb->p.heads_q * (uint64_t)pb->p.seqlen_q * 32u >= (1ull << 32))
        return mf_fail(err, MF_ERR_RUNTIME, "[%s] the grid of heads x rows is too large for one Metal launch", pb->fn);
    if (pb->app.present &&
        (uint64_t)pb->p.batch * ((uint64_t)pb->app.seqlen_new + (uint64_t)pb->p.seqlen_q) >= (1ull << 32))
        return mf_fail(err, MF_ERR_RUNTIME, "[%s] the append pass has too many rows for one Metal launch", pb->fn);
    plan->tier = tier;
    plan->params = pb->p;
    mf_params *p = &plan->params;
    if (pb->app.present) plan_append(pb, plan);
    if (tier == MF_TIER_SIMDGROUP) {
        int d8, dv8, sg, bk;
        uint32_t bytes;
        if (!sg_tiles(p, pb->dtype, &d8, &dv8, &sg, &bk, &bytes))
            return mf_fail(err, MF_ERR_RUNTIME, "[%s] no simdgroup tile fits 32 KiB for head dims (%d, %d)",
                           pb->fn, p->head_dim, p->head_dim_v);
        plan->source = "attn_simdgroup.metal";
        plan->n_defines = 5;
        plan->defines[0] = (mf_metal_define){"MF_DTYPE", (int)pb->dtype};
        plan->defines[1] = (mf_metal_define){"MF_D", d8};
        plan->defines[2] = (mf_metal_define){"MF_DV", dv8};
        plan->defines[3] = (mf_metal_define){"MF_SG", sg};
        plan->defines[4] = (mf_metal_define){"MF_BK", bk};
        plan->threadgroup_memory = bytes;
        uint32_t gx = ceil_div((uint64_t)p->seqlen_q, (uint64_t)(8 * sg));
        if (gx == 0 || p->batch == 0) return MF_OK; /* nothing to do */
        plan->n_launches = 1;
        plan->launches[0] = (mf_metal_launch){"mf_attn_simdgroup", {gx, (uint32_t)p->heads_q, (uint32_t)p->batch},
                                              {(uint32_t)(32 * sg), 1, 1}};
        return MF_OK;
    }
    /* tier == MF_TIER_VEC */
    plan->source = "attn_vec.metal";
    plan->n_defines = 4;
    plan->defines[0] = (mf_metal_define){"MF_DTYPE", (int)pb->dtype};
    plan->defines[1] = (mf_metal_define){"MF_MAX_D", vec_bound(p->head_dim, MF_MAX_HEAD_DIM)};
    plan->defines[2] = (mf_metal_define){"MF_MAX_DV", vec_bound(p->head_dim_v, MF_MAX_HEAD_DIM_V)};
    plan->defines[3] = (mf_metal_define){"MF_PAGED", (p->flags & MF_FLAG_PAGED) ? 1 : 0};
    uint64_t pairs = (uint64_t)p->heads_q * (uint64_t)p->seqlen_q;
    uint32_t rows = pairs < MF_VEC_ROWS ? (uint32_t)(pairs ? pairs : 1) : MF_VEC_ROWS;
    uint32_t gx = ceil_div(pairs, rows);
    if (gx == 0 || p->batch == 0) {
        plan->n_launches = 0; /* nothing to do */
        return MF_OK;
    }
    int splits = mf_metal_vec_splits(pb);
    p->num_splits = splits;
    p->split_size = splits > 1 ? (int)ceil_div((uint64_t)p->seqlen_k, (uint64_t)splits) : 0;
    mf_metal_launch *l = plan->launches;
    if (splits == 1) {
        plan->n_launches = 1;
        l[0] = (mf_metal_launch){"mf_attn_vec", {gx, 1, (uint32_t)p->batch}, {32 * rows, 1, 1}};
    } else {
        plan->n_launches = 2;
        l[0] = (mf_metal_launch){"mf_attn_vec_split", {gx, (uint32_t)splits, (uint32_t)p->batch}, {32 * rows, 1, 1}};
        l[1] = (mf_metal_launch){"mf_attn_vec_merge", {gx, 1, (uint32_t)p->batch}, {32 * rows, 1, 1}};
        plan->scratch_floats = (uint64_t)p->batch * pairs * (uint64_t)splits * (uint64_t)(p->head_dim_v + 2);
    }
    return MF_OK;
}

int mf_metal_bind(const mf_tensor *t, const char *fn, const char *name, mf_metal_binding *b, mf_error *err) {
    b->buffer = 0;
    b->offset = 0;
    if (!t->present) return MF_OK;
    if (t->device != MF_DEV_MPS)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: must be on the mps device for the Metal tiers, got %s", fn,
                       name, mf_device_name(t->device));
    int64_t last = 0; /* offset of the farthest element, in elements */
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] == 0) return MF_OK; /* nothing is addressed */
        if (t->stride[i] < 0)
            return mf_fail(err, MF_ERR_VALUE, "[%s] %s: negative strides are not supported", fn, name);
        last += (t->shape[i] - 1) * t->stride[i];
    }
    int64_t end = t->byte_offset + (last + 1) * (int64_t)mf_dtype_size(t->dtype);
    if (t->mtl_buffer == 0 || t->byte_offset < 0 || end > t->storage_nbytes)
        return mf_fail(err, MF_ERR_VALUE,
                       "[%s] %s: addresses bytes [%lld, %lld) outside its storage of %lld bytes", fn, name,
                       (long long)t->byte_offset, (long long)end, (long long)t->storage_nbytes);
    b->buffer = t->mtl_buffer;
    b->offset = t->byte_offset;
    return MF_OK;
}
