/* plan.c - which tier runs a problem.
 *
 *   device  | auto choice                                   | MTLFLASH_KERNEL=<tier>
 *   cpu     | cpu                                           | cpu or reference; Metal tiers refuse
 *   mps     | mf_metal_choose (metal/dispatch.c): vec for    | that tier, or an error with the reason
 *           | decode, simdgroup for prefill; else reference  |
 *           | (torch on the same device)                     |
 *
 * Forcing a tier that cannot run raises with the reason; nothing silently runs something else. */
#include "plan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "metal/bridge.h"
#include "metal/dispatch.h"

static const char *const g_tier_names[MF_NUM_TIERS] = {"cpu", "vec", "simdgroup", "tensorops",
                                                       "reference"};

const char *mf_tier_name(mf_tier tier) {
    return (tier >= 0 && tier < MF_NUM_TIERS) ? g_tier_names[tier] : "?";
}

static int is_metal_tier(mf_tier t) {
    return t == MF_TIER_VEC || t == MF_TIER_SIMDGROUP || t == MF_TIER_TENSOROPS;
}

/* Set when a Metal launch failed under the automatic choice: the Metal tiers then stay off for
 * the process (MPS calls run on the reference tier) and report this reason. */
static char g_metal_disabled[400];

void mf_plan_disable_metal(const char *why) {
    snprintf(g_metal_disabled, sizeof g_metal_disabled, "disabled after an error in this process: %s", why);
}

int mf_tier_available(mf_tier tier, char *reason, size_t n) {
    if (is_metal_tier(tier) && g_metal_disabled[0] != '\0') {
        snprintf(reason, n, "%s", g_metal_disabled);
        return 0;
    }
    if (is_metal_tier(tier)) return mf_metal_available(reason, n);
    snprintf(reason, n, "%s", tier == MF_TIER_CPU ? "always available" : "runs wherever torch runs");
    return 1;
}

int mf_tier_supports(mf_tier tier, const mf_problem *pb, char *reason, size_t n) {
    if (!mf_tier_available(tier, reason, n)) return 0;
    switch (tier) {
    case MF_TIER_CPU:
        if (pb->device != MF_DEV_CPU) {
            snprintf(reason, n, "the cpu tier runs on CPU tensors and NumPy arrays, but the inputs are on %s",
                     mf_device_name(pb->device));
            return 0;
        }
        return 1;
    case MF_TIER_REFERENCE:
        if (pb->tq.is_numpy) {
            snprintf(reason, n, "the reference tier runs in torch, but the inputs are NumPy arrays");
            return 0;
        }
        return 1;
    default: /* Metal tiers */
        if (pb->drop.on) {
            snprintf(reason, n, "the %s tier has no dropout (the cpu and reference tiers have)", mf_tier_name(tier));
            return 0;
        }
        if (pb->device != MF_DEV_MPS) {
            snprintf(reason, n, "the %s tier runs on MPS tensors, but the inputs are on %s",
                     mf_tier_name(tier), mf_device_name(pb->device));
            return 0;
        }
        {
            mf_metal_caps caps;
            if (mf_metal_caps_of(pb->tq.mtl_buffer, &caps, reason, n) != 0) return 0;
            return mf_metal_tier_serves(tier, pb, &caps, reason, n);
        }
    }
}

int mf_plan_num_threads(mf_error *err) {
    const char *env = getenv("MTLFLASH_NUM_THREADS");
    if (env != NULL && *env != '\0') {
        char *end = NULL;
        long v = strtol(env, &end, 10);
        if (*end != '\0' || v < 1 || v > 1024)
            return -mf_fail(err, MF_ERR_VALUE,
                            "MTLFLASH_NUM_THREADS: expected an integer between 1 and 1024, got '%s'", env);
        return (int)v;
    }
    /* sysconf reads /sys on every call (~10 us), so the count of online cores is taken once */
    static int cores;
    int c = __atomic_load_n(&cores, __ATOMIC_RELAXED);
    if (c == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        c = n < 1 ? 1 : (n > 1024 ? 1024 : (int)n);
        __atomic_store_n(&cores, c, __ATOMIC_RELAXED);
    }
    return c;
}

int mf_plan_choose(const mf_problem *pb, const char *forced, mf_plan *plan, mf_error *err) {
    char reason[256];
    memset(plan, 0, sizeof *plan);
    int nt = mf_plan_num_threads(err);
    if (nt < 0) return err->kind;
    plan->num_threads = nt;
    mf_dispatch mode; /* checked on every call, so a typo shows on any machine */
    if (mf_plan_dispatch(&mode, err)) return err->kind;
    if (mf_plan_check_cpu_isa(err)) return err->kind;

    if (forced != NULL && *forced != '\0' && strcmp(forced, "auto") != 0) {
        for (int t = 0; t < MF_NUM_TIERS; t++) {
            if (strcmp(forced, g_tier_names[t]) != 0) continue;
            if (!mf_tier_supports((mf_tier)t, pb, reason, sizeof reason))
                return mf_fail(err, MF_ERR_RUNTIME, "[%s] MTLFLASH_KERNEL=%s cannot run this call: %s",
                               pb->fn, forced, reason);
            plan->tier = (mf_tier)t;
            return MF_OK;
        }
        return mf_fail(err, MF_ERR_VALUE,
                       "MTLFLASH_KERNEL: unknown tier '%s'; valid values: auto, cpu, vec, simdgroup, "
                       "tensorops, reference", forced);
    }
    if (pb->device == MF_DEV_CPU) {
        plan->tier = MF_TIER_CPU;
        return MF_OK;
    }
    /* MPS: the Metal tier the device and shape call for, else torch on the same device */
    plan->tier = MF_TIER_REFERENCE;
    mf_metal_caps caps;
    if (pb->device == MF_DEV_MPS && !pb->drop.on && mf_tier_available(MF_TIER_VEC, reason, sizeof reason) &&
        mf_metal_caps_of(pb->tq.mtl_buffer, &caps, reason, sizeof reason) == 0) {
        mf_tier t = mf_metal_choose(pb, &caps);
        if (t != MF_NUM_TIERS) plan->tier = t;
    }
    return MF_OK;
}

int mf_plan_choose_backward(const mf_problem *pb, const char *forced, mf_plan *plan, mf_error *err) {
    char reason[256];
    memset(plan, 0, sizeof *plan);
    int nt = mf_plan_num_threads(err);
    if (nt < 0) return err->kind;
    plan->num_threads = nt;
    mf_tier want = pb->device == MF_DEV_CPU ? MF_TIER_CPU : MF_TIER_REFERENCE;
    if (forced != NULL && *forced != '\0' && strcmp(forced, "auto") != 0) {
        int t = 0;
        while (t < MF_NUM_TIERS && strcmp(forced, g_tier_names[t]) != 0) t++;
        if (t == MF_NUM_TIERS)
            return mf_fail(err, MF_ERR_VALUE, "MTLFLASH_KERNEL: unknown tier '%s'; valid values: auto, cpu, vec, "
                           "simdgroup, tensorops, reference", forced);
        if (t == MF_TIER_CPU || t == MF_TIER_REFERENCE) want = (mf_tier)t;
        else if (pb->device == MF_DEV_CPU) /* a Metal tier cannot run on CPU tensors at all */
            return mf_fail(err, MF_ERR_RUNTIME, "[%s] MTLFLASH_KERNEL=%s cannot run this call: the %s tier runs on "
                           "MPS tensors, but the inputs are on cpu", pb->fn, forced, forced);
    }
    if (!mf_tier_supports(want, pb, reason, sizeof reason))
        return mf_fail(err, MF_ERR_RUNTIME, "[%s] the backward pass cannot run on the %s tier: %s", pb->fn,
                       mf_tier_name(want), reason);
    plan->tier = want;
    return MF_OK;
}

int mf_plan_dispatch(mf_dispatch *mode, mf_error *err) {
    const char *env = getenv("MTLFLASH_DISPATCH");
    *mode = MF_DISPATCH_QUEUE;
    if (env == NULL || *env == '\0' || strcmp(env, "queue") == 0) return MF_OK;
    if (strcmp(env, "stream") == 0) {
        *mode = MF_DISPATCH_STREAM;
        return MF_OK;
    }
    return mf_fail(err, MF_ERR_VALUE, "MTLFLASH_DISPATCH: unknown value '%s'; valid values: queue, stream", env);
}

int mf_plan_check_cpu_isa(mf_error *err) {
    /* read by the CPU backend when it picks its path (cpu/kernel_generic.c); validated here, on
     * every call, like the other variables */
    const char *env = getenv("MTLFLASH_CPU_ISA");
    if (env == NULL || *env == '\0' || strcmp(env, "generic") == 0 || strcmp(env, "avx2") == 0 ||
        strcmp(env, "best") == 0)
        return MF_OK;
    return mf_fail(err, MF_ERR_VALUE,
                   "MTLFLASH_CPU_ISA: unknown value '%s'; valid values: generic, avx2, best (the "
                   "default: the best path this CPU has)", env);
}
