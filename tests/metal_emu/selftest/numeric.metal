/* Self-test kernels for numerics and threadgroup-memory poisoning. */
#include "mf_msl.h"

/* (MF_DTYPE=1) o[0] = running half sum of q[0..seqlen_q); o[1] = q[0] + q[1] + q[2] in one
 * expression; scratch[0] = the same running sum in float. */
#if MF_DTYPE == 1
MF_ATTN_KERNEL(st_half_sum)
{
    if (tid != 0) return;
    half acc = half(0.0f);
    float accf = 0.0f;
    for (int i = 0; i < params.seqlen_q; i++) {
        acc += q[i];
        accf += float(q[i]);
    }
    o[0] = acc;
    o[1] = q[0] + q[1] + q[2];
    scratch[0] = accf;
}
#endif

/* o[i] = MF_T(alibi[i]); scratch[i] = float(MF_T(alibi[i]) * MF_T(alibi[n + i])), n = threads */
MF_ATTN_KERNEL(st_convert)
{
    const uint n = tg_size.x;
    o[tid] = MF_T(alibi[tid]);
    const MF_T a = MF_T(alibi[tid]), b = MF_T(alibi[n + tid]);
    scratch[tid] = float(MF_T(a * b));
}

/* Each threadgroup reads its arrays before writing them: must see the poison every time.
 * scratch[g * 3n + j * n + tid] for j = float, int, half arrays. */
MF_ATTN_KERNEL(st_poison)
{
    MF_THREADGROUP_ARRAY(float, f, 256);
    MF_THREADGROUP_ARRAY(int, iv, 256);
    MF_THREADGROUP_ARRAY(half, hv, 256);
    const uint n = tg_size.x, base = tg_pos.x * 3 * n;
    scratch[base + tid] = f[tid];
    scratch[base + n + tid] = float(iv[tid]);
    scratch[base + 2 * n + tid] = float(hv[tid]);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    f[tid] = 1.0f;
    iv[tid] = 7;
    hv[tid] = half(2.0f);
}

/* elementwise math on x = alibi[tid]; results in scratch[f * n + tid] */
MF_ATTN_KERNEL(st_math)
{
    const uint n = tg_size.x;
    const float x = alibi[tid];
    const float ax = fabs(x) + 1.0f;
    scratch[0 * n + tid] = exp(x);
    scratch[1 * n + tid] = exp2(x);
    scratch[2 * n + tid] = log(ax);
    scratch[3 * n + tid] = log2(ax);
    scratch[4 * n + tid] = tanh(x);
    scratch[5 * n + tid] = rsqrt(ax);
    scratch[6 * n + tid] = fma(x, x, 1.0f);
    scratch[7 * n + tid] = select(x, -x, x < 0.0f);
    scratch[8 * n + tid] = clamp(x, -1.0f, 1.0f);
    scratch[9 * n + tid] = float(as_type<uint>(x) >> 16);
    scratch[10 * n + tid] = max(x, 0.5f) + min(x, -0.5f);
    const float4 v4 = float4{x, 1.0f, 2.0f, 3.0f};
    scratch[11 * n + tid] = dot(v4, v4);
    const float4 s = select(float4(0.0f), float4(1.0f), v4 > float4(1.5f));
    scratch[12 * n + tid] = s.x + s.y + s.z + s.w;
    scratch[13 * n + tid] = fast::exp(x) - precise::exp(x);
    scratch[14 * n + tid] = isinf(x / 0.0f) ? 1.0f : 0.0f;
    scratch[15 * n + tid] = max(numeric_limits<float>::quiet_NaN(), x);
    scratch[16 * n + tid] = float(half(x) * half(3.0f));
    scratch[17 * n + tid] = sqrt(ax);
}

/* vector loads through a reinterpreted pointer, value conversion and swizzles:
 * scratch[4 tid + j] = float(q[4 tid + (3 - j)]) * 2 (j = 0..3); o: the same vector back */
typedef vec<MF_T, 4> mf_t4;
MF_ATTN_KERNEL(st_vectors)
{
    const mf_t4 x = MF_DEVICE_CAST(const mf_t4, q + 4 * tid)[0];
    const float4 f = MF_CONVERT(float4, x);
    const float4 r = f.wzyx * 2.0f;
    MF_DEVICE_CAST(float4, scratch)[tid] = r;
    MF_DEVICE_PTR(mf_t4) out = MF_DEVICE_CAST(mf_t4, o);
    out[tid] = MF_CONVERT(mf_t4, f);
}
