/* problem.h - ONE validated description of an attention forward problem (and its kv layout).
 *
 * Built from tensor views and options by mf_problem_build, which holds every check and every
 * error message. Backends read only this struct: `p` is exactly the mf_params block the Metal
 * kernels receive; the pointers are what the CPU backend reads and writes. */
#ifndef MF_PROBLEM_H
#define MF_PROBLEM_H

#include "mf_common.h"
#include "metal/mf_params.h"

#define MF_MAX_HEAD_DIM 576   /* q/k head dim (DeepSeek-style MLA decode: 512 latent + 64 rotary) */
#define MF_MAX_HEAD_DIM_V 512 /* v head dim */

typedef struct mf_options {
    const char *fn;        /* public function name, prefixes every message */
    int varlen;
    int kvcache;           /* flash_attn_with_kvcache: q (B, Sq, Hq, D) over a dense or paged cache */
    int has_scale;         /* softmax_scale given (else head_dim ** -0.5) */
    double softmax_scale;
    int causal;
    int64_t window_left, window_right; /* < 0: unbounded */
    double softcap;
    int64_t max_seqlen_q, max_seqlen_k; /* varlen only */
    int want_lse;
    int rotary_interleaved; /* kv cache: GPT-J pairs (1) or GPT-NeoX halves (0) */
    int64_t num_splits;     /* 0 = heuristic, 1 = no split, n = n key splits (performance only) */
    double dropout_p;       /* 0: no dropout */
    uint64_t dropout_seed, dropout_offset; /* the Philox key and counter offset (rng_state) */
} mf_options;

/* Every tensor of one call, as views (absent ones have present == 0). */
typedef struct mf_inputs {
    mf_tensor q, k, v, out, lse, cu_q, cu_k, alibi;
    /* kv layouts: paged through a block table (varlen or kv cache), or a dense cache's rows */
    mf_tensor block_table, cache_batch_idx;
    /* kv cache: lengths before the call, first valid key, the rows to append and their rotary */
    mf_tensor cache_seqlens, cache_leftpad, k_new, v_new, rotary_cos, rotary_sin;
    mf_tensor q_rot; /* where the append pass writes the rotated q (same shape as q) */
} mf_inputs;

/* The append + rotary pass of a kv cache call: new rows written into the cache at
 * cache_seqlens[b] + t (rotated k), and q rotated into q_rot, before attention reads them. */
typedef struct mf_append {
    int present;            /* k_new / v_new given */
    int64_t seqlen_new;     /* rows per sequence */
    const void *k_new, *v_new;
    int64_t kn_stride[3], vn_stride[3]; /* batch, row, head (elements) */
    int rotary_dim;         /* 0: no rotary */
    int interleaved;
    int q_per_row;          /* q row i rotated at cache_seqlens + i (causal/local), else all at cache_seqlens */
    int64_t seqlen_ro;
    const void *cos, *sin;
    int64_t cos_stride, sin_stride; /* between positions (elements) */
    const void *q_src;      /* the caller's q; pb->q is q_rot once rotary applies to q */
    int64_t qs_stride[3];
    mf_tensor tk_new, tv_new, tcos, tsin, tq_src;
} mf_append;

/* Dropout (both passes): probability p of each attention probability being dropped, the
 * survivors scaled by 1 / (1 - p); the mask comes from the counter-based generator in
 * cpu/philox.h, keyed by (seed, offset, sequence, query head, row, key). */
typedef struct mf_dropout {
    int on;                 /* p > 0 */
    float p;
    float keep_scale;       /* 1 / (1 - p); 0 when p == 1 (everything dropped) */
    uint32_t threshold;     /* an element is kept iff its 32-bit draw >= threshold */
    int drop_all;           /* p == 1 */
    uint64_t seed, offset;
} mf_dropout;

/* What the backward pass reads and writes besides the forward's tensors (pass == MF_PASS_BACKWARD):
 * dout (like out), dq/dk/dv (like q/k/v, written), softmax_d = rowsum(dout * out) (like lse, written). */
typedef struct mf_grad {
    const void *dout;
    void *dq, *dk, *dv;
    float *delta;
    int64_t do_stride[3], dq_stride[3], dk_stride[3], dv_stride[3]; /* batch, row, head (elements) */
    int64_t delta_stride_b, delta_stride_h;
    int64_t total_k;        /* varlen: rows of k/v (rows past cu_k[batch] get zero gradients) */
    mf_tensor tdout, tdq, tdk, tdv, tdelta;
} mf_grad;

typedef enum mf_pass { MF_PASS_FORWARD = 0, MF_PASS_BACKWARD = 1 } mf_pass;

typedef struct mf_problem {
    mf_params p;
    mf_pass pass;
    mf_dtype dtype;          /* q, k, v and out share it */
    mf_device device;
    const char *fn;
    /* CPU addresses (NULL on MPS) */
    const void *q, *k, *v;
    void *o;
    float *lse;              /* NULL when not wanted */
    const int32_t *cu_q, *cu_k; /* varlen offsets (always CPU memory) */
    const float *alibi;
    const int32_t *kv_index;  /* block table (paged) or kv batch index (always CPU memory) */
    const int32_t *seqused_k, *leftpad_k; /* kv cache lengths / first keys (always CPU memory) */
    int64_t total_q;         /* varlen: rows of q (rows past cu_q[batch] are zero-filled) */
    int64_t num_blocks;      /* paged: blocks in the cache */
    int num_splits_req;      /* the caller's num_splits (0 = heuristic) */
    mf_append app;
    mf_dropout drop;
    mf_grad grad;            /* backward pass only */
    /* the views, for backends that bind device buffers */
    mf_tensor tq, tk, tv, to, tlse, tcu_q, tcu_k, talibi, tkv_index, tseqused_k, tleftpad_k;
} mf_problem;

/* Validates inputs and options. out/lse (and q_rot) may be absent (present == 0): then only the
 * inputs are checked and mf_problem_out_shape tells what to allocate; call again with them present.
 * Nothing is written: a refused call leaves every buffer (a kv cache included) untouched. */
int mf_problem_build(mf_problem *pb, const mf_inputs *in, const mf_options *opt, mf_error *err);

/* The backward pass's tensors (the forward's q, k, v, out and lse in mf_inputs; the rest here). */
typedef struct mf_grad_inputs {
    mf_tensor dout, dq, dk, dv, softmax_d;
} mf_grad_inputs;

/* Validates a backward call: the forward problem (q, k, v, out and lse must all be present; dense
 * or varlen K/V, no kv cache or block table), dout like out, dq/dk/dv like q/k/v (absent: only the
 * inputs are checked; call again with them present), softmax_d like lse. Sets pass. */
int mf_problem_build_backward(mf_problem *pb, const mf_inputs *in, const mf_grad_inputs *gin,
                              const mf_options *opt, mf_error *err);

/* Shapes of out and lse for a validated problem; returns ndim. */
int mf_problem_out_shape(const mf_problem *pb, int64_t *shape);
int mf_problem_lse_shape(const mf_problem *pb, int64_t *shape);

/* Does the append pass rotate q (so q_rot must be given)? */
static inline int mf_problem_rotates_q(const mf_problem *pb) {
    return pb->app.present && pb->app.rotary_dim > 0;
}

/* Per-sequence lengths and starts (dense problems: the same for every b). Paged keys start at 0
 * in their sequence's blocks. */
static inline void mf_problem_seq(const mf_problem *pb, int b, int64_t *start_q, int64_t *len_q,
                                  int64_t *start_k, int64_t *len_k) {
    if (pb->p.flags & MF_FLAG_VARLEN) {
        *start_q = pb->cu_q[b];
        *len_q = (int64_t)pb->cu_q[b + 1] - pb->cu_q[b];
        *start_k = (pb->p.flags & MF_FLAG_PAGED) ? 0 : pb->cu_k[b];
        *len_k = (int64_t)pb->cu_k[b + 1] - pb->cu_k[b];
    } else {
        *start_q = 0;
        *len_q = pb->p.seqlen_q;
        *start_k = 0;
        *len_k = (pb->p.flags & MF_FLAG_SEQUSED_K) ? (int64_t)pb->seqused_k[b] + pb->p.seqlen_new
                                                     : pb->p.seqlen_k;
    }
}

/* The first key sequence b may see (a left-padded cache), 0 otherwise. */
static inline int64_t mf_problem_key_lo(const mf_problem *pb, int b) {
    return (pb->p.flags & MF_FLAG_LEFTPAD_K) ? pb->leftpad_k[b] : 0;
}

/* Row of the dense K/V tensors that holds sequence b (the cache row picked by cache_batch_idx). */
static inline int64_t mf_problem_kv_batch(const mf_problem *pb, int b) {
    return (pb->p.flags & MF_FLAG_KV_BATCH_IDX) ? pb->kv_index[b] : b;
}

#endif /* MF_PROBLEM_H */
