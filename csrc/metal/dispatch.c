/* dispatch.c - see dispatch.h.
 *
 * Tier choice on an Apple GPU (mf_plan_choose tries tensorops, then simdgroup, then vec):
 *
 *   tier       | serves when
 *   -----------+------------------------------------------------------------------------------
 *   tensorops  | never yet (not implemented)
 *   simdgroup  | not yet dispatched (its kernel is verified in the emulator only)
 *   vec        | any Apple GPU; bfloat inputs need Metal 3.1 (macOS 14); head dims <= 256
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

static uint32_t ceil_div(uint64_t a, uint64_t b) { return (uint32_t)((a + b - 1) / b); }

int mf_metal_vec_splits(const mf_params *p) {
    int64_t rows = (int64_t)p->batch * p->heads_q * p->seqlen_q;
    if (p->seqlen_k < MF_VEC_SPLIT_MIN_KEYS || rows > MF_VEC_SPLIT_MAX_ROWS) return 1;
    int s = (int)ceil_div((uint64_t)p->seqlen_k, MF_VEC_SPLIT_KEYS);
    return s > MF_VEC_MAX_SPLITS ? MF_VEC_MAX_SPLITS : s;
}

int mf_metal_tier_serves(mf_tier tier, const mf_problem *pb, const mf_metal_caps *caps, char *reason,
                         size_t n) {
    if (pb->dtype == MF_BF16 && !caps->bfloat) {
        snprintf(reason, n, "bfloat16 needs Metal 3.1 (macOS 14 or newer)");
        return 0;
    }
    switch (tier) {
    case MF_TIER_VEC:
        if (pb->p.head_dim > 256 || pb->p.head_dim_v > 256) {
            snprintf(reason, n, "head dims above 256");
            return 0;
        }
        return 1;
    case MF_TIER_SIMDGROUP:
        snprintf(reason, n, "the simdgroup tier is not dispatched yet");
        return 0;
    case MF_TIER_TENSOROPS:
        snprintf(reason, n, "the tensorops tier is not implemented yet");
        return 0;
    default:
        snprintf(reason, n, "not a Metal tier");
        return 0;
    }
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
    plan->tier = tier;
    plan->params = pb->p;
    mf_params *p = &plan->params;
    /* tier == MF_TIER_VEC (the only one served so far) */
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
