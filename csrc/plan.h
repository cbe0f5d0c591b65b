/* plan.h - chooses the tier that runs a problem, honouring MTLFLASH_KERNEL. */
#ifndef MF_PLAN_H
#define MF_PLAN_H

#include "problem.h"

typedef enum mf_tier {
    MF_TIER_CPU = 0,
    MF_TIER_VEC,
    MF_TIER_SIMDGROUP,
    MF_TIER_TENSOROPS,
    MF_TIER_REFERENCE,
    MF_NUM_TIERS
} mf_tier;

typedef struct mf_plan {
    mf_tier tier;
    int num_threads; /* cpu tier */
} mf_plan;

const char *mf_tier_name(mf_tier tier);

/* Is the tier usable in this build/process at all? Returns 1, or 0 with the reason. */
int mf_tier_available(mf_tier tier, char *reason, size_t reason_len);

/* Can the tier run this problem? Returns 1, or 0 with the reason. */
int mf_tier_supports(mf_tier tier, const mf_problem *pb, char *reason, size_t reason_len);

/* `forced` is the MTLFLASH_KERNEL value (NULL or "" or "auto" for automatic choice). */
int mf_plan_choose(const mf_problem *pb, const char *forced, mf_plan *plan, mf_error *err);

/* The tier of a backward problem: cpu for CPU tensors and NumPy arrays, reference (torch on the
 * same device) for MPS tensors: the Metal tiers have no backward kernels yet. MTLFLASH_KERNEL=cpu
 * or reference forces that tier; a forced Metal tier serves the forward only, so its backward runs
 * on the reference tier. */
int mf_plan_choose_backward(const mf_problem *pb, const char *forced, mf_plan *plan, mf_error *err);

/* Turns the Metal tiers off for the rest of the process (after a failed automatic launch). */
void mf_plan_disable_metal(const char *why);

/* CPU threads to use: MTLFLASH_NUM_THREADS, else the number of online cores. */
int mf_plan_num_threads(mf_error *err);

/* How Metal work reaches the GPU: MTLFLASH_DISPATCH=queue (default) or stream. */
typedef enum mf_dispatch { MF_DISPATCH_QUEUE = 0, MF_DISPATCH_STREAM = 1 } mf_dispatch;
int mf_plan_dispatch(mf_dispatch *mode, mf_error *err);

/* MTLFLASH_CPU_ISA: unset, generic, avx2 or best; any other value is an error listing the valid ones. */
int mf_plan_check_cpu_isa(mf_error *err);

#endif /* MF_PLAN_H */
