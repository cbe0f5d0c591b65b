/* kv_append.metal - the append + rotary pass of a kv cache call (flash_attn_with_kvcache with
 * new k/v), run before the attention launches of the same plan.
 *
 * Same math as csrc/cpu/kv_append.c (the contract is written there and in mf_params.h). For
 * sequence b and new row t the destination is key position pos = seqused_k[b] + t, addressed
 * exactly as attention addresses keys (dense: cache row kv_index[b] under MF_FLAG_KV_BATCH_IDX,
 * else b; paged: block kv_index[b * block_table_stride_b + pos / page_size], row
 * pos % page_size):
 *   v row: copied bitwise;
 *   k row: copied bitwise, or rotated at pos (rotary_dim > 0) in fp32 and rounded to MF_T;
 *   q row i (rotate_q): rotated at seqused_k[b] + i (q_per_row: causal/local) or seqused_k[b],
 *          from q_src into q_rot (the caller's q is never written).
 * Dims past rotary_dim are copied bitwise. Every element is written by exactly one thread from
 * its own inputs, so the result does not depend on the schedule.
 *
 * Defines: MF_DTYPE (mf_msl.h). Slots: MF_APPEND_KERNEL (mf_params.h, "append pass").
 *
 *   mf_kv_append
 *       threadgroup = (32, 1, 1): lanes over the head dim (rotary pairs, then the other dims)
 *       grid        = (max(heads_k, rotate_q ? heads_q : 0), batch * seqlen_new
 *                      + (rotate_q ? batch * seqlen_q : 0), 1)
 *       tg_pos.y < batch * seqlen_new: new row (b, t) = (y / seqlen_new, y % seqlen_new), kv head
 *       tg_pos.x; after those, q row (b, i) of the rest, query head tg_pos.x. Threadgroups past
 *       the heads of their row return at once.
 * No threadgroup memory, barriers or simd functions.
 */
#include "mf_msl.h" /* includes mf_params.h */

#if MF_DTYPE == 0
typedef uint mf_app_bits; /* the storage bits of one MF_T, for bitwise copies */
#else
typedef ushort mf_app_bits;
#endif

/* dst[d] = src[d] bit for bit, for d in [d0, n), lanes striding by 32 */
static inline void mf_app_copy(MF_DEVICE_PTR(MF_T) dst, MF_DEVICE_PTR(const MF_T) src, int d0, int n,
                               uint lane)
{
    MF_DEVICE_PTR(mf_app_bits) db = MF_DEVICE_CAST(mf_app_bits, dst);
    MF_DEVICE_PTR(const mf_app_bits) sb = MF_DEVICE_CAST(const mf_app_bits, src);
    for (int d = d0 + (int)lane; d < n; d += 32) {
        db[d] = sb[d];
    }
}

/* dst = src rotated with the cos/sin rows c, sn (rotary_dim / 2 entries each) over the first rd
 * dims, in fp32, rounded to MF_T; dims [rd, n) copied bitwise */
static inline void mf_app_rotate(MF_DEVICE_PTR(MF_T) dst, MF_DEVICE_PTR(const MF_T) src,
                                 MF_DEVICE_PTR(const MF_T) c, MF_DEVICE_PTR(const MF_T) sn, int rd,
                                 int interleaved, int n, uint lane)
{
    const int half_rd = rd / 2;
    for (int i = (int)lane; i < half_rd; i += 32) {
        const int i0 = interleaved != 0 ? 2 * i : i;
        const int i1 = interleaved != 0 ? 2 * i + 1 : i + half_rd;
        const float x0 = float(src[i0]);
        const float x1 = float(src[i1]);
        const float cc = float(c[i]);
        const float ss = float(sn[i]);
        dst[i0] = MF_T(x0 * cc - x1 * ss);
        dst[i1] = MF_T(x0 * ss + x1 * cc);
    }
    mf_app_copy(dst, src, rd, n, lane);
}

MF_APPEND_KERNEL(mf_kv_append)
{
    const long task = (long)tg_pos.y;
    const int head = (int)tg_pos.x;
    const int snew = aparams.seqlen_new;
    const long kv_tasks = (long)params.batch * (long)snew;
    const int rd = aparams.rotary_dim;
    if (task < kv_tasks) {
        if (head >= params.heads_k) {
            return;
        }
        const int b = (int)(task / snew);
        const int t = (int)(task - (long)b * snew);
        const int pos = seqused_k[b] + t;
        long kb;
        long row;
        if ((params.flags & MF_FLAG_PAGED) != 0) {
            const int page = pos / params.page_size;
            kb = (long)kv_index[(long)b * params.block_table_stride_b + page];
            row = (long)(pos - page * params.page_size);
        } else {
            kb = (params.flags & MF_FLAG_KV_BATCH_IDX) != 0 ? (long)kv_index[b] : (long)b;
            row = (long)pos;
        }
        const long g = (long)head;
        MF_DEVICE_PTR(MF_T) kd = k_cache + kb * params.k_stride_b + row * params.k_stride_s +
                                 g * params.k_stride_h;
        MF_DEVICE_PTR(MF_T) vd = v_cache + kb * params.v_stride_b + row * params.v_stride_s +
                                 g * params.v_stride_h;
        MF_DEVICE_PTR(const MF_T) ks = k_new + (long)b * aparams.kn_stride_b +
                                       (long)t * aparams.kn_stride_s + g * aparams.kn_stride_h;
        MF_DEVICE_PTR(const MF_T) vs = v_new + (long)b * aparams.vn_stride_b +
                                       (long)t * aparams.vn_stride_s + g * aparams.vn_stride_h;
        mf_app_copy(vd, vs, 0, params.head_dim_v, lane);
        if (rd > 0) {
            mf_app_rotate(kd, ks, rotary_cos + (long)pos * aparams.cos_stride,
                          rotary_sin + (long)pos * aparams.sin_stride, rd, aparams.interleaved,
                          params.head_dim, lane);
        } else {
            mf_app_copy(kd, ks, 0, params.head_dim, lane);
        }
        return;
    }
    if (aparams.rotate_q == 0 || head >= params.heads_q || params.seqlen_q <= 0) {
        return;
    }
    const long qt = task - kv_tasks;
    const int b = (int)(qt / params.seqlen_q);
    const int i = (int)(qt - (long)b * params.seqlen_q);
    if (b >= params.batch) {
        return;
    }
    const int pos = seqused_k[b] + (aparams.q_per_row != 0 ? i : 0);
    const long h = (long)head;
    MF_DEVICE_PTR(const MF_T) qs = q_src + (long)b * aparams.qs_stride_b +
                                   (long)i * aparams.qs_stride_s + h * aparams.qs_stride_h;
    MF_DEVICE_PTR(MF_T) qd = q_rot + (long)b * params.q_stride_b + (long)i * params.q_stride_s +
                             h * params.q_stride_h;
    mf_app_rotate(qd, qs, rotary_cos + (long)pos * aparams.cos_stride,
                  rotary_sin + (long)pos * aparams.sin_stride, rd, aparams.interleaved,
                  params.head_dim, lane);
}
