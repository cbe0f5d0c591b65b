/* dispatch.h - everything about a Metal launch that can be decided without a GPU: which Metal
 * tier serves a problem on a device with given capabilities, which kernel source and defines it
 * compiles with, the grid and threadgroup of each launch, and the scratch buffer. Plain C, tested
 * on Linux; the bridge (bridge.m) only executes the plan. */
#ifndef MF_METAL_DISPATCH_H
#define MF_METAL_DISPATCH_H

#include <stdint.h>

#include "plan.h"

/* What the device offers (filled by the bridge from the MTLDevice; by tests from a table). */
typedef struct mf_metal_caps {
    int apple_family;    /* highest MTLGPUFamilyAppleN supported: 7 = M1 ... 10 = M5 (0: unknown) */
    int bfloat;          /* bfloat in MSL: Metal 3.1, macOS 14+ */
    int tensorops;       /* MetalPerformancePrimitives probe passed (macOS 26.2+, Metal 4) */
} mf_metal_caps;

#define MF_METAL_MAX_DEFINES 6
#define MF_METAL_MAX_LAUNCHES 2

typedef struct mf_metal_define {
    const char *name;
    int value;
} mf_metal_define;

typedef struct mf_metal_launch {
    const char *kernel;
    uint32_t grid[3];        /* threadgroups per grid */
    uint32_t threadgroup[3]; /* threads per threadgroup */
} mf_metal_launch;

/* The append + rotary pass of a kv cache call: one launch of its own kernel source
 * (kv_append.metal), encoded before the attention launches in the same command buffer, with a
 * buffer barrier in between (its cache writes are visible to them). Slots: mf_params.h, "append
 * pass"; slot 8 is `params` (setBytes), slot 9 the plan's params. */
typedef struct mf_metal_append {
    int present;
    const char *source; /* file in metal/ */
    int n_defines;
    mf_metal_define defines[MF_METAL_MAX_DEFINES];
    mf_metal_launch launch;
    mf_append_params params;
} mf_metal_append;

typedef struct mf_metal_plan {
    mf_tier tier;
    const char *source; /* file in metal/ */
    int n_defines;
    mf_metal_define defines[MF_METAL_MAX_DEFINES];
    mf_metal_append append; /* runs first when present */
    int n_launches; /* run in order, in one command buffer */
    mf_metal_launch launches[MF_METAL_MAX_LAUNCHES];
    uint64_t scratch_floats;      /* fp32 scratch bound at MF_SLOT_SCRATCH (0: none) */
    uint32_t threadgroup_memory;  /* static threadgroup memory of the kernel, bytes */
    mf_params params;             /* the problem's params with the split fields set */
} mf_metal_plan;

/* One bound buffer: the MTLBuffer handle (0 = unbound: the bridge binds a dummy) and the byte
 * offset of the tensor's first element in it. */
typedef struct mf_metal_binding {
    uint64_t buffer;
    int64_t offset;
} mf_metal_binding;

/* The binding of an MPS tensor view, after checking that every element it addresses lies
 * inside its storage. An absent view gives an unbound slot. */
int mf_metal_bind(const mf_tensor *t, const char *fn, const char *name, mf_metal_binding *b, mf_error *err);

/* Does `tier` (a Metal tier) serve this problem on this device? 1, or 0 with the reason. */
int mf_metal_tier_serves(mf_tier tier, const mf_problem *pb, const mf_metal_caps *caps, char *reason,
                         size_t reason_len);

/* The tier the automatic choice takes on this device (MF_NUM_TIERS when no Metal tier serves). */
mf_tier mf_metal_choose(const mf_problem *pb, const mf_metal_caps *caps);

/* The launch plan of a problem on a Metal tier that serves it. */
int mf_metal_plan_make(const mf_problem *pb, mf_tier tier, const mf_metal_caps *caps, mf_metal_plan *plan,
                       mf_error *err);

/* Key splits for the vec tier: 1 (no split) unless few rows meet many keys (decode, or 9-64
 * query rows per sequence against a long cache); a kv cache call's num_splits (1: never, n > 1:
 * n splits) overrides the heuristic. */
int mf_metal_vec_splits(const mf_problem *pb);

#endif /* MF_METAL_DISPATCH_H */
