/* dispatch.c - see dispatch.h.
 *
 * Which tiers can serve (mf_metal_tier_serves; also what MTLFLASH_KERNEL may force):
 *
 *   tier       | serves when
 *   -----------+------------------------------------------------------------------------------
 *   tensorops  | never yet (not implemented)
 *   simdgroup  | Apple7+ (every M-series GPU); head dims <= 256
 *   vec        | Apple7+ (32-wide simdgroups, simd_sum); head dims <= 256
 *   (all)      | bfloat16 inputs need Metal 3.1 (macOS 14)
 *
 * Automatic choice (mf_metal_choose): decode shapes (at most MF_DECODE_ROWS query rows per
 * sequence) go to vec, whose split-KV path keeps the GPU busy over long key sequences; prefill
 * goes to simdgroup where it serves, else vec.
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

/* simdgroup tier tiles (attn_simdgroup.metal): 8 query rows per simdgroup, rows padded by
 * MF_SG_PAD elements in threadgroup memory, at most 32 KiB of it */
#define MF_SG_PAD 4
#define MF_TG_MEMORY_MAX 32768

static uint32_t ceil_div(uint64_t a, uint64_t b) { return (uint32_t)((a + b - 1) / b); }

int mf_metal_vec_splits(const mf_params *p) {
    int64_t rows = (int64_t)p->batch * p->heads_q * p->seqlen_q;
    if (p->seqlen_k < MF_VEC_SPLIT_MIN_KEYS || rows > MF_VEC_SPLIT_MAX_ROWS) return 1;
    int s = (int)ceil_div((uint64_t)p->seqlen_k, MF_VEC_SPLIT_KEYS);
    return s > MF_VEC_MAX_SPLITS ? MF_VEC_MAX_SPLITS : s;
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
    /* vec and simdgroup alike: 32-wide simdgroups (simd_sum, simdgroup_matrix), head dims <= 256 */
    if (caps->apple_family < 7) {
        snprintf(reason, n, "the Metal kernels need an Apple7+ GPU (M1 or newer), this one is Apple%d",
                 caps->apple_family);
        return 0;
    }
    if (pb->dtype == MF_BF16 && !caps->bfloat) {
        snprintf(reason, n, "bfloat16 needs Metal 3.1 (macOS 14 or newer)");
        return 0;
    }
    if (pb->p.head_dim > 256 || pb->p.head_dim_v > 256) {
        snprintf(reason, n, "head dims above 256");
        return 0;
    }
    if ((pb->p.flags & (MF_FLAG_PAGED | MF_FLAG_KV_BATCH_IDX | MF_FLAG_SEQUSED_K | MF_FLAG_LEFTPAD_K)) ||
        pb->app.present) {
        snprintf(reason, n, "kv caches and paged K/V are not served by the Metal kernels yet");
        return 0;
    }
    return 1;
}

mf_tier mf_metal_choose(const mf_problem *pb, const mf_metal_caps *caps) {
    char reason[160];
    if (pb->p.seqlen_q > MF_DECODE_ROWS && mf_metal_tier_serves(MF_TIER_SIMDGROUP, pb, caps, reason, sizeof reason))
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

static int vec_max_d(const mf_params *p) {
    int d = p->head_dim > p->head_dim_v ? p->head_dim : p->head_dim_v;
    return d <= 64 ? 64 : d <= 128 ? 128 : 256;
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
    plan->tier = tier;
    plan->params = pb->p;
    mf_params *p = &plan->params;
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
    plan->n_defines = 2;
    plan->defines[0] = (mf_metal_define){"MF_DTYPE", (int)pb->dtype};
    plan->defines[1] = (mf_metal_define){"MF_MAX_D", vec_max_d(p)};
    uint64_t pairs = (uint64_t)p->heads_q * (uint64_t)p->seqlen_q;
    uint32_t rows = pairs < MF_VEC_ROWS ? (uint32_t)(pairs ? pairs : 1) : MF_VEC_ROWS;
    uint32_t gx = ceil_div(pairs, rows);
    if (gx == 0 || p->batch == 0) {
        plan->n_launches = 0; /* nothing to do */
        return MF_OK;
    }
    int splits = mf_metal_vec_splits(p);
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
