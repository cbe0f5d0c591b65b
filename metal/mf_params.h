/* mf_params.h - the one argument struct shared by the C host and every attention kernel.
 *
 * Included by csrc/ (C11), by the metal/ kernels (MSL) and by the emulator (C++17). The CPU backend
 * reads the same struct, so every backend sees one description of the problem.
 *
 * Layout rules (so that C, C++ and MSL agree byte for byte): 64-bit fields first, then 32-bit
 * ints, then floats; the total size is a multiple of 8. csrc/problem.c asserts the size.
 *
 * Addressing, for sequence b, row i of that sequence, head h (all strides in elements):
 *   start_q(b) = (flags & MF_FLAG_VARLEN) ? cu_seqlens_q[b] : 0        (same for k with cu_seqlens_k)
 *   q  + b*q_stride_b  + (start_q(b) + i)*q_stride_s  + h*q_stride_h        (+ d, unit stride)
 *   k  + b*k_stride_b  + (start_k(b) + j)*k_stride_s  + (h / group)*k_stride_h
 *   o  + b*o_stride_b  + (start_q(b) + i)*o_stride_s  + h*o_stride_h
 *   lse[b*lse_stride_b + h*lse_stride_h + start_q(b) + i]
 * Varlen problems have every q/o *_stride_b == 0. Dense lse is (B, Hq, Sq); varlen lse is (Hq, total_q).
 *
 * KV layouts: where key j of sequence b lives (kv head g = h / group; V likewise with v_*):
 *   dense:  k + kvb(b)*k_stride_b + (start_k(b) + j)*k_stride_s + g*k_stride_h,
 *           kvb(b) = (flags & MF_FLAG_KV_BATCH_IDX) ? kv_batch_idx[b] : b   (k_stride_b = 0 in varlen)
 *   paged (MF_FLAG_PAGED): blk = block_table[b*block_table_stride_b + j / page_size],
 *           k + blk*k_stride_b + (j % page_size)*k_stride_s + g*k_stride_h   (start_k(b) = 0; the
 *           k/v tensors are (num_blocks, page_size, heads_k, dim) and k_stride_b is a block's stride)
 * The KV-batch index and the block table share one buffer slot (they never come together).
 *
 * Lengths: dense: seqlen_q / seqlen_k. Varlen: sq_b = cu_seqlens_q[b+1] - cu_seqlens_q[b] (and k
 * likewise); seqlen_q / seqlen_k then hold the maxima (for grid sizing). With MF_FLAG_SEQUSED_K
 * (a kv cache): sk_b = seqused_k[b] + seqlen_new, i.e. the cache's length before the call plus the
 * rows appended in it; seqlen_k then holds the maximum over b.
 *
 * Masking (per sequence, offset = sk_b - sq_b, bottom-right aligned): query i sees key j iff
 *   lo_b <= j < sk_b, and (window_left  < 0 || j >= i + offset - window_left)
 *                     and (window_right < 0 || j <= i + offset + window_right),
 * lo_b = (flags & MF_FLAG_LEFTPAD_K) ? leftpad_k[b] : 0 (a left-padded cache: keys before it
 * are padding; alignment and ALiBi distances stay in absolute key positions).
 * causal is window_right == 0 (MF_FLAG_CAUSAL is set as well, for information only).
 *
 * Score of a visible pair, in natural-log units:
 *   s = q.k * scale;  if softcap > 0: s = softcap * tanh(s / softcap);
 *   if ALiBi: s -= slope(b, h) * |i + offset - j|,  slope = alibi[b*alibi_stride_b + h]
 * out = softmax(s) @ v; lse = log(sum exp(s)) (+inf, and a zero output row, when no key is seen).
 */
#ifndef MF_PARAMS_H
#define MF_PARAMS_H

#ifdef __METAL_VERSION__
typedef long mf_i64;
typedef int mf_i32;
#else
#include <stdint.h>
typedef int64_t mf_i64;
typedef int32_t mf_i32;
#endif

/* flags */
#define MF_FLAG_VARLEN 1  /* cu_seqlens_q / cu_seqlens_k are bound and used */
#define MF_FLAG_ALIBI 2   /* alibi slopes bound (fp32) */
#define MF_FLAG_SOFTCAP 4 /* softcap > 0 */
#define MF_FLAG_LSE 8     /* write lse */
#define MF_FLAG_CAUSAL 16 /* informational: window_right == 0 came from causal=True */
#define MF_FLAG_PAGED 32        /* K/V addressed through the block table (slot MF_SLOT_KV_INDEX) */
#define MF_FLAG_KV_BATCH_IDX 64 /* dense K/V rows picked per sequence (slot MF_SLOT_KV_INDEX) */
#define MF_FLAG_SEQUSED_K 128   /* per-sequence key lengths: seqused_k[b] + seqlen_new */
#define MF_FLAG_LEFTPAD_K 256   /* per-sequence first valid key: leftpad_k[b] */

/* Fixed buffer slots of every attention kernel (the bridge and the emulator bind by these).
 * Unused slots are bound to a small dummy buffer. */
#define MF_SLOT_Q 0
#define MF_SLOT_K 1
#define MF_SLOT_V 2
#define MF_SLOT_O 3
#define MF_SLOT_LSE 4
#define MF_SLOT_CU_Q 5
#define MF_SLOT_CU_K 6
#define MF_SLOT_ALIBI 7
#define MF_SLOT_SCRATCH 8 /* fp32 workspace, e.g. split-KV partials */
#define MF_SLOT_PARAMS 9  /* this struct, by value (setBytes) */
#define MF_SLOT_KV_INDEX 10 /* int32: block table (B, max_blocks) or kv batch index (B,) */
#define MF_SLOT_SEQUSED_K 11 /* int32 (B,): cache lengths before the call */
#define MF_SLOT_LEFTPAD_K 12 /* int32 (B,): first valid key per sequence */
#define MF_NUM_SLOTS 13

typedef struct mf_params {
    /* element strides: batch, token, head (head dim stride is always 1) */
    mf_i64 q_stride_b, q_stride_s, q_stride_h;
    mf_i64 k_stride_b, k_stride_s, k_stride_h;
    mf_i64 v_stride_b, v_stride_s, v_stride_h;
    mf_i64 o_stride_b, o_stride_s, o_stride_h;
    mf_i64 lse_stride_b, lse_stride_h;
    mf_i64 alibi_stride_b; /* 0 when the slopes are (H,), H when (B, H) */
    mf_i64 block_table_stride_b; /* paged: elements between two rows of the block table */
    /* sizes */
    mf_i32 batch;
    mf_i32 heads_q, heads_k, group; /* group = heads_q / heads_k */
    mf_i32 head_dim, head_dim_v;
    mf_i32 seqlen_q, seqlen_k; /* dense lengths; varlen: the maxima */
    mf_i32 window_left, window_right; /* < 0: unbounded */
    mf_i32 flags;
    mf_i32 num_splits; /* split-KV decode: key splits per row (1 = no split) */
    mf_i32 split_size; /* keys per split when num_splits > 1 */
    mf_i32 page_size;  /* paged: keys per block */
    mf_i32 seqlen_new; /* kv cache: rows appended by this call (counted in sk_b) */
    mf_i32 reserved0;
    /* scalars */
    float scale;      /* softmax scale, natural units */
    float scale_log2; /* scale * log2(e) */
    float softcap;    /* 0 = off */
    float reserved1;
} mf_params;

#define MF_PARAMS_SIZE 208

/* The append + rotary pass of a kv cache call (metal/kv_append.metal, csrc/cpu/kv_append.c for the
 * math) has buffer slots of its own; the cache, the block table / kv batch index and the cache
 * lengths sit where attention has them, so both passes address the cache identically:
 *   0 q_src      const T   the caller's q (B, Sq, Hq, D), strides qs_stride_*
 *   1 k_cache    T         written: new (rotated) k rows at key position seqused_k[b] + t
 *   2 v_cache    T         written: new v rows, bitwise copies
 *   3 q_rot      T         written: q rotated (rotate_q only); strides = params.q_stride_*
 *   4 k_new      const T   (B, S_new, Hk, D), strides kn_stride_*
 *   5 v_new      const T   (B, S_new, Hk, Dv), strides vn_stride_*
 *   6 rotary_cos const T   (seqlen_ro, rotary_dim / 2), row stride cos_stride
 *   7 rotary_sin const T   likewise, sin_stride
 *   8 this struct (mf_append_params, by value: setBytes)
 *   9 mf_params  the attention problem's params (cache strides, page size, flags, q_rot strides)
 *  10 kv_index   const int block table or kv batch index (as attention)
 *  11 seqused_k  const int cache lengths before the call
 *  12 (unused: rotary positions are not shifted by cache_leftpad) */
#define MF_APP_SLOT_Q_SRC 0
#define MF_APP_SLOT_K_CACHE 1
#define MF_APP_SLOT_V_CACHE 2
#define MF_APP_SLOT_Q_ROT 3
#define MF_APP_SLOT_K_NEW 4
#define MF_APP_SLOT_V_NEW 5
#define MF_APP_SLOT_COS 6
#define MF_APP_SLOT_SIN 7
#define MF_APP_SLOT_APP_PARAMS 8

typedef struct mf_append_params {
    mf_i64 kn_stride_b, kn_stride_s, kn_stride_h; /* k_new (elements) */
    mf_i64 vn_stride_b, vn_stride_s, vn_stride_h; /* v_new */
    mf_i64 qs_stride_b, qs_stride_s, qs_stride_h; /* q_src */
    mf_i64 cos_stride, sin_stride;                /* between rotary positions */
    mf_i32 seqlen_new;   /* new rows per sequence */
    mf_i32 rotary_dim;   /* 0: k copied bitwise, q not rotated */
    mf_i32 interleaved;  /* 1: GPT-J pairs (2i, 2i+1); 0: GPT-NeoX halves (i, i + rotary_dim/2) */
    mf_i32 q_per_row;    /* q row i rotated at seqused_k[b] + i (causal/local), else at seqused_k[b] */
    mf_i32 rotate_q;     /* 1: q rows are rotated into q_rot (rotary_dim > 0) */
    mf_i32 reserved0;
} mf_append_params;

#define MF_APPEND_PARAMS_SIZE 112

#endif /* MF_PARAMS_H */
