/* attn_vec.metal - the vec tier: one simdgroup per query row, lanes spread over the head dim.
 *
 * Runs on any Apple GPU (only simd_sum is needed) and is also the decode path (few query rows,
 * long key sequences), where the keys are split over threadgroups and merged in a second pass.
 * Written in the dual-compile subset (docs: metal.md section 6), so the same source runs under
 * the emulator in tests/metal_emu/.
 *
 * Defines (compile time):
 *   MF_DTYPE  0 | 1 | 2      storage type MF_T of q, k, v, o: float | half | bfloat (mf_msl.h).
 *   MF_MAX_D  64 | 128 | 256 | 384 | 576 (any multiple of 32, default 128): upper bound of
 *                            head_dim. Each lane holds MF_MAX_D / 32 elements of q (element d
 *                            lives on lane d % 32).
 *   MF_MAX_DV 64 | 128 | 256 | 384 | 512 (any multiple of 32, default MF_MAX_D): upper bound of
 *                            head_dim_v; each lane holds MF_MAX_DV / 32 elements of the output
 *                            accumulator. The host picks the smallest choices covering the head
 *                            dims (DeepSeek MLA decode: 576 / 512); a launch with a larger head
 *                            dim is invalid (the kernel does not check).
 *   MF_PAGED  0 | 1 (default 0): 1 when K/V are paged (MF_FLAG_PAGED): key j of sequence b lives
 *                            in block kv_index[b * block_table_stride_b + j / page_size], row
 *                            j % page_size (mf_params.h). With 0 the kernels read dense K/V, with
 *                            the cache row of each sequence from kv_index under
 *                            MF_FLAG_KV_BATCH_IDX (a runtime flag: one load per row).
 *
 * KV layouts and lengths (runtime flags, mf_params.h): MF_FLAG_SEQUSED_K gives sequence b
 * seqused_k[b] + seqlen_new keys; MF_FLAG_LEFTPAD_K makes leftpad_k[b] the first visible key
 * (positions, causal alignment and ALiBi distances stay absolute); varlen + paged takes the
 * lengths from cu_seqlens_k and starts every sequence at key 0 of its blocks.
 *
 * Kernels (all take the fixed signature of MF_ATTN_KERNEL, buffer slots of mf_params.h):
 *
 *   Rows: a simdgroup serves one (head, query row) pair. The pairs of a batch entry are numbered
 *   n = h * seqlen_q + i, and simdgroup s of threadgroup x takes n = x * R + s, where R = rows
 *   (simdgroups) per threadgroup, 1 <= R <= 32. Long sequences thus put R consecutive rows of one
 *   head in a threadgroup; decode (seqlen_q = 1) puts R neighbouring heads there, which share K/V
 *   under GQA.
 *
 *   mf_attn_vec        the whole row in one pass (num_splits == 1).
 *       threadgroup = (32 * R, 1, 1)
 *       grid        = (ceil(heads_q * seqlen_q / R), 1, batch)      [threadgroups]
 *
 *   mf_attn_vec_split  split-KV pass 1: keys [split * split_size, (split + 1) * split_size) of
 *                      each row, unnormalised partial (max, sum, out) to scratch.
 *       threadgroup = (32 * R, 1, 1)
 *       grid        = (ceil(heads_q * seqlen_q / R), num_splits, batch)   tg_pos.y = split
 *
 *   mf_attn_vec_merge  split-KV pass 2: combines the num_splits partials of each row in split
 *                      order (deterministic), writes o (and lse). It reads what the split pass
 *                      wrote, so it must be dispatched after it with the writes visible (the
 *                      next dispatch of a serial compute encoder, or a later encoder).
 *       threadgroup = (32 * R, 1, 1)
 *       grid        = (ceil(heads_q * seqlen_q / R), 1, batch)
 *
 *   (seqlen_q is the maximum sequence length for varlen problems; rows past a sequence's own
 *   length return at once, whole simdgroups together. No kernel uses threadgroup memory or
 *   threadgroup barriers, so R is free.)
 *
 * Splitting pays when heads_q * seqlen_q * batch simdgroups cannot fill the GPU and the rows
 * are long (decode, and 9-64 query rows per sequence over a long cache: chunked prefill,
 * speculative decoding): then pick num_splits so each split still has a few hundred keys.
 * (split_size = ceil(seqlen_k / num_splits), set by the host; a split past a row's visible keys
 * just stores an empty record.)
 *
 * Scratch (slot 8, fp32, only for the split pair), in floats:
 *   batch * heads_q * seqlen_q * num_splits * (head_dim_v + 2)
 * Record of (b, h, i, split) at ((((b * heads_q + h) * seqlen_q + i) * num_splits + split)
 * * (head_dim_v + 2)): [0] running max in log2 units, [1] sum of exp2(s - max), [2..] the
 * unnormalised output sum_j exp2(s_j - max) * v_j. An empty split stores (lowest, 0, 0...).
 *
 * Numerics: scores, softmax state and the accumulator are fp32. The scale is folded into q in
 * fp32 registers together with log2(e) (scale / softcap with softcap on), so the softmax uses
 * exp2. Maxima start at a finite lowest value and every division is guarded, so nothing depends
 * on infinities or NaN propagation (Metal may compile with fast math). The visible key range of
 * a row is computed from the window once, so masked keys are never visited; a row that sees no
 * key writes a zero row and lse = +inf (stored as a bit pattern, see mf_vec_store_row).
 * Keys are consumed MF_VEC_KEYS at a time: their simd_sums are independent, and the softmax
 * rescale runs once per step.
 */
#include "mf_msl.h" /* includes mf_params.h */

#ifndef MF_MAX_D
#define MF_MAX_D 128
#endif
#if (MF_MAX_D % 32) != 0 || MF_MAX_D <= 0
#error "MF_MAX_D must be a positive multiple of 32"
#endif

#ifndef MF_MAX_DV
#define MF_MAX_DV MF_MAX_D
#endif
#if (MF_MAX_DV % 32) != 0 || MF_MAX_DV <= 0
#error "MF_MAX_DV must be a positive multiple of 32"
#endif
#ifndef MF_PAGED
#define MF_PAGED 0
#endif

#define MF_VEC_NE (MF_MAX_D / 32)   /* q/k head-dim elements per lane */
#define MF_VEC_NEV (MF_MAX_DV / 32) /* v head-dim elements per lane */
#define MF_VEC_KEYS 4             /* keys per step of the key loop */
#define MF_VEC_LOWEST (-3.0e38f)  /* finite start of running maxima */
#define MF_VEC_LOG2E 1.4426950408889634f
#define MF_VEC_LN2 0.6931471805599453f
#define MF_VEC_INF_BITS 0x7f800000u

/* Where one query row lives and which keys it sees. */
struct mf_vec_row {
    int valid;     /* the row exists (i < this sequence's query length) */
    int start_q;   /* first token of the sequence in q / o (varlen), else 0 */
    int start_k;   /* first key of the sequence in dense K/V (varlen), else 0 */
    int kvb;       /* dense K/V: the batch row holding the sequence (cache_batch_idx), else b */
    int key_lo;    /* visible keys [key_lo, key_hi) */
    int key_hi;
    long pos;      /* i + sk - sq: the key aligned with this row (bottom-right) */
};

/* Softmax state of one row over some keys, per lane: max and sum are uniform over the
 * simdgroup, acc holds this lane's elements of sum_j exp2(s_j - m) * v_j. */
struct mf_vec_state {
    float m;
    float l;
    float acc[MF_VEC_NEV];
};

static inline mf_vec_row mf_vec_locate(MF_DEVICE_PTR(const int) cu_seqlens_q,
                                       MF_DEVICE_PTR(const int) cu_seqlens_k,
                                       MF_DEVICE_PTR(const int) kv_index,
                                       MF_DEVICE_PTR(const int) seqused_k,
                                       MF_DEVICE_PTR(const int) leftpad_k,
                                       constant mf_params &p, int b, int i)
{
    mf_vec_row r;
    int sq = p.seqlen_q;
    int sk = p.seqlen_k;
    r.start_q = 0;
    r.start_k = 0;
    r.kvb = b;
    if ((p.flags & MF_FLAG_VARLEN) != 0) {
        r.start_q = cu_seqlens_q[b];
        sq = cu_seqlens_q[b + 1] - r.start_q;
        sk = cu_seqlens_k[b + 1] - cu_seqlens_k[b];
        /* paged keys start at 0 in the sequence's blocks */
        r.start_k = (p.flags & MF_FLAG_PAGED) != 0 ? 0 : cu_seqlens_k[b];
    }
    if ((p.flags & MF_FLAG_SEQUSED_K) != 0) {
        sk = seqused_k[b] + p.seqlen_new;
    }
    if ((p.flags & MF_FLAG_KV_BATCH_IDX) != 0) {
        r.kvb = kv_index[b];
    }
    r.valid = (i < sq) ? 1 : 0;
    r.pos = (long)i + (long)(sk - sq);
    long lo = 0;
    long hi = (long)sk;
    if ((p.flags & MF_FLAG_LEFTPAD_K) != 0) {
        lo = (long)leftpad_k[b];
    }
    if (p.window_left >= 0 && r.pos - (long)p.window_left > lo) {
        lo = r.pos - (long)p.window_left;
    }
    if (p.window_right >= 0 && r.pos + (long)p.window_right + 1 < hi) {
        hi = r.pos + (long)p.window_right + 1;
    }
    if (lo > (long)sk) {
        lo = (long)sk;
    }
    if (hi < lo) {
        hi = lo;
    }
    r.key_lo = (int)lo;
    r.key_hi = (int)hi;
    return r;
}

/* The (head, row) pair of simdgroup sg in threadgroup x; h < 0 when past the last pair. */
struct mf_vec_task {
    int h;
    int i;
};

static inline mf_vec_task mf_vec_task_of(uint x, uint3 tg_size, uint sg, constant mf_params &p)
{
    mf_vec_task t;
    const long n = (long)x * (long)(tg_size.x / 32) + (long)sg;
    const long rows = (long)p.seqlen_q;
    t.h = -1;
    t.i = 0;
    if (rows > 0 && n < rows * (long)p.heads_q) {
        t.h = (int)(n / rows);
        t.i = (int)(n - (long)t.h * rows);
    }
    return t;
}

static inline mf_vec_state mf_vec_empty_state()
{
    mf_vec_state st;
    st.m = MF_VEC_LOWEST;
    st.l = 0.0f;
    for (int e = 0; e < MF_VEC_NEV; ++e) {
        st.acc[e] = 0.0f;
    }
    return st;
}

/* Online softmax of row i (head h, batch b) over keys [j0, j1) of its sequence. Must be called
 * by the whole simdgroup with uniform arguments (it uses simd_sum). */
/* Element offsets of the rows of key j in K and in V (kv head hk included). */
struct mf_vec_key {
    long k;
    long v;
};

static inline mf_vec_key mf_vec_key_at(MF_DEVICE_PTR(const int) kv_index, constant mf_params &p,
                                       mf_vec_row r, int b, long hk, int j)
{
    mf_vec_key o;
#if MF_PAGED
    (void)r;
    const int page = j / p.page_size;
    const long blk = (long)kv_index[(long)b * p.block_table_stride_b + page];
    const long slot = (long)(j - page * p.page_size);
    o.k = blk * p.k_stride_b + slot * p.k_stride_s + hk * p.k_stride_h;
    o.v = blk * p.v_stride_b + slot * p.v_stride_s + hk * p.v_stride_h;
#else
    (void)kv_index;
    (void)b;
    const long row = (long)(r.start_k + j);
    o.k = (long)r.kvb * p.k_stride_b + row * p.k_stride_s + hk * p.k_stride_h;
    o.v = (long)r.kvb * p.v_stride_b + row * p.v_stride_s + hk * p.v_stride_h;
#endif
    return o;
}

static inline mf_vec_state mf_vec_attend(MF_DEVICE_PTR(const MF_T) q,
                                         MF_DEVICE_PTR(const MF_T) k,
                                         MF_DEVICE_PTR(const MF_T) v,
                                         MF_DEVICE_PTR(const float) alibi,
                                         MF_DEVICE_PTR(const int) kv_index, constant mf_params &p,
                                         mf_vec_row r, int b, int h, int i, uint lane, int j0,
                                         int j1)
{
    mf_vec_state st = mf_vec_empty_state();
    if (j0 >= j1) {
        return st;
    }
    const int dq = p.head_dim;
    const int dv = p.head_dim_v;
    const bool capped = (p.flags & MF_FLAG_SOFTCAP) != 0 && p.softcap > 0.0f;
    /* scores in log2 units: s2 = softcap * log2(e) * tanh(q.k * scale / softcap) with softcap,
     * else s2 = q.k * scale * log2(e); the factor on q.k is folded into q */
    const float qmul = capped ? p.scale / p.softcap : p.scale_log2;
    const float cap2 = capped ? p.softcap * MF_VEC_LOG2E : 0.0f;
    float slope2 = 0.0f;
    if ((p.flags & MF_FLAG_ALIBI) != 0) {
        slope2 = alibi[(long)b * p.alibi_stride_b + h] * MF_VEC_LOG2E;
    }

    MF_DEVICE_PTR(const MF_T) qrow = q + (long)b * p.q_stride_b +
                                     (long)(r.start_q + i) * p.q_stride_s + (long)h * p.q_stride_h;
    const long hk = (long)(h / p.group);

    float qr[MF_VEC_NE];
    for (int e = 0; e < MF_VEC_NE; ++e) {
        const int d = (int)lane + 32 * e;
        qr[e] = (d < dq) ? float(qrow[d]) * qmul : 0.0f;
    }

    for (int j = j0; j < j1; j += MF_VEC_KEYS) {
        float s[MF_VEC_KEYS];
        mf_vec_key at[MF_VEC_KEYS];
        for (int u = 0; u < MF_VEC_KEYS; ++u) {
            /* keys past j1 re-read the last key (in bounds) and are dropped below */
            at[u] = mf_vec_key_at(kv_index, p, r, b, hk, min(j + u, j1 - 1));
        }
        for (int u = 0; u < MF_VEC_KEYS; ++u) {
            MF_DEVICE_PTR(const MF_T) krow = k + at[u].k;
            float part = 0.0f;
            for (int e = 0; e < MF_VEC_NE; ++e) {
                const int d = (int)lane + 32 * e;
                if (d < dq) {
                    part = fma(qr[e], float(krow[d]), part);
                }
            }
            s[u] = part;
        }
        float mstep = st.m;
        for (int u = 0; u < MF_VEC_KEYS; ++u) {
            float x = simd_sum(s[u]);
            if (capped) {
                /* clamp: tanh is exactly +-1 in fp32 well before 15; keeps fast tanh finite */
                x = cap2 * tanh(min(max(x, -15.0f), 15.0f));
            }
            x -= slope2 * fabs(float(r.pos - (long)(j + u)));
            s[u] = x;
            if (j + u < j1) {
                mstep = max(mstep, x);
            }
        }
        const float corr = exp2(st.m - mstep);
        float pr[MF_VEC_KEYS];
        float psum = 0.0f;
        for (int u = 0; u < MF_VEC_KEYS; ++u) {
            pr[u] = (j + u < j1) ? exp2(s[u] - mstep) : 0.0f;
            psum += pr[u];
        }
        st.l = st.l * corr + psum;
        st.m = mstep;
        for (int e = 0; e < MF_VEC_NEV; ++e) {
            const int d = (int)lane + 32 * e;
            if (d < dv) {
                float a = st.acc[e] * corr;
                for (int u = 0; u < MF_VEC_KEYS; ++u) {
                    a = fma(pr[u], float(v[at[u].v + d]), a);
                }
                st.acc[e] = a;
            }
        }
    }
    return st;
}

/* Normalise and store one row of o, and its lse when asked for. */
static inline void mf_vec_store_row(MF_DEVICE_PTR(MF_T) o, MF_DEVICE_PTR(float) lse,
                                    constant mf_params &p, mf_vec_row r, int b, int h, int i,
                                    uint lane, mf_vec_state st)
{
    const int dv = p.head_dim_v;
    const bool seen = st.l > 0.0f;
    const float inv = seen ? 1.0f / st.l : 0.0f;
    MF_DEVICE_PTR(MF_T) orow = o + (long)b * p.o_stride_b +
                               (long)(r.start_q + i) * p.o_stride_s + (long)h * p.o_stride_h;
    for (int e = 0; e < MF_VEC_NEV; ++e) {
        const int d = (int)lane + 32 * e;
        if (d < dv) {
            orow[d] = MF_T(st.acc[e] * inv);
        }
    }
    if ((p.flags & MF_FLAG_LSE) != 0 && lane == 0) {
        const long at = (long)b * p.lse_stride_b + (long)h * p.lse_stride_h + r.start_q + i;
        if (seen) {
            lse[at] = (st.m + log2(st.l)) * MF_VEC_LN2;
        } else {
            /* +inf written as bits: under fast math an infinite float value may not survive */
            MF_DEVICE_PTR(uint) lse_bits = MF_DEVICE_CAST(uint, lse);
            lse_bits[at] = MF_VEC_INF_BITS;
        }
    }
}

MF_ATTN_KERNEL(mf_attn_vec)
{
    const mf_vec_task t = mf_vec_task_of(tg_pos.x, tg_size, sg, params);
    if (t.h < 0) {
        return;
    }
    const int h = t.h;
    const int i = t.i;
    const int b = (int)tg_pos.z;
    const mf_vec_row r = mf_vec_locate(cu_seqlens_q, cu_seqlens_k, kv_index, seqused_k, leftpad_k,
                                       params, b, i);
    if (r.valid == 0) {
        return;
    }
    const mf_vec_state st = mf_vec_attend(q, k, v, alibi, kv_index, params, r, b, h, i, lane,
                                          r.key_lo, r.key_hi);
    mf_vec_store_row(o, lse, params, r, b, h, i, lane, st);
}

MF_ATTN_KERNEL(mf_attn_vec_split)
{
    const mf_vec_task t = mf_vec_task_of(tg_pos.x, tg_size, sg, params);
    if (t.h < 0) {
        return;
    }
    const int h = t.h;
    const int i = t.i;
    const int b = (int)tg_pos.z;
    const int nsplit = params.num_splits;
    const int split = (int)tg_pos.y;
    const mf_vec_row r = mf_vec_locate(cu_seqlens_q, cu_seqlens_k, kv_index, seqused_k, leftpad_k,
                                       params, b, i);
    if (r.valid == 0) {
        return;
    }
    const long first = (long)split * params.split_size;
    const long last = first + params.split_size;
    const int j0 = (first > (long)r.key_lo) ? (int)first : r.key_lo;
    const int j1 = (last < (long)r.key_hi) ? (int)last : r.key_hi;
    const mf_vec_state st = mf_vec_attend(q, k, v, alibi, kv_index, params, r, b, h, i, lane, j0,
                                          j1);

    const int dv = params.head_dim_v;
    const long rec = ((((long)b * params.heads_q + h) * params.seqlen_q + i) * nsplit + split) *
                     (long)(dv + 2);
    MF_DEVICE_PTR(float) part = scratch + rec;
    if (lane == 0) {
        part[0] = st.m;
        part[1] = st.l;
    }
    for (int e = 0; e < MF_VEC_NEV; ++e) {
        const int d = (int)lane + 32 * e;
        if (d < dv) {
            part[2 + d] = st.acc[e];
        }
    }
}

MF_ATTN_KERNEL(mf_attn_vec_merge)
{
    const mf_vec_task t = mf_vec_task_of(tg_pos.x, tg_size, sg, params);
    if (t.h < 0) {
        return;
    }
    const int h = t.h;
    const int i = t.i;
    const int b = (int)tg_pos.z;
    const mf_vec_row r = mf_vec_locate(cu_seqlens_q, cu_seqlens_k, kv_index, seqused_k, leftpad_k,
                                       params, b, i);
    if (r.valid == 0) {
        return;
    }
    const int nsplit = params.num_splits;
    const int dv = params.head_dim_v;
    const long stride = (long)(dv + 2);
    const long row = ((long)b * params.heads_q + h) * params.seqlen_q + i;
    MF_DEVICE_PTR(const float) part = scratch + row * nsplit * stride;
    float m = MF_VEC_LOWEST;
    for (int s = 0; s < nsplit; ++s) {
        if (part[s * stride + 1] > 0.0f) {
            m = max(m, part[s * stride]);
        }
    }
    mf_vec_state st = mf_vec_empty_state();
    st.m = m;
    for (int s = 0; s < nsplit; ++s) {
        MF_DEVICE_PTR(const float) rec = part + s * stride;
        const float ls = rec[1];
        if (ls > 0.0f) {
            const float w = exp2(rec[0] - m);
            st.l = fma(ls, w, st.l);
            for (int e = 0; e < MF_VEC_NEV; ++e) {
                const int d = (int)lane + 32 * e;
                if (d < dv) {
                    st.acc[e] = fma(rec[2 + d], w, st.acc[e]);
                }
            }
        }
    }
    mf_vec_store_row(o, lse, params, r, b, h, i, lane, st);
}
