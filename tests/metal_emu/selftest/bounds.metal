/* Self-test kernels for the bounds and limit checks. params.seqlen_q = elements to touch. */
#include "mf_msl.h"

MF_ATTN_KERNEL(st_read)
{
    float acc = 0.0f;
    for (int i = 0; i < params.seqlen_q; i++) acc += float(q[i]);
    if (tid == 0) o[0] = MF_T(acc);
}

MF_ATTN_KERNEL(st_write)
{
    if (tid == 0)
        for (int i = 0; i < params.seqlen_q; i++) o[i] = MF_T(float(i));
}

MF_ATTN_KERNEL(st_read_before_start)
{
    MF_DEVICE_PTR(const MF_T) p = q + 4;
    if (tid == 0) o[0] = p[-params.seqlen_q];
}

MF_ATTN_KERNEL(st_read_unbound)
{
    if (tid == 0) o[0] = MF_T(alibi[0]);
}

MF_ATTN_KERNEL(st_threadgroup_index)
{
    MF_THREADGROUP_ARRAY(float, t, 64);
    t[tid] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) o[0] = MF_T(t[params.seqlen_q]);
}

MF_ATTN_KERNEL(st_misaligned_vector)
{
    MF_DEVICE_PTR(const float4) v4 = MF_DEVICE_CAST(const float4, scratch + params.seqlen_q);
    float4 x = v4[0];
    if (tid == 0) o[0] = MF_T(x.x + x.y + x.z + x.w);
}

/* 8200 floats = 32800 bytes: over the 32 KiB limit on its own */
MF_ATTN_KERNEL(st_threadgroup_too_big)
{
    MF_THREADGROUP_ARRAY(float, big, 8200);
    big[tid] = 0.0f;
    o[tid] = MF_T(big[tid]);
}

/* two arrays of 20000 bytes each: over the limit together */
MF_ATTN_KERNEL(st_threadgroup_two_arrays)
{
    MF_THREADGROUP_ARRAY(float, a, 5000);
    MF_THREADGROUP_ARRAY(float, b, 5000);
    a[tid] = 0.0f;
    b[tid] = 0.0f;
    o[tid] = MF_T(a[tid] + b[tid]);
}

/* exactly 32 KiB: allowed */
MF_ATTN_KERNEL(st_threadgroup_at_limit)
{
    MF_THREADGROUP_ARRAY(float, a, 4096);
    MF_THREADGROUP_ARRAY(half, b, 8192);
    a[tid] = 1.0f;
    b[tid] = half(2.0f);
    o[tid] = MF_T(a[tid] + float(b[tid]));
}

/* writes one value per thread, for the thread-count limit */
MF_ATTN_KERNEL(st_count_threads)
{
    scratch[tg_pos.x * tg_size.x * tg_size.y * tg_size.z + tid] = float(tid);
}

/* a private array indexed past its end (caught by the array-bounds trap) */
MF_ATTN_KERNEL(st_private_index)
{
    float acc[4] = {0.0f, 1.0f, 2.0f, 3.0f};
    const int i = params.seqlen_q;
    scratch[tid] = acc[i];
}

/* a private array too big for the fiber stack */
MF_ATTN_KERNEL(st_stack_overflow)
{
    float big[200000];
    for (int i = 0; i < params.seqlen_q; i++) big[i] = float(i);
    scratch[tid] = big[params.seqlen_q - 1];
}

/* integer division by zero */
MF_ATTN_KERNEL(st_int_div_zero)
{
    scratch[tid] = float(int(tid + 7) / params.seqlen_q);
}

/* runs until a threshold that is never reached when params.seqlen_q = 0 (watchdog) */
MF_ATTN_KERNEL(st_endless)
{
    float acc = 0.0f;
    uint steps = 0;
    while (acc < 1.0f) {
        acc += float(params.seqlen_q) * 1.0e-3f;
        steps++;
        scratch[tid] = float(steps);
    }
    scratch[tid] = acc;
}

/* the kv-layout slots 10..12 of MF_ATTN_KERNEL */
MF_ATTN_KERNEL(st_kv_slots)
{
    if (tid == 0) {
        o[0] = MF_T(float(kv_index[0]));
        o[1] = MF_T(float(seqused_k[0]));
        o[2] = MF_T(float(leftpad_k[params.seqlen_q]));
    }
}

/* the append kernel's own slots: its params struct (slot 8) and the shared ones */
MF_APPEND_KERNEL(st_append_slots)
{
    if (tid == 0) {
        k_cache[0] = MF_T(float(aparams.rotary_dim));
        v_cache[0] = MF_T(float(aparams.seqlen_new) + float(kv_index[0]) + float(seqused_k[0]));
        q_rot[0] = MF_T(float(q_src[0]) + float(k_new[0]) + float(v_new[0]) + float(rotary_cos[0]) +
                        float(rotary_sin[0]) + float(params.head_dim));
    }
}
