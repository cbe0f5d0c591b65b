/* problem.h - ONE validated description of an attention forward problem.
 *
 * Built from tensor views and options by mf_problem_build, which holds every check and every
 * error message. Backends read only this struct: `p` is exactly the mf_params block the Metal
 * kernels receive; the pointers are what the CPU backend reads and writes. */
#ifndef MF_PROBLEM_H
#define MF_PROBLEM_H

#include "mf_common.h"
#include "metal/mf_params.h"

#define MF_MAX_HEAD_DIM 256

typedef struct mf_options {
    const char *fn;        /* public function name, prefixes every message */
    int varlen;
    int has_scale;         /* softmax_scale given (else head_dim ** -0.5) */
    double softmax_scale;
    int causal;
    int64_t window_left, window_right; /* < 0: unbounded */
    double softcap;
    int64_t max_seqlen_q, max_seqlen_k; /* varlen only */
    int want_lse;
} mf_options;

typedef struct mf_problem {
    mf_params p;
    mf_dtype dtype;          /* q, k, v and out share it */
    mf_device device;
    const char *fn;
    /* CPU addresses (NULL on MPS) */
    const void *q, *k, *v;
    void *o;
    float *lse;              /* NULL when not wanted */
    const int32_t *cu_q, *cu_k; /* varlen offsets (always CPU memory) */
    const float *alibi;
    int64_t total_q;         /* varlen: rows of q (rows past cu_q[batch] are zero-filled) */
    /* the views, for backends that bind device buffers */
    mf_tensor tq, tk, tv, to, tlse, tcu_q, tcu_k, talibi;
} mf_problem;

/* Validates inputs and options. out/lse may be absent (present == 0): then only the inputs are
 * checked and mf_problem_out_shape tells what to allocate; call again with them present. */
int mf_problem_build(mf_problem *pb, const mf_tensor *q, const mf_tensor *k, const mf_tensor *v,
                     const mf_tensor *out, const mf_tensor *lse, const mf_tensor *cu_q,
                     const mf_tensor *cu_k, const mf_tensor *alibi, const mf_options *opt,
                     mf_error *err);

/* Shapes of out and lse for a validated problem; returns ndim. */
int mf_problem_out_shape(const mf_problem *pb, int64_t *shape);
int mf_problem_lse_shape(const mf_problem *pb, int64_t *shape);

/* Per-sequence lengths and starts (dense problems: the same for every b). */
static inline void mf_problem_seq(const mf_problem *pb, int b, int64_t *start_q, int64_t *len_q,
                                  int64_t *start_k, int64_t *len_k) {
    if (pb->p.flags & MF_FLAG_VARLEN) {
        *start_q = pb->cu_q[b];
        *len_q = (int64_t)pb->cu_q[b + 1] - pb->cu_q[b];
        *start_k = pb->cu_k[b];
        *len_k = (int64_t)pb->cu_k[b + 1] - pb->cu_k[b];
    } else {
        *start_q = 0;
        *len_q = pb->p.seqlen_q;
        *start_k = 0;
        *len_k = pb->p.seqlen_k;
    }
}

#endif /* MF_PROBLEM_H */
