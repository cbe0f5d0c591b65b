/* problem.c - every check on the inputs of an attention call, and the one problem description.
 *
 * Messages follow one form: "[function] argument: what was expected, what was given". */
#include "problem.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

_Static_assert(sizeof(mf_params) == MF_PARAMS_SIZE, "mf_params layout changed: update MF_PARAMS_SIZE");

#define MF_MAX_SEQLEN (1LL << 30) /* keeps every window/causal bound inside int32 arithmetic */

/* The dtype spelled the way the caller's library spells it. */
static const char *spell(const mf_tensor *t, mf_dtype dt, char *buf, size_t n) {
    snprintf(buf, n, "%s%s", t->is_numpy ? "" : "torch.", mf_dtype_name(dt));
    return buf;
}

static void shape_str(const mf_tensor *t, char *buf, size_t n) {
    size_t used = (size_t)snprintf(buf, n, "(");
    for (int i = 0; i < t->ndim && used < n; i++)
        used += (size_t)snprintf(buf + used, n - used, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (used < n) snprintf(buf + used, n - used, t->ndim == 1 ? ",)" : ")");
}

static int is_float(mf_dtype dt) { return dt == MF_F32 || dt == MF_F16 || dt == MF_BF16; }

static int check_kind_and_device(const char *fn, const char *name, const mf_tensor *t,
                                 const mf_tensor *q, mf_error *err) {
    if (t->is_numpy != q->is_numpy)
        return mf_fail(err, MF_ERR_TYPE, "[%s] %s: is a %s but q is a %s; pass the same kind", fn,
                       name, t->is_numpy ? "numpy.ndarray" : "torch.Tensor",
                       q->is_numpy ? "numpy.ndarray" : "torch.Tensor");
    if (t->device != q->device)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: is on device %s but q is on %s", fn, name,
                       mf_device_name(t->device), mf_device_name(q->device));
    return MF_OK;
}

static int has_no_elements(const mf_tensor *t) {
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] == 0) return 1;
    return 0;
}

static int check_last_stride(const char *fn, const char *name, const mf_tensor *t, mf_error *err) {
    int last = t->ndim - 1;
    /* An empty array is never read (NumPy gives zero-size arrays all-zero strides). */
    if (t->shape[last] > 1 && t->stride[last] != 1 && !has_no_elements(t))
        return mf_fail(err, MF_ERR_VALUE,
                       "[%s] %s: the last dimension must be contiguous (stride 1), got stride %lld; "
                       "call .contiguous() first",
                       fn, name, (long long)t->stride[last]);
    return MF_OK;
}

static int check_ndim(const char *fn, const char *name, const mf_tensor *t, int want,
                      const char *layout, mf_error *err) {
    if (t->ndim != want)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: expected %d dimensions %s, got %d", fn, name,
                       want, layout, t->ndim);
    return MF_OK;
}

static int check_dim(const char *fn, const char *name, const char *what, int64_t got,
                     const char *other, int64_t want, mf_error *err) {
    if (got != want)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: %s %lld does not match %s's %lld", fn, name, what,
                       (long long)got, other, (long long)want);
    return MF_OK;
}

/* cu_seqlens: int32, 1-D, contiguous, CPU, starts at 0, non-decreasing, ends within `rows`. */
static int check_cu_seqlens(const char *fn, const char *name, const mf_tensor *t, int64_t rows,
                            const char *rows_of, int64_t max_seqlen, const char *max_name,
                            mf_error *err) {
    char b1[48];
    if (!t->present)
        return mf_fail(err, MF_ERR_TYPE, "[%s] %s: expected an int32 tensor, got None", fn, name);
    if (t->dtype != MF_I32)
        return mf_fail(err, MF_ERR_TYPE, "[%s] %s: expected dtype %s, got %s", fn, name,
                       spell(t, MF_I32, b1, sizeof b1), t->dtype_repr);
    if (t->ndim != 1 || t->shape[0] < 1) {
        char s[96];
        shape_str(t, s, sizeof s);
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: expected a 1-D tensor of batch + 1 >= 1 offsets, "
                       "got shape %s", fn, name, s);
    }
    if (t->device != MF_DEV_CPU || t->data == NULL)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: must be readable on the CPU", fn, name);
    if (t->shape[0] > 1 && t->stride[0] != 1)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: must be contiguous, got stride %lld", fn, name,
                       (long long)t->stride[0]);
    if (max_seqlen < 0 || max_seqlen > MF_MAX_SEQLEN)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: expected 0 <= %s <= 2**30, got %lld", fn,
                       max_name, max_name, (long long)max_seqlen);
    const int32_t *cu = (const int32_t *)t->data;
    if (cu[0] != 0)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: must start at 0, got %d", fn, name, cu[0]);
    for (int64_t i = 1; i < t->shape[0]; i++) {
        if (cu[i] < cu[i - 1])
            return mf_fail(err, MF_ERR_VALUE,
                           "[%s] %s: must be non-decreasing, but entry %lld (%d) < entry %lld (%d)",
                           fn, name, (long long)i, cu[i], (long long)(i - 1), cu[i - 1]);
        if ((int64_t)cu[i] - cu[i - 1] > max_seqlen)
            return mf_fail(err, MF_ERR_VALUE,
                           "[%s] %s=%lld is smaller than the length %lld of sequence %lld in %s", fn,
                           max_name, (long long)max_seqlen, (long long)cu[i] - cu[i - 1],
                           (long long)(i - 1), name);
    }
    if (cu[t->shape[0] - 1] > rows)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: last entry %d exceeds the %lld rows of %s", fn,
                       name, cu[t->shape[0] - 1], (long long)rows, rows_of);
    return MF_OK;
}

int mf_problem_build(mf_problem *pb, const mf_tensor *q, const mf_tensor *k, const mf_tensor *v,
                     const mf_tensor *out, const mf_tensor *lse, const mf_tensor *cu_q,
                     const mf_tensor *cu_k, const mf_tensor *alibi, const mf_options *opt,
                     mf_error *err) {
    const char *fn = opt->fn;
    char b1[48], b2[48];
    int rc;
    memset(pb, 0, sizeof *pb);
    pb->fn = fn;

    /* dtypes and devices */
    if (!is_float(q->dtype))
        return mf_fail(err, MF_ERR_TYPE, "[%s] q: expected dtype %s, got %s", fn,
                       q->is_numpy ? "float16 or float32" : "torch.float16, torch.bfloat16 or torch.float32",
                       q->dtype_repr);
    if (q->device == MF_DEV_CUDA)
        return mf_fail(err, MF_ERR_VALUE,
                       "[%s] q: CUDA tensors are not served by mtlflash; on NVIDIA GPUs install the "
                       "flash-attn package (pip install flash-attn)", fn);
    const mf_tensor *kv[2] = {k, v};
    const char *kv_name[2] = {"k", "v"};
    for (int i = 0; i < 2; i++) {
        if ((rc = check_kind_and_device(fn, kv_name[i], kv[i], q, err))) return rc;
        if (kv[i]->dtype != q->dtype)
            return mf_fail(err, MF_ERR_TYPE, "[%s] %s: dtype %s does not match q's dtype %s", fn,
                           kv_name[i], kv[i]->dtype_repr, q->dtype_repr);
    }

    /* shapes */
    const int varlen = opt->varlen;
    const int nd = varlen ? 3 : 4;
    const char *layout_q = varlen ? "(total_q, heads, head_dim)" : "(batch, seqlen_q, heads, head_dim)";
    const char *layout_k = varlen ? "(total_k, heads_k, head_dim)" : "(batch, seqlen_k, heads_k, head_dim)";
    if ((rc = check_ndim(fn, "q", q, nd, layout_q, err))) return rc;
    if ((rc = check_ndim(fn, "k", k, nd, layout_k, err))) return rc;
    if ((rc = check_ndim(fn, "v", v, nd, layout_k, err))) return rc;
    const int o = varlen ? 0 : 1; /* index of the sequence dimension */
    int64_t B = varlen ? 0 : q->shape[0];
    int64_t Sq = q->shape[o], Sk = k->shape[o];
    int64_t Hq = q->shape[o + 1], Hk = k->shape[o + 1];
    int64_t D = q->shape[o + 2], Dv = v->shape[o + 2];
    if (!varlen) {
        if ((rc = check_dim(fn, "k", "batch size", k->shape[0], "q", B, err))) return rc;
        if ((rc = check_dim(fn, "v", "batch size", v->shape[0], "q", B, err))) return rc;
    }
    if ((rc = check_dim(fn, "v", varlen ? "number of rows" : "sequence length", v->shape[o], "k", Sk, err)))
        return rc;
    if (Hq < 1) return mf_fail(err, MF_ERR_VALUE, "[%s] q: needs at least one head, got %lld", fn, (long long)Hq);
    if (Hk < 1) return mf_fail(err, MF_ERR_VALUE, "[%s] k: needs at least one head, got %lld", fn, (long long)Hk);
    if ((rc = check_dim(fn, "v", "number of heads", v->shape[o + 1], "k", Hk, err))) return rc;
    if (Hq % Hk != 0)
        return mf_fail(err, MF_ERR_VALUE,
                       "[%s] k: its %lld heads must divide q's %lld heads (grouped-query attention "
                       "needs heads_q %% heads_k == 0)", fn, (long long)Hk, (long long)Hq);
    if ((rc = check_dim(fn, "k", "head dim", k->shape[o + 2], "q", D, err))) return rc;
    if (D < 1 || D > MF_MAX_HEAD_DIM)
        return mf_fail(err, MF_ERR_VALUE, "[%s] q: head dim must be between 1 and %d, got %lld", fn,
                       MF_MAX_HEAD_DIM, (long long)D);
    if (Dv < 1 || Dv > MF_MAX_HEAD_DIM)
        return mf_fail(err, MF_ERR_VALUE, "[%s] v: head dim must be between 1 and %d, got %lld", fn,
                       MF_MAX_HEAD_DIM, (long long)Dv);
    if ((rc = check_last_stride(fn, "q", q, err))) return rc;
    if ((rc = check_last_stride(fn, "k", k, err))) return rc;
    if ((rc = check_last_stride(fn, "v", v, err))) return rc;
    if (!varlen && (Sq > MF_MAX_SEQLEN || Sk > MF_MAX_SEQLEN))
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: sequence length %lld exceeds the supported 2**30",
                       fn, Sq > MF_MAX_SEQLEN ? "q" : "k", (long long)(Sq > Sk ? Sq : Sk));
    if (B > INT32_MAX || Hq > INT32_MAX)
        return mf_fail(err, MF_ERR_VALUE, "[%s] q: batch or head count exceeds 2**31 - 1", fn);

    /* varlen offsets */
    if (varlen) {
        if ((rc = check_cu_seqlens(fn, "cu_seqlens_q", cu_q, Sq, "q", opt->max_seqlen_q, "max_seqlen_q", err)))
            return rc;
        if ((rc = check_cu_seqlens(fn, "cu_seqlens_k", cu_k, Sk, "k", opt->max_seqlen_k, "max_seqlen_k", err)))
            return rc;
        if (cu_k->shape[0] != cu_q->shape[0])
            return mf_fail(err, MF_ERR_VALUE,
                           "[%s] cu_seqlens_k: has %lld entries but cu_seqlens_q has %lld (both "
                           "must be batch + 1)", fn, (long long)cu_k->shape[0], (long long)cu_q->shape[0]);
        B = cu_q->shape[0] - 1;
        if (B > INT32_MAX)
            return mf_fail(err, MF_ERR_VALUE, "[%s] cu_seqlens_q: too many sequences", fn);
        pb->cu_q = (const int32_t *)cu_q->data;
        pb->cu_k = (const int32_t *)cu_k->data;
        pb->total_q = Sq;
        pb->tcu_q = *cu_q;
        pb->tcu_k = *cu_k;
    }

    /* ALiBi slopes: fp32 (Hq,) or (B, Hq) */
    if (alibi->present) {
        if ((rc = check_kind_and_device(fn, "alibi_slopes", alibi, q, err))) return rc;
        if (alibi->dtype != MF_F32)
            return mf_fail(err, MF_ERR_TYPE, "[%s] alibi_slopes: expected dtype %s, got %s", fn,
                           spell(alibi, MF_F32, b1, sizeof b1), alibi->dtype_repr);
        int ok = (alibi->ndim == 1 && alibi->shape[0] == Hq) ||
                 (alibi->ndim == 2 && alibi->shape[0] == B && alibi->shape[1] == Hq);
        if (!ok) {
            char s[96];
            shape_str(alibi, s, sizeof s);
            return mf_fail(err, MF_ERR_VALUE, "[%s] alibi_slopes: expected shape (%lld,) or (%lld, %lld), got %s",
                           fn, (long long)Hq, (long long)B, (long long)Hq, s);
        }
        if ((rc = check_last_stride(fn, "alibi_slopes", alibi, err))) return rc;
        pb->p.alibi_stride_b = alibi->ndim == 2 ? alibi->stride[0] : 0;
        pb->p.flags |= MF_FLAG_ALIBI;
        pb->alibi = (const float *)alibi->data;
        pb->talibi = *alibi;
    }

    /* scalar options */
    if (opt->has_scale && !isfinite(opt->softmax_scale))
        return mf_fail(err, MF_ERR_VALUE, "[%s] softmax_scale: must be a finite number, got %g", fn,
                       opt->softmax_scale);
    if (!(opt->softcap >= 0.0) || !isfinite(opt->softcap))
        return mf_fail(err, MF_ERR_VALUE, "[%s] softcap: must be a finite number >= 0, got %g", fn,
                       opt->softcap);
    double scale = opt->has_scale ? opt->softmax_scale : 1.0 / sqrt((double)D);
    int64_t wl = opt->window_left, wr = opt->causal ? 0 : opt->window_right;
    if (wl < 0 || wl > MF_MAX_SEQLEN) wl = -1; /* beyond any length: same as unbounded */
    if (wr < 0 || wr > MF_MAX_SEQLEN) wr = -1;

    /* the params block */
    mf_params *p = &pb->p;
    const int64_t *qs = q->stride, *ks = k->stride, *vs = v->stride;
    p->q_stride_b = varlen ? 0 : qs[0];
    p->q_stride_s = qs[o];
    p->q_stride_h = qs[o + 1];
    p->k_stride_b = varlen ? 0 : ks[0];
    p->k_stride_s = ks[o];
    p->k_stride_h = ks[o + 1];
    p->v_stride_b = varlen ? 0 : vs[0];
    p->v_stride_s = vs[o];
    p->v_stride_h = vs[o + 1];
    p->batch = (mf_i32)B;
    p->heads_q = (mf_i32)Hq;
    p->heads_k = (mf_i32)Hk;
    p->group = (mf_i32)(Hq / Hk);
    p->head_dim = (mf_i32)D;
    p->head_dim_v = (mf_i32)Dv;
    p->seqlen_q = (mf_i32)(varlen ? opt->max_seqlen_q : Sq);
    p->seqlen_k = (mf_i32)(varlen ? opt->max_seqlen_k : Sk);
    p->window_left = (mf_i32)wl;
    p->window_right = (mf_i32)wr;
    p->num_splits = 1;
    p->split_size = 0;
    p->scale = (float)scale;
    p->scale_log2 = (float)(scale * 1.4426950408889634);
    p->softcap = (float)opt->softcap;
    if (varlen) p->flags |= MF_FLAG_VARLEN;
    if (opt->softcap > 0.0) p->flags |= MF_FLAG_SOFTCAP;
    if (opt->causal) p->flags |= MF_FLAG_CAUSAL;

    pb->dtype = q->dtype;
    pb->device = q->device;
    pb->q = q->data;
    pb->k = k->data;
    pb->v = v->data;
    pb->tq = *q;
    pb->tk = *k;
    pb->tv = *v;

    /* outputs (allocated by the caller from mf_problem_out_shape / mf_problem_lse_shape) */
    if (out->present) {
        int64_t want[4];
        int n = mf_problem_out_shape(pb, want);
        int ok = out->ndim == n && out->dtype == q->dtype && out->device == q->device &&
                 out->is_numpy == q->is_numpy;
        for (int i = 0; ok && i < n; i++) ok = out->shape[i] == want[i];
        if (!ok) return mf_fail(err, MF_ERR_VALUE, "[%s] out: wrong shape, dtype or device", fn);
        if ((rc = check_last_stride(fn, "out", out, err))) return rc;
        p->o_stride_b = varlen ? 0 : out->stride[0];
        p->o_stride_s = out->stride[o];
        p->o_stride_h = out->stride[o + 1];
        pb->o = out->data;
        pb->to = *out;
    }
    if (lse->present) {
        int64_t want[3];
        int n = mf_problem_lse_shape(pb, want);
        int ok = lse->ndim == n && lse->dtype == MF_F32 && lse->device == q->device;
        for (int i = 0; ok && i < n; i++) ok = lse->shape[i] == want[i];
        if (!ok) return mf_fail(err, MF_ERR_VALUE, "[%s] lse: wrong shape, dtype or device", fn);
        if ((rc = check_last_stride(fn, "lse", lse, err))) return rc;
        p->lse_stride_b = varlen ? 0 : lse->stride[0];
        p->lse_stride_h = lse->stride[varlen ? 0 : 1];
        p->flags |= MF_FLAG_LSE;
        pb->lse = (float *)lse->data;
        pb->tlse = *lse;
    }
    (void)b2;
    return MF_OK;
}

int mf_problem_out_shape(const mf_problem *pb, int64_t *shape) {
    const mf_params *p = &pb->p;
    if (p->flags & MF_FLAG_VARLEN) {
        shape[0] = pb->total_q;
        shape[1] = p->heads_q;
        shape[2] = p->head_dim_v;
        return 3;
    }
    shape[0] = p->batch;
    shape[1] = p->seqlen_q;
    shape[2] = p->heads_q;
    shape[3] = p->head_dim_v;
    return 4;
}

int mf_problem_lse_shape(const mf_problem *pb, int64_t *shape) {
    const mf_params *p = &pb->p;
    if (p->flags & MF_FLAG_VARLEN) {
        shape[0] = p->heads_q;
        shape[1] = pb->total_q;
        return 2;
    }
    shape[0] = p->batch;
    shape[1] = p->heads_q;
    shape[2] = p->seqlen_q;
    return 3;
}
