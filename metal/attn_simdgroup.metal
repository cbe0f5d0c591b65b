/* attn_simdgroup.metal - the simdgroup tier: FlashAttention-2 on 8x8 simdgroup matrices.
 *
 * Apple7+ GPUs (every M-series chip). Written in the dual-compile subset (docs: metal.md
 * section 6), so the same source runs under the emulator in tests/metal_emu/.
 *
 * Work split: a threadgroup owns one (batch entry, head, tile of MF_BQ = 8 * MF_SG query rows);
 * simdgroup s of it owns rows [8 s, 8 s + 8) of the tile. The threadgroup walks the keys its
 * rows can see in blocks of MF_BK:
 *   1. stage K^T of the block (MF_D x MF_BK) in threadgroup memory; barrier
 *   2. S = Q K^T (8 x MF_BK per simdgroup, fp32 simdgroup matrices), then the online softmax:
 *      scale (and softcap, ALiBi, mask) in fp32 in log2 units, row maxima from thread_elements()
 *      reduced with simd_shuffle_xor 1 then 8, P = exp2(S - m) in place; barrier
 *   3. stage V of the block (MF_BK x MF_DV) in the same buffer; barrier
 *   4. O += P V (8 x MF_DV per simdgroup, fp32 simdgroup matrices); barrier (next block's K)
 * Q is staged once, before the first block. Key blocks outside the union of the visible ranges
 * of the tile's rows are never visited; a simdgroup whose own rows see nothing of a block skips
 * its math for that block; the element mask is applied only where some (row, key) pair of the
 * simdgroup's block is hidden (window/causal boundary, or keys past the sequence end).
 *
 * Defines (compile time; the host passes all of them):
 *   MF_DTYPE 0 | 1 | 2   storage type MF_T of q, k, v, o: float | half | bfloat (mf_msl.h)
 *   MF_D                 head_dim rounded up to a multiple of 8 (8..256). Staged rows are padded
 *                        with zeros from head_dim up to MF_D, so any head_dim <= MF_D is correct.
 *   MF_DV                head_dim_v rounded up to a multiple of 8 (8..256), likewise.
 *   MF_SG                simdgroups per threadgroup (1..4): MF_BQ = 8 * MF_SG query rows
 *   MF_BK                keys per block: 8, 16 or 32
 *   (defaults: MF_D 128, MF_DV = MF_D, MF_SG 4, MF_BK 32 when MF_D, MF_DV <= 96 else 16)
 *
 * Tile choice of the host (simdgroup_config in tests/test_metal_simdgroup.py, later csrc/plan):
 * with m = max(MF_D, MF_DV), the first of (4, bk0), (4, bk0 / 2), (2, bk0), (2, bk0 / 2), (1, 8)
 * as (MF_SG, MF_BK) whose threadgroup memory with both head dims at m fits in 32 KiB,
 * bk0 = 32 when m <= 96 else 16. By dtype and m (largest threadgroup memory of the row):
 *   fp16/bf16   m <= 96        MF_SG 4 (128 threads), MF_BK 32      <= 13312 bytes
 *               m 104..256     MF_SG 4 (128 threads), MF_BK 16      <= 26880 bytes
 *   fp32        m <= 96        MF_SG 4 (128 threads), MF_BK 32      <= 26624 bytes
 *               m 104..152     MF_SG 4 (128 threads), MF_BK 16      <= 32128 bytes
 *               m 160..176     MF_SG 4 (128 threads), MF_BK 8       <= 31488 bytes
 *               m 184..224     MF_SG 2 (64 threads),  MF_BK 16      <= 32512 bytes
 *               m 232..256     MF_SG 2 (64 threads),  MF_BK 8       <= 28928 bytes
 * (exact bytes of a variant: MF_TG_BYTES below; a variant over 32 KiB does not compile).
 *
 * Threadgroup memory, in MF_T elements (MF_PAD = 4 elements of row padding):
 *   qs   MF_BQ rows x (MF_D + MF_PAD)                          Q tile, staged once
 *   kvs  max(MF_D x (MF_BK + MF_PAD), MF_BK x (MF_DV + MF_PAD))  K^T of a block, then its V
 *   MF_TG_BYTES = (|qs| + |kvs|) * sizeof(MF_T)
 *
 * Kernel (fixed signature of MF_ATTN_KERNEL, buffer slots of mf_params.h):
 *   mf_attn_simdgroup
 *       threadgroup = (32 * MF_SG, 1, 1)          (exactly; the kernel relies on it)
 *       grid        = (ceil(seqlen_q / MF_BQ), heads_q, batch)   [threadgroups]
 *   seqlen_q is the maximum length for varlen problems; tiles past a sequence's own length
 *   return at once (whole threadgroup). num_splits must be 1 (split-KV is the vec tier's).
 *
 * Numerics: S, the softmax state and O are fp32 (fp32 simdgroup matrices only; MF_T data is
 * converted to float element by element when a fragment is read from threadgroup memory). The
 * scale is applied to S in fp32 with log2(e) folded in (scale / softcap and softcap * log2(e)
 * with softcap on), so the softmax uses exp2. Maxima start at a finite lowest value, hidden
 * pairs get p = 0 by select (never by exp2 of a sentinel), and every division is guarded: a row
 * that sees no key writes a zero row and lse = +inf (stored as a bit pattern), never NaN.
 */
#include "mf_msl.h" /* includes mf_params.h */

#ifndef MF_D
#define MF_D 128
#endif
#ifndef MF_DV
#define MF_DV MF_D
#endif
#ifndef MF_SG
#define MF_SG 4
#endif
#ifndef MF_BK
#if MF_D <= 96 && MF_DV <= 96
#define MF_BK 32
#else
#define MF_BK 16
#endif
#endif

#if (MF_D % 8) != 0 || MF_D < 8 || MF_D > 256
#error "MF_D must be a multiple of 8 in 8..256"
#endif
#if (MF_DV % 8) != 0 || MF_DV < 8 || MF_DV > 256
#error "MF_DV must be a multiple of 8 in 8..256"
#endif
#if MF_SG < 1 || MF_SG > 4
#error "MF_SG must be 1..4"
#endif
#if MF_BK != 8 && MF_BK != 16 && MF_BK != 32
#error "MF_BK must be 8, 16 or 32"
#endif

#define MF_SG_THREADS (32 * MF_SG)
#define MF_BQ (8 * MF_SG)
#define MF_PAD 4
#define MF_LDQ (MF_D + MF_PAD)
#define MF_LDK (MF_BK + MF_PAD)
#define MF_LDV (MF_DV + MF_PAD)
#define MF_Q_ELEMS (MF_BQ * MF_LDQ)
#define MF_KT_ELEMS (MF_D * MF_LDK)
#define MF_V_ELEMS (MF_BK * MF_LDV)
#define MF_KV_ELEMS (MF_KT_ELEMS > MF_V_ELEMS ? MF_KT_ELEMS : MF_V_ELEMS)
#define MF_ELEM_BYTES (MF_DTYPE == 0 ? 4 : 2)
#define MF_TG_BYTES ((MF_Q_ELEMS + MF_KV_ELEMS) * MF_ELEM_BYTES)
#if MF_TG_BYTES > 32768
#error "threadgroup memory over 32 KiB: use a smaller MF_SG or MF_BK"
#endif

#define MF_NKB (MF_BK / 8)  /* 8-key column blocks of S per simdgroup */
#define MF_ND (MF_D / 8)    /* 8-wide head-dim blocks of Q / K */
#define MF_NDV (MF_DV / 8)  /* 8-wide head-dim blocks of V / O */
#define MF_SG_LOWEST (-3.0e38f) /* finite start of running maxima */
#define MF_SG_LOG2E 1.4426950408889634f
#define MF_SG_LN2 0.6931471805599453f
#define MF_SG_INF_BITS 0x7f800000u

/* Row / column of the two elements a lane holds in an 8x8 simdgroup matrix (metal.md sec. 5). */
static inline int mf_sg_row(uint l)
{
    return (int)((l >> 4) * 4 + ((l >> 1) & 3));
}

static inline int mf_sg_col(uint l)
{
    return (int)(((l >> 3) & 1) * 4 + (l & 1) * 2);
}

/* Lane's two elements of the 8x8 block at `base` (row stride ld) as a float matrix. */
static inline simdgroup_float8x8 mf_sg_frag(MF_THREADGROUP_PTR(const MF_T) base, int ld, int r,
                                            int c)
{
    simdgroup_float8x8 m = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    m.thread_elements()[0] = float(base[r * ld + c]);
    m.thread_elements()[1] = float(base[r * ld + c + 1]);
    return m;
}

/* Visible key range [lo, hi) of the query at aligned position pos (= i + sk - sq). */
static inline long mf_sg_key_lo(constant mf_params &p, long pos)
{
    long lo = 0;
    if (p.window_left >= 0 && pos - (long)p.window_left > lo) {
        lo = pos - (long)p.window_left;
    }
    return lo;
}

static inline long mf_sg_key_hi(constant mf_params &p, long pos, long sk)
{
    long hi = sk;
    if (p.window_right >= 0 && pos + (long)p.window_right + 1 < hi) {
        hi = pos + (long)p.window_right + 1;
    }
    return hi;
}

MF_ATTN_KERNEL(mf_attn_simdgroup)
{
    MF_THREADGROUP_ARRAY(MF_T, qs, MF_Q_ELEMS);
    MF_THREADGROUP_ARRAY(MF_T, kvs, MF_KV_ELEMS);

    const int b = (int)tg_pos.z;
    const int h = (int)tg_pos.y;
    const int i0 = (int)tg_pos.x * MF_BQ; /* first query row of the tile */

    /* ---- sequence of this batch entry (uniform over the threadgroup) */
    int start_q = 0;
    int start_k = 0;
    int sq = params.seqlen_q;
    int sk = params.seqlen_k;
    if ((params.flags & MF_FLAG_VARLEN) != 0) {
        start_q = cu_seqlens_q[b];
        start_k = cu_seqlens_k[b];
        sq = cu_seqlens_q[b + 1] - start_q;
        sk = cu_seqlens_k[b + 1] - start_k;
    }
    if (i0 >= sq) {
        return; /* the whole threadgroup, before any barrier */
    }
    const int dq = params.head_dim;
    const int dv = params.head_dim_v;
    const long off = (long)sk - (long)sq; /* bottom-right alignment */
    const int i_end = min(i0 + MF_BQ, sq); /* rows [i0, i_end) of the tile exist */

    const long hk = (long)(h / params.group);
    MF_DEVICE_PTR(const MF_T) qbase = q + (long)b * params.q_stride_b +
                                      (long)start_q * params.q_stride_s +
                                      (long)h * params.q_stride_h;
    MF_DEVICE_PTR(const MF_T) kbase = k + (long)b * params.k_stride_b +
                                      (long)start_k * params.k_stride_s + hk * params.k_stride_h;
    MF_DEVICE_PTR(const MF_T) vbase = v + (long)b * params.v_stride_b +
                                      (long)start_k * params.v_stride_s + hk * params.v_stride_h;

    /* ---- keys the tile can see: union of its rows' ranges (consecutive rows' windows overlap
     * or touch, so the union is one interval) */
    const long tile_lo = mf_sg_key_lo(params, (long)i0 + off);
    long tile_hi = mf_sg_key_hi(params, (long)(i_end - 1) + off, (long)sk);
    if (tile_hi < tile_lo) {
        tile_hi = tile_lo;
    }

    /* ---- the simdgroup's rows [sg_i0, sg_i1) and their key range (uniform per simdgroup) */
    const int sg_i0 = i0 + 8 * (int)sg;
    const int sg_i1 = min(sg_i0 + 8, sq);
    const bool sg_rows = sg_i0 < sg_i1;
    const long sg_pos0 = (long)sg_i0 + off;
    const long sg_pos1 = (long)(sg_i1 - 1) + off;
    const long sg_lo = mf_sg_key_lo(params, sg_pos0);
    const long sg_hi = mf_sg_key_hi(params, sg_pos1, (long)sk);

    /* ---- the lane's place in the 8x8 fragments, and its query row */
    const int fr = mf_sg_row(lane);
    const int fc = mf_sg_col(lane);
    const int my_i = sg_i0 + fr;
    const long my_pos = (long)my_i + off;
    const long my_lo = mf_sg_key_lo(params, my_pos);
    const long my_hi = (my_i < sq) ? mf_sg_key_hi(params, my_pos, (long)sk) : my_lo;

    /* ---- score transform, log2 units: s2 = S * scale * log2(e), or with softcap
     * s2 = softcap * log2(e) * tanh(S * scale / softcap); ALiBi subtracts slope * log2(e) * dist */
    const bool capped = (params.flags & MF_FLAG_SOFTCAP) != 0 && params.softcap > 0.0f;
    const float smul = capped ? params.scale / params.softcap : params.scale_log2;
    const float cap2 = capped ? params.softcap * MF_SG_LOG2E : 0.0f;
    float slope2 = 0.0f;
    if ((params.flags & MF_FLAG_ALIBI) != 0) {
        slope2 = alibi[(long)b * params.alibi_stride_b + h] * MF_SG_LOG2E;
    }

    /* ---- stage Q once: rows past the sequence and columns past head_dim are zero */
    for (int idx = (int)tid; idx < MF_BQ * MF_D; idx += MF_SG_THREADS) {
        const int r = idx / MF_D;
        const int d = idx - r * MF_D;
        const int i = i0 + r;
        MF_T x = MF_T(0.0f);
        if (i < sq && d < dq) {
            x = qbase[(long)i * params.q_stride_s + d];
        }
        qs[r * MF_LDQ + d] = x;
    }
    /* (the first block's barrier publishes qs) */

    simdgroup_float8x8 oacc[MF_NDV];
    for (int n = 0; n < MF_NDV; ++n) {
        oacc[n] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    simdgroup_float8x8 sacc[MF_NKB];
    float m_run = MF_SG_LOWEST; /* running max of the lane's row, log2 units */
    float l_run = 0.0f;         /* this lane's share of the row's running sum */

    MF_THREADGROUP_PTR(const MF_T) qsg = qs + 8 * (int)sg * MF_LDQ;

    for (long j0 = tile_lo; j0 < tile_hi; j0 += MF_BK) {
        /* ---- 1. K^T of keys [j0, j0 + MF_BK): kvs[d * MF_LDK + key] */
        threadgroup_barrier(mem_flags::mem_threadgroup); /* previous block's V reads are done */
        for (int idx = (int)tid; idx < MF_BK * MF_D; idx += MF_SG_THREADS) {
            const int kk = idx / MF_D;
            const int d = idx - kk * MF_D;
            const long j = j0 + kk;
            MF_T x = MF_T(0.0f);
            if (j < (long)sk && d < dq) {
                x = kbase[j * params.k_stride_s + d];
            }
            kvs[d * MF_LDK + kk] = x;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        /* does the block concern this simdgroup's rows, and does it need the mask? */
        const bool sg_active = sg_rows && j0 < sg_hi && j0 + MF_BK > sg_lo;
        const bool sg_full = j0 + MF_BK <= (long)sk &&
                             (params.window_left < 0 || j0 >= sg_pos1 - (long)params.window_left) &&
                             (params.window_right < 0 ||
                              j0 + MF_BK - 1 <= sg_pos0 + (long)params.window_right);

        /* ---- 2. S = Q K^T and the online softmax (P left in sacc) */
        if (sg_active) {
            for (int n = 0; n < MF_NKB; ++n) {
                sacc[n] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
            }
            for (int dd = 0; dd < MF_ND; ++dd) {
                const simdgroup_float8x8 qf = mf_sg_frag(qsg + dd * 8, MF_LDQ, fr, fc);
                for (int n = 0; n < MF_NKB; ++n) {
                    const simdgroup_float8x8 kf =
                        mf_sg_frag(kvs + dd * 8 * MF_LDK + n * 8, MF_LDK, fr, fc);
                    simdgroup_multiply_accumulate(sacc[n], qf, kf, sacc[n]);
                }
            }

            uint vis = 0u; /* bit 2n+e: element e of fragment n is a visible pair */
            float m_new = m_run;
            for (int n = 0; n < MF_NKB; ++n) {
                for (int e = 0; e < 2; ++e) {
                    const long j = j0 + n * 8 + fc + e;
                    float x = sacc[n].thread_elements()[e];
                    if (capped) {
                        /* clamp: tanh is exactly +-1 in fp32 well before 15 (fast tanh stays finite) */
                        x = cap2 * tanh(min(max(x * smul, -15.0f), 15.0f));
                    } else {
                        x = x * smul;
                    }
                    x -= slope2 * fabs(float(my_pos - j));
                    const bool seen = sg_full ? (my_i < sq) : (j >= my_lo && j < my_hi);
                    if (seen) {
                        vis |= 1u << (uint)(2 * n + e);
                        m_new = max(m_new, x);
                    }
                    sacc[n].thread_elements()[e] = x;
                }
            }
            /* row max over the lanes {l, l^1, l^8, l^9} that hold the row */
            m_new = max(m_new, simd_shuffle_xor(m_new, ushort(1)));
            m_new = max(m_new, simd_shuffle_xor(m_new, ushort(8)));
            const float corr = exp2(m_run - m_new);
            float psum = 0.0f;
            for (int n = 0; n < MF_NKB; ++n) {
                for (int e = 0; e < 2; ++e) {
                    const float x = sacc[n].thread_elements()[e];
                    const bool seen = (vis >> (uint)(2 * n + e)) & 1u;
                    const float pe = seen ? exp2(x - m_new) : 0.0f;
                    psum += pe;
                    sacc[n].thread_elements()[e] = pe;
                }
            }
            l_run = l_run * corr + psum;
            m_run = m_new;
            for (int n = 0; n < MF_NDV; ++n) {
                oacc[n].thread_elements()[0] = oacc[n].thread_elements()[0] * corr;
                oacc[n].thread_elements()[1] = oacc[n].thread_elements()[1] * corr;
            }
        }

        /* ---- 3. V of the block into the same buffer: kvs[key * MF_LDV + d] */
        threadgroup_barrier(mem_flags::mem_threadgroup); /* every simdgroup is done with K^T */
        for (int idx = (int)tid; idx < MF_BK * MF_DV; idx += MF_SG_THREADS) {
            const int kk = idx / MF_DV;
            const int d = idx - kk * MF_DV;
            const long j = j0 + kk;
            MF_T x = MF_T(0.0f);
            if (j < (long)sk && d < dv) {
                x = vbase[j * params.v_stride_s + d];
            }
            kvs[kk * MF_LDV + d] = x;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        /* ---- 4. O += P V */
        if (sg_active) {
            for (int n = 0; n < MF_NDV; ++n) {
                for (int kb = 0; kb < MF_NKB; ++kb) {
                    const simdgroup_float8x8 vf =
                        mf_sg_frag(kvs + kb * 8 * MF_LDV + n * 8, MF_LDV, fr, fc);
                    simdgroup_multiply_accumulate(oacc[n], sacc[kb], vf, oacc[n]);
                }
            }
        }
    }

    /* ---- row sum over the four lanes of the row; normalise and store */
    l_run += simd_shuffle_xor(l_run, ushort(1));
    l_run += simd_shuffle_xor(l_run, ushort(8));
    if (my_i >= sq) {
        return; /* no barrier or simd function follows */
    }
    const bool seen_any = l_run > 0.0f;
    const float inv = seen_any ? 1.0f / l_run : 0.0f;
    MF_DEVICE_PTR(MF_T) orow = o + (long)b * params.o_stride_b +
                               (long)(start_q + my_i) * params.o_stride_s +
                               (long)h * params.o_stride_h;
    for (int n = 0; n < MF_NDV; ++n) {
        const int d = n * 8 + fc;
        if (d < dv) {
            orow[d] = MF_T(oacc[n].thread_elements()[0] * inv);
        }
        if (d + 1 < dv) {
            orow[d + 1] = MF_T(oacc[n].thread_elements()[1] * inv);
        }
    }
    if ((params.flags & MF_FLAG_LSE) != 0 && fc == 0) {
        const long at = (long)b * params.lse_stride_b + (long)h * params.lse_stride_h +
                        (long)start_q + my_i;
        if (seen_any) {
            lse[at] = (m_run + log2(l_run)) * MF_SG_LN2;
        } else {
            /* +inf written as bits: under fast math an infinite float value may not survive */
            MF_DEVICE_PTR(uint) lse_bits = MF_DEVICE_CAST(uint, lse);
            lse_bits[at] = MF_SG_INF_BITS;
        }
    }
}
