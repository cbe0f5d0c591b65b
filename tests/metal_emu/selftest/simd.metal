/* Self-test kernels for the simd functions: x = alibi[tid], shuffle sources = cu_seqlens_q[tid],
 * results in scratch[f * n + tid] for function f (n = threads per threadgroup). */
#include "mf_msl.h"

MF_ATTN_KERNEL(st_simd_ops)
{
    const uint n = tg_size.x;
    const MF_T x = MF_T(alibi[tid]);
    const float xf = float(x);
    const ushort src = ushort(cu_seqlens_q[tid]);
    scratch[0 * n + tid] = float(simd_sum(x));
    scratch[1 * n + tid] = float(simd_max(x));
    scratch[2 * n + tid] = float(simd_min(x));
    scratch[3 * n + tid] = float(simd_prefix_exclusive_sum(x));
    scratch[4 * n + tid] = float(simd_prefix_inclusive_sum(x));
    scratch[5 * n + tid] = float(simd_shuffle(x, src));
    scratch[6 * n + tid] = float(simd_shuffle_xor(x, ushort(5)));
    scratch[7 * n + tid] = float(simd_shuffle_down(x, ushort(3)));
    scratch[8 * n + tid] = float(simd_shuffle_up(x, ushort(3)));
    scratch[9 * n + tid] = float(simd_broadcast(x, ushort(7)));
    scratch[10 * n + tid] = float(simd_broadcast_first(x));
    scratch[11 * n + tid] = simd_all(xf > -100.0f) ? 1.0f : 0.0f;
    scratch[12 * n + tid] = simd_any(xf > 5.0f) ? 1.0f : 0.0f;
    scratch[13 * n + tid] = simd_is_first() ? 1.0f : 0.0f;
    const float4 v4 = float4{xf, xf + 1.0f, xf * 2.0f, -xf};
    const float4 w = simd_shuffle_xor(v4, ushort(1));
    scratch[14 * n + tid] = w.x + w.y * 10.0f + w.z * 100.0f + w.w * 1000.0f;
    const float2 s2 = simd_sum(float2{xf, 2.0f * xf});
    scratch[15 * n + tid] = s2.y;
    scratch[16 * n + tid] = float(simd_max(int(src)));
}

/* the functions that are defined on a partial simdgroup too */
MF_ATTN_KERNEL(st_simd_partial)
{
    const uint n = tg_size.x;
    const MF_T x = MF_T(alibi[tid]);
    scratch[0 * n + tid] = float(simd_sum(x));
    scratch[1 * n + tid] = float(simd_max(x));
    scratch[2 * n + tid] = float(simd_min(x));
    scratch[3 * n + tid] = float(simd_prefix_exclusive_sum(x));
    scratch[4 * n + tid] = float(simd_prefix_inclusive_sum(x));
    scratch[5 * n + tid] = float(simd_broadcast(x, ushort(7)));
    scratch[6 * n + tid] = float(simd_shuffle_xor(x, ushort(1)));
}

MF_ATTN_KERNEL(st_shuffle_bad_lane)
{
    scratch[tid] = simd_shuffle(float(lane), ushort(cu_seqlens_q[tid]));
}

MF_ATTN_KERNEL(st_broadcast_nonuniform)
{
    scratch[tid] = simd_broadcast(float(lane), ushort(lane & 1));
}
