/* Self-test kernels for the synchronisation checks (tests/test_metal_emu_selftest.py). */
#include "mf_msl.h"

/* Each thread reads the value its left neighbour wrote. Without the barrier the result depends
 * on the order threads run in: right under the forward schedule, poisoned under others. */
MF_ATTN_KERNEL(st_neighbour_no_barrier)
{
    MF_THREADGROUP_ARRAY(float, vals, 1024);
    const uint n = tg_size.x * tg_size.y * tg_size.z;
    const uint base = tg_pos.x * n;
    vals[tid] = float(q[base + tid]);
    const uint left = tid == 0 ? 0 : tid - 1;
    o[base + tid] = MF_T(vals[left] + 1.0f);
}

MF_ATTN_KERNEL(st_neighbour_barrier)
{
    MF_THREADGROUP_ARRAY(float, vals, 1024);
    const uint n = tg_size.x * tg_size.y * tg_size.z;
    const uint base = tg_pos.x * n;
    vals[tid] = float(q[base + tid]);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint left = tid == 0 ? 0 : tid - 1;
    o[base + tid] = MF_T(vals[left] + 1.0f);
}

/* Two barriers on different lines, taken by different threads. */
MF_ATTN_KERNEL(st_divergent_barrier)
{
    if (tid < 16) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    } else {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    o[tid] = MF_T(1.0f);
}

/* Some threads return early while the others wait at a barrier. */
MF_ATTN_KERNEL(st_barrier_after_return)
{
    if (tid >= 40) return;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    o[tid] = MF_T(1.0f);
}

/* One barrier line, reached through a function called from two branches. */
inline void shared_sync() { threadgroup_barrier(mem_flags::mem_threadgroup); }

MF_ATTN_KERNEL(st_divergent_callee)
{
    if (tid & 1) {
        shared_sync();
    } else {
        shared_sync();
    }
    o[tid] = MF_T(1.0f);
}

/* A barrier in a loop whose trip count differs between threads. */
MF_ATTN_KERNEL(st_barrier_loop_count)
{
    float acc = 0.0f;
    for (uint i = 0; i < 2 + (tid / 32); i++) {
        acc += 1.0f;
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    o[tid] = MF_T(acc);
}

/* Lanes of one simdgroup calling different collectives. */
MF_ATTN_KERNEL(st_divergent_simd)
{
    float x = float(lane);
    if (lane < 16)
        x = simd_sum(x);
    else
        x = simd_max(x);
    o[tid] = MF_T(x);
}

/* Half of the lanes skip a collective the others take. */
MF_ATTN_KERNEL(st_partial_simd)
{
    float x = float(lane);
    if (lane < 16) x = simd_sum(x);
    o[tid] = MF_T(x);
}

/* A collective taken by whole simdgroups only (simdgroup-uniform branch): legal. */
MF_ATTN_KERNEL(st_uniform_simd_branch)
{
    float x = float(lane);
    if (sg == 1) x = simd_sum(x);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    o[tid] = MF_T(x);
}

/* simdgroup_barrier reached by only some lanes. */
MF_ATTN_KERNEL(st_divergent_simdgroup_barrier)
{
    if (lane != 5) simdgroup_barrier(mem_flags::mem_none);
    o[tid] = MF_T(1.0f);
}
