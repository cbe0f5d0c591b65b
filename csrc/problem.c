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

/* A 1-D int32 index tensor readable on the CPU (the Python layer passes CPU copies of device
 * tensors): (want,) entries, contiguous. FA2 requires int32 for every index argument. */
static int check_index_vector(const char *fn, const char *name, const mf_tensor *t, int64_t want,
                              mf_error *err) {
    char b1[48];
    if (t->dtype != MF_I32)
        return mf_fail(err, MF_ERR_TYPE, "[%s] %s: expected dtype %s (FlashAttention-2 requires int32), got %s",
                       fn, name, spell(t, MF_I32, b1, sizeof b1), t->dtype_repr);
    if (t->ndim != 1 || t->shape[0] != want) {
        char s[96];
        shape_str(t, s, sizeof s);
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: expected shape (%lld,) (one entry per sequence), got %s",
                       fn, name, (long long)want, s);
    }
    if (t->device != MF_DEV_CPU || t->data == NULL)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: must be readable on the CPU", fn, name);
    if (want > 1 && t->stride[0] != 1)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: must be contiguous, got stride %lld", fn, name,
                       (long long)t->stride[0]);
    return MF_OK;
}

/* The kv layout: dense strided K/V (optionally rows picked by cache_batch_idx), or paged through
 * a block table; for a kv cache also the lengths, left padding, the rows to append and rotary.
 * Sets p's k/v strides, flags, seqlen_k; checks every index against what it addresses. */
static int build_kv_layout(mf_problem *pb, const mf_inputs *in, const mf_options *opt, int64_t B,
                           int64_t Sq, int64_t Hk, int64_t D, int64_t Dv, mf_error *err) {
    const char *fn = opt->fn;
    const mf_tensor *q = &in->q, *k = &in->k, *v = &in->v;
    const mf_tensor *bt = &in->block_table;
    mf_params *p = &pb->p;
    char b1[48];
    int rc;
    const int paged = bt->present;
    /* lengths of the key axis: capacity of each sequence's storage */
    int64_t capacity;
    if (paged) {
        if (bt->dtype != MF_I32)
            return mf_fail(err, MF_ERR_TYPE, "[%s] block_table: expected dtype %s (FlashAttention-2 requires "
                           "int32), got %s", fn, spell(bt, MF_I32, b1, sizeof b1), bt->dtype_repr);
        if (bt->ndim != 2 || bt->shape[0] != B) {
            char s[96];
            shape_str(bt, s, sizeof s);
            return mf_fail(err, MF_ERR_VALUE, "[%s] block_table: expected shape (batch=%lld, max_blocks), got %s",
                           fn, (long long)B, s);
        }
        if (bt->device != MF_DEV_CPU || bt->data == NULL)
            return mf_fail(err, MF_ERR_VALUE, "[%s] block_table: must be readable on the CPU", fn);
        if ((rc = check_last_stride(fn, "block_table", bt, err))) return rc;
        if (in->cache_batch_idx.present)
            return mf_fail(err, MF_ERR_VALUE, "[%s] cache_batch_idx: cannot be combined with block_table (a "
                           "paged cache picks each sequence's blocks through block_table)", fn);
        if (k->shape[1] < 1)
            return mf_fail(err, MF_ERR_VALUE, "[%s] k_cache: page size (dimension 1) must be >= 1, got %lld",
                           fn, (long long)k->shape[1]);
        if ((rc = check_dim(fn, "v_cache", "number of blocks", v->shape[0], "k_cache", k->shape[0], err))) return rc;
        if ((rc = check_dim(fn, "v_cache", "page size", v->shape[1], "k_cache", k->shape[1], err))) return rc;
        if (k->shape[1] > MF_MAX_SEQLEN || bt->shape[1] > MF_MAX_SEQLEN / k->shape[1])
            return mf_fail(err, MF_ERR_VALUE, "[%s] block_table: max_blocks x page size exceeds 2**30 keys", fn);
        capacity = bt->shape[1] * k->shape[1];
        pb->num_blocks = k->shape[0];
        p->page_size = (mf_i32)k->shape[1];
        p->block_table_stride_b = bt->stride[0];
        p->flags |= MF_FLAG_PAGED;
        pb->kv_index = (const int32_t *)bt->data;
        pb->tkv_index = *bt;
    } else {
        capacity = k->shape[1];
        if (opt->kvcache) {
            const mf_tensor *bi = &in->cache_batch_idx;
            if (bi->present) {
                if ((rc = check_index_vector(fn, "cache_batch_idx", bi, B, err))) return rc;
                const int32_t *idx = (const int32_t *)bi->data;
                for (int64_t b = 0; b < B; b++)
                    if (idx[b] < 0 || idx[b] >= k->shape[0])
                        return mf_fail(err, MF_ERR_VALUE, "[%s] cache_batch_idx: entry %lld is %d, outside "
                                       "[0, %lld) (the batch size of k_cache)", fn, (long long)b, idx[b],
                                       (long long)k->shape[0]);
                p->flags |= MF_FLAG_KV_BATCH_IDX;
                pb->kv_index = idx;
                pb->tkv_index = *bi;
            } else if (k->shape[0] < B) {
                return mf_fail(err, MF_ERR_VALUE, "[%s] k_cache: batch size %lld is smaller than q's %lld "
                               "(pass cache_batch_idx to pick rows)", fn, (long long)k->shape[0], (long long)B);
            }
            if ((rc = check_dim(fn, "v_cache", "batch size", v->shape[0], "k_cache", k->shape[0], err))) return rc;
        }
    }
    if (!opt->kvcache) { /* varlen over a paged cache: lengths from cu_seqlens_k */
        const int32_t *cu = (const int32_t *)in->cu_k.data;
        for (int64_t b = 0; b < B; b++)
            if ((int64_t)cu[b + 1] - cu[b] > capacity)
                return mf_fail(err, MF_ERR_VALUE, "[%s] cu_seqlens_k: sequence %lld has %lld keys, more than "
                               "its block_table row holds (%lld blocks x page size %d = %lld)", fn, (long long)b,
                               (long long)cu[b + 1] - cu[b], (long long)bt->shape[1], p->page_size,
                               (long long)capacity);
    }

    /* kv cache: cache_seqlens, leftpad, the rows to append, rotary */
    int64_t max_sk = opt->kvcache ? capacity : opt->max_seqlen_k;
    if (opt->kvcache) {
        const mf_tensor *cs = &in->cache_seqlens, *lp = &in->cache_leftpad;
        const mf_tensor *kn = &in->k_new, *vn = &in->v_new, *cs_cos = &in->rotary_cos, *cs_sin = &in->rotary_sin;
        mf_append *a = &pb->app;
        int64_t s_new = 0;
        if (kn->present != vn->present)
            return mf_fail(err, MF_ERR_VALUE, "[%s] %s: k and v must be given together (got %s without %s)", fn,
                           kn->present ? "v" : "k", kn->present ? "k" : "v", kn->present ? "v" : "k");
        if (kn->present) {
            if (!cs->present)
                return mf_fail(err, MF_ERR_VALUE, "[%s] cache_seqlens: required when new k/v are appended (it "
                               "says where they go), got None", fn);
            const mf_tensor *nv[2] = {kn, vn};
            const char *nn[2] = {"k", "v"};
            const int64_t dims[2] = {D, Dv};
            for (int i = 0; i < 2; i++) {
                if ((rc = check_kind_and_device(fn, nn[i], nv[i], q, err))) return rc;
                if (nv[i]->dtype != q->dtype)
                    return mf_fail(err, MF_ERR_TYPE, "[%s] %s: dtype %s does not match q's dtype %s", fn, nn[i],
                                   nv[i]->dtype_repr, q->dtype_repr);
                if ((rc = check_ndim(fn, nn[i], nv[i], 4, "(batch, seqlen_new, heads_k, head_dim)", err))) return rc;
                if ((rc = check_dim(fn, nn[i], "batch size", nv[i]->shape[0], "q", B, err))) return rc;
                if ((rc = check_dim(fn, nn[i], "number of heads", nv[i]->shape[2], "k_cache", Hk, err))) return rc;
                if ((rc = check_dim(fn, nn[i], "head dim", nv[i]->shape[3], i ? "v_cache" : "k_cache", dims[i], err)))
                    return rc;
                if ((rc = check_last_stride(fn, nn[i], nv[i], err))) return rc;
            }
            if ((rc = check_dim(fn, "v", "number of new rows", vn->shape[1], "k", kn->shape[1], err))) return rc;
            s_new = kn->shape[1];
            const mf_tensor *caches[2] = {k, v};
            for (int i = 0; i < 2; i++)
                if (caches[i]->readonly)
                    return mf_fail(err, MF_ERR_VALUE, "[%s] %s: is read-only, but new rows are written into it "
                                   "(pass a writable array)", fn, i ? "v_cache" : "k_cache");
            a->present = 1;
            a->seqlen_new = s_new;
            a->k_new = kn->data;
            a->v_new = vn->data;
            for (int i = 0; i < 3; i++) {
                a->kn_stride[i] = kn->stride[i];
                a->vn_stride[i] = vn->stride[i];
            }
            a->tk_new = *kn;
            a->tv_new = *vn;
        }
        if (cs_cos->present != cs_sin->present)
            return mf_fail(err, MF_ERR_VALUE, "[%s] %s: rotary_cos and rotary_sin must be given together", fn,
                           cs_cos->present ? "rotary_sin" : "rotary_cos");
        if (cs_cos->present) {
            if (!kn->present)
                return mf_fail(err, MF_ERR_VALUE, "[%s] rotary_cos: rotary embedding is applied to the new k "
                               "and q only, so k and v must be given too", fn);
            const mf_tensor *rt[2] = {cs_cos, cs_sin};
            const char *rn[2] = {"rotary_cos", "rotary_sin"};
            for (int i = 0; i < 2; i++) {
                if ((rc = check_kind_and_device(fn, rn[i], rt[i], q, err))) return rc;
                if (rt[i]->dtype != q->dtype)
                    return mf_fail(err, MF_ERR_TYPE, "[%s] %s: dtype %s does not match q's dtype %s", fn, rn[i],
                                   rt[i]->dtype_repr, q->dtype_repr);
                if (rt[i]->ndim != 2 || rt[i]->shape[1] < 1 || 2 * rt[i]->shape[1] > D) {
                    char s[96];
                    shape_str(rt[i], s, sizeof s);
                    return mf_fail(err, MF_ERR_VALUE, "[%s] %s: expected shape (seqlen_ro, rotary_dim / 2) with "
                                   "1 <= rotary_dim / 2 <= head_dim / 2 = %lld, got %s", fn, rn[i],
                                   (long long)(D / 2), s);
                }
                if ((rc = check_last_stride(fn, rn[i], rt[i], err))) return rc;
            }
            if (cs_sin->shape[0] != cs_cos->shape[0] || cs_sin->shape[1] != cs_cos->shape[1])
                return mf_fail(err, MF_ERR_VALUE, "[%s] rotary_sin: shape (%lld, %lld) does not match rotary_cos's "
                               "(%lld, %lld)", fn, (long long)cs_sin->shape[0], (long long)cs_sin->shape[1],
                               (long long)cs_cos->shape[0], (long long)cs_cos->shape[1]);
            a->rotary_dim = (int)(2 * cs_cos->shape[1]);
            a->interleaved = opt->rotary_interleaved;
            a->q_per_row = opt->causal || opt->window_left >= 0 || opt->window_right >= 0;
            a->seqlen_ro = cs_cos->shape[0];
            a->cos = cs_cos->data;
            a->sin = cs_sin->data;
            a->cos_stride = cs_cos->stride[0];
            a->sin_stride = cs_sin->stride[0];
            a->tcos = *cs_cos;
            a->tsin = *cs_sin;
        }
        if (cs->present) {
            if ((rc = check_index_vector(fn, "cache_seqlens", cs, B, err))) return rc;
            const int32_t *len = (const int32_t *)cs->data;
            max_sk = 0;
            for (int64_t b = 0; b < B; b++) {
                if (len[b] < 0)
                    return mf_fail(err, MF_ERR_VALUE, "[%s] cache_seqlens: entry %lld is %d; lengths must be >= 0",
                                   fn, (long long)b, len[b]);
                if ((int64_t)len[b] + s_new > capacity)
                    return mf_fail(err, MF_ERR_VALUE,
                                   "[%s] cache_seqlens: sequence %lld holds %d rows, and %lld new ones do not fit "
                                   "the cache's capacity of %lld (%s)", fn, (long long)b, len[b], (long long)s_new,
                                   (long long)capacity, paged ? "max_blocks x page size" : "k_cache.shape[1]");
                if (len[b] + s_new > max_sk) max_sk = len[b] + s_new;
                if (a->rotary_dim > 0) {
                    /* positions rotated: new k at len + t, q at len (+ i when causal/local) */
                    int64_t last = len[b] + (s_new > 0 ? s_new - 1 : 0);
                    if (a->q_per_row && Sq > 0 && len[b] + Sq - 1 > last) last = len[b] + Sq - 1;
                    if (last >= a->seqlen_ro)
                        return mf_fail(err, MF_ERR_VALUE, "[%s] rotary_cos: has %lld positions, but sequence %lld "
                                       "needs position %lld (cache_seqlens + row)", fn, (long long)a->seqlen_ro,
                                       (long long)b, (long long)last);
                }
            }
            p->flags |= MF_FLAG_SEQUSED_K;
            p->seqlen_new = (mf_i32)s_new;
            pb->seqused_k = len;
            pb->tseqused_k = *cs;
        }
        if (lp->present) {
            if ((rc = check_index_vector(fn, "cache_leftpad", lp, B, err))) return rc;
            const int32_t *pad = (const int32_t *)lp->data;
            for (int64_t b = 0; b < B; b++) {
                const int64_t len = cs->present ? ((const int32_t *)cs->data)[b] : capacity;
                if (pad[b] < 0 || pad[b] > len)
                    return mf_fail(err, MF_ERR_VALUE, "[%s] cache_leftpad: entry %lld is %d, outside [0, %lld] "
                                   "(the first valid key cannot lie past %s)", fn, (long long)b, pad[b],
                                   (long long)len, cs->present ? "cache_seqlens" : "the cache's end");
            }
            p->flags |= MF_FLAG_LEFTPAD_K;
            pb->leftpad_k = pad;
            pb->tleftpad_k = *lp;
        }
        if (opt->num_splits < 0)
            return mf_fail(err, MF_ERR_VALUE, "[%s] num_splits: expected 0 (heuristic), 1 (no split) or more, got %lld",
                           fn, (long long)opt->num_splits);
        pb->num_splits_req = (int)(opt->num_splits > 128 ? 128 : opt->num_splits);
    }
    if (paged) { /* every block a sequence reads or writes lies in the cache */
        const int32_t *tab = (const int32_t *)bt->data;
        for (int64_t b = 0; b < B; b++) {
            int64_t len = capacity;
            if (!opt->kvcache)
                len = (int64_t)((const int32_t *)in->cu_k.data)[b + 1] - ((const int32_t *)in->cu_k.data)[b];
            else if (in->cache_seqlens.present)
                len = (int64_t)((const int32_t *)in->cache_seqlens.data)[b] + pb->app.seqlen_new;
            const int64_t used = (len + p->page_size - 1) / p->page_size;
            for (int64_t i = 0; i < used; i++) {
                const int32_t blk = tab[b * bt->stride[0] + i];
                if (blk < 0 || blk >= pb->num_blocks)
                    return mf_fail(err, MF_ERR_VALUE, "[%s] block_table: entry (%lld, %lld) is %d, outside [0, %lld) "
                                   "(the number of blocks in k_cache)", fn, (long long)b, (long long)i, blk,
                                   (long long)pb->num_blocks);
            }
        }
    }
    if (opt->kvcache) p->seqlen_k = (mf_i32)max_sk;
    return MF_OK;
}

/* dropout_p in [0, 1]; the threshold on a uniform 32-bit draw that keeps 1 - p of them */
static int build_dropout(mf_problem *pb, const mf_options *opt, mf_error *err) {
    const double pd = opt->dropout_p;
    if (!(pd >= 0.0 && pd <= 1.0))
        return mf_fail(err, MF_ERR_VALUE, "[%s] dropout_p: expected a probability in [0, 1], got %g", opt->fn, pd);
    if (pd == 0.0) return MF_OK;
    if (opt->kvcache || (opt->varlen && pb->p.flags & MF_FLAG_PAGED))
        return mf_fail(err, MF_ERR_NOTIMPL, "[%s] dropout_p=%g: dropout is not implemented with a kv cache or "
                       "block_table", opt->fn, pd);
    mf_dropout *d = &pb->drop;
    d->on = 1;
    d->p = (float)pd;
    d->seed = opt->dropout_seed;
    d->offset = opt->dropout_offset;
    const double t = floor(pd * 4294967296.0); /* p = 1e-30 (diffusers, to get lse back) drops nothing */
    d->drop_all = t >= 4294967296.0;
    d->threshold = d->drop_all ? 0xffffffffu : (uint32_t)t;
    d->keep_scale = d->drop_all ? 0.0f : (float)(1.0 / (1.0 - pd));
    return MF_OK;
}

int mf_problem_build(mf_problem *pb, const mf_inputs *in, const mf_options *opt, mf_error *err) {
    const char *fn = opt->fn;
    const mf_tensor *q = &in->q, *k = &in->k, *v = &in->v, *out = &in->out, *lse = &in->lse;
    const mf_tensor *cu_q = &in->cu_q, *cu_k = &in->cu_k, *alibi = &in->alibi;
    char b1[48];
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
    const int kvcache = opt->kvcache, paged = in->block_table.present;
    const mf_tensor *kv[2] = {k, v};
    const char *kv_name[2] = {kvcache ? "k_cache" : "k", kvcache ? "v_cache" : "v"};
    for (int i = 0; i < 2; i++) {
        if ((rc = check_kind_and_device(fn, kv_name[i], kv[i], q, err))) return rc;
        if (kv[i]->dtype != q->dtype)
            return mf_fail(err, MF_ERR_TYPE, "[%s] %s: dtype %s does not match q's dtype %s", fn,
                           kv_name[i], kv[i]->dtype_repr, q->dtype_repr);
    }

    /* shapes: q/out have a batch axis unless varlen; K/V have one unless varlen and not paged */
    const int varlen = opt->varlen;
    const int nd = varlen ? 3 : 4, ndk = (varlen && !paged) ? 3 : 4;
    const char *layout_q = varlen ? "(total_q, heads, head_dim)" : "(batch, seqlen_q, heads, head_dim)";
    const char *layout_k = paged ? "(num_blocks, page_size, heads_k, head_dim)"
                           : varlen ? "(total_k, heads_k, head_dim)"
                           : kvcache ? "(batch_cache, seqlen_cache, heads_k, head_dim)"
                                     : "(batch, seqlen_k, heads_k, head_dim)";
    if ((rc = check_ndim(fn, "q", q, nd, layout_q, err))) return rc;
    if ((rc = check_ndim(fn, kv_name[0], k, ndk, layout_k, err))) return rc;
    if ((rc = check_ndim(fn, kv_name[1], v, ndk, layout_k, err))) return rc;
    const int o = varlen ? 0 : 1;   /* index of q's sequence dimension */
    const int ok_ = ndk - 3;        /* index of k's sequence (or page slot) dimension */
    int64_t B = varlen ? 0 : q->shape[0];
    int64_t Sq = q->shape[o], Sk = k->shape[ok_];
    int64_t Hq = q->shape[o + 1], Hk = k->shape[ok_ + 1];
    int64_t D = q->shape[o + 2], Dv = v->shape[ok_ + 2];
    if (!varlen && !kvcache) {
        if ((rc = check_dim(fn, "k", "batch size", k->shape[0], "q", B, err))) return rc;
        if ((rc = check_dim(fn, "v", "batch size", v->shape[0], "q", B, err))) return rc;
    }
    if (!paged && !kvcache)
        if ((rc = check_dim(fn, kv_name[1], varlen ? "number of rows" : "sequence length", v->shape[ok_],
                            kv_name[0], Sk, err)))
            return rc;
    if (kvcache && !paged)
        if ((rc = check_dim(fn, "v_cache", "sequence length", v->shape[1], "k_cache", Sk, err))) return rc;
    if (Hq < 1) return mf_fail(err, MF_ERR_VALUE, "[%s] q: needs at least one head, got %lld", fn, (long long)Hq);
    if (Hk < 1)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: needs at least one head, got %lld", fn, kv_name[0], (long long)Hk);
    if ((rc = check_dim(fn, kv_name[1], "number of heads", v->shape[ok_ + 1], kv_name[0], Hk, err))) return rc;
    if (Hq % Hk != 0)
        return mf_fail(err, MF_ERR_VALUE,
                       "[%s] %s: its %lld heads must divide q's %lld heads (grouped-query attention "
                       "needs heads_q %% heads_k == 0)", fn, kv_name[0], (long long)Hk, (long long)Hq);
    if ((rc = check_dim(fn, kv_name[0], "head dim", k->shape[ok_ + 2], "q", D, err))) return rc;
    if (D < 1 || D > MF_MAX_HEAD_DIM)
        return mf_fail(err, MF_ERR_VALUE, "[%s] q: head dim must be between 1 and %d, got %lld", fn,
                       MF_MAX_HEAD_DIM, (long long)D);
    if (Dv < 1 || Dv > MF_MAX_HEAD_DIM_V)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: head dim must be between 1 and %d, got %lld", fn, kv_name[1],
                       MF_MAX_HEAD_DIM_V, (long long)Dv);
    if ((rc = check_last_stride(fn, "q", q, err))) return rc;
    if ((rc = check_last_stride(fn, kv_name[0], k, err))) return rc;
    if ((rc = check_last_stride(fn, kv_name[1], v, err))) return rc;
    if (!varlen && (Sq > MF_MAX_SEQLEN || Sk > MF_MAX_SEQLEN))
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: sequence length %lld exceeds the supported 2**30",
                       fn, Sq > MF_MAX_SEQLEN ? "q" : kv_name[0], (long long)(Sq > Sk ? Sq : Sk));
    if (B > INT32_MAX || Hq > INT32_MAX)
        return mf_fail(err, MF_ERR_VALUE, "[%s] q: batch or head count exceeds 2**31 - 1", fn);

    /* varlen offsets (a paged varlen call takes only lengths from cu_seqlens_k) */
    if (varlen) {
        if ((rc = check_cu_seqlens(fn, "cu_seqlens_q", cu_q, Sq, "q", opt->max_seqlen_q, "max_seqlen_q", err)))
            return rc;
        if ((rc = check_cu_seqlens(fn, "cu_seqlens_k", cu_k, paged ? INT32_MAX : Sk, "k", opt->max_seqlen_k,
                                   "max_seqlen_k", err)))
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
    if (paged || kvcache)
        if ((rc = build_kv_layout(pb, in, opt, B, Sq, Hk, D, Dv, err))) return rc;

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
    if ((rc = build_dropout(pb, opt, err))) return rc;
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
    p->k_stride_b = ndk == 4 ? ks[0] : 0;
    p->k_stride_s = ks[ok_];
    p->k_stride_h = ks[ok_ + 1];
    p->v_stride_b = ndk == 4 ? vs[0] : 0;
    p->v_stride_s = vs[ok_];
    p->v_stride_h = vs[ok_ + 1];
    p->batch = (mf_i32)B;
    p->heads_q = (mf_i32)Hq;
    p->heads_k = (mf_i32)Hk;
    p->group = (mf_i32)(Hq / Hk);
    p->head_dim = (mf_i32)D;
    p->head_dim_v = (mf_i32)Dv;
    p->seqlen_q = (mf_i32)(varlen ? opt->max_seqlen_q : Sq);
    if (!kvcache) p->seqlen_k = (mf_i32)(varlen ? opt->max_seqlen_k : Sk); /* kv cache: set by build_kv_layout */
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

    /* the rotated q the append pass writes, read by attention in place of q */
    if (mf_problem_rotates_q(pb) && in->q_rot.present) {
        const mf_tensor *qr = &in->q_rot;
        int ok = qr->ndim == 4 && qr->dtype == q->dtype && qr->device == q->device && qr->is_numpy == q->is_numpy;
        for (int i = 0; ok && i < 4; i++) ok = qr->shape[i] == q->shape[i];
        if (!ok) return mf_fail(err, MF_ERR_VALUE, "[%s] q_rot: wrong shape, dtype or device", fn);
        if ((rc = check_last_stride(fn, "q_rot", qr, err))) return rc;
        mf_append *a = &pb->app;
        a->q_src = q->data;
        for (int i = 0; i < 3; i++) a->qs_stride[i] = q->stride[i];
        a->tq_src = *q;
        p->q_stride_b = qr->stride[0];
        p->q_stride_s = qr->stride[1];
        p->q_stride_h = qr->stride[2];
        pb->q = qr->data;
        pb->tq = *qr;
    }

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

/* A gradient (or dout) tensor that must look like `like` (shape, dtype, device, kind). */
static int check_like(const char *fn, const char *name, const mf_tensor *t, const mf_tensor *like,
                      const char *like_name, int writable, mf_error *err) {
    char s1[96], s2[96];
    int rc;
    if ((rc = check_kind_and_device(fn, name, t, like, err))) return rc;
    if (t->dtype != like->dtype)
        return mf_fail(err, MF_ERR_TYPE, "[%s] %s: dtype %s does not match %s's dtype %s", fn, name, t->dtype_repr,
                       like_name, like->dtype_repr);
    int same = t->ndim == like->ndim;
    for (int i = 0; same && i < t->ndim; i++) same = t->shape[i] == like->shape[i];
    if (!same) {
        shape_str(t, s1, sizeof s1);
        shape_str(like, s2, sizeof s2);
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: expected the shape of %s %s, got %s", fn, name, like_name, s2, s1);
    }
    if ((rc = check_last_stride(fn, name, t, err))) return rc;
    if (writable && t->readonly)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: is read-only, but the gradient is written into it", fn, name);
    return MF_OK;
}

static void copy_strides(int64_t *dst, const mf_tensor *t, int varlen) {
    dst[0] = varlen ? 0 : t->stride[0];
    dst[1] = t->stride[varlen ? 0 : 1];
    dst[2] = t->stride[varlen ? 1 : 2];
}

int mf_problem_build_backward(mf_problem *pb, const mf_inputs *in, const mf_grad_inputs *gin,
                              const mf_options *opt, mf_error *err) {
    const char *fn = opt->fn;
    int rc;
    if (opt->kvcache || in->block_table.present)
        return mf_fail(err, MF_ERR_NOTIMPL, "[%s] the backward pass does not support a kv cache or block_table "
                       "(FlashAttention-2 has no backward for them either)", fn);
    if (!in->out.present)
        return mf_fail(err, MF_ERR_VALUE, "[%s] out: the backward pass needs the forward's output, got None", fn);
    if (!in->lse.present)
        return mf_fail(err, MF_ERR_VALUE, "[%s] softmax_lse: the backward pass needs the forward's lse (run the "
                       "forward with return_attn_probs=True / return_lse), got None", fn);
    if (!gin->dout.present)
        return mf_fail(err, MF_ERR_VALUE, "[%s] dout: expected the gradient of out, got None", fn);
    if ((rc = mf_problem_build(pb, in, opt, err))) return rc;
    if (pb->device != MF_DEV_CPU && pb->device != MF_DEV_MPS)
        return mf_fail(err, MF_ERR_VALUE, "[%s] q: the backward pass runs on CPU or MPS tensors", fn);
    pb->pass = MF_PASS_BACKWARD;
    const int varlen = (pb->p.flags & MF_FLAG_VARLEN) != 0;
    mf_grad *g = &pb->grad;
    if ((rc = check_like(fn, "dout", &gin->dout, &in->out, "out", 0, err))) return rc;
    g->dout = gin->dout.data;
    g->tdout = gin->dout;
    copy_strides(g->do_stride, &gin->dout, varlen);
    g->total_k = in->k.shape[0];
    const mf_tensor *gt[3] = {&gin->dq, &gin->dk, &gin->dv}, *like[3] = {&in->q, &in->k, &in->v};
    const char *gn[3] = {"dq", "dk", "dv"}, *ln[3] = {"q", "k", "v"};
    int64_t *gs[3] = {g->dq_stride, g->dk_stride, g->dv_stride};
    void **gp[3] = {&g->dq, &g->dk, &g->dv};
    mf_tensor *gv[3] = {&g->tdq, &g->tdk, &g->tdv};
    for (int i = 0; i < 3; i++) {
        if (!gt[i]->present) continue; /* allocated by the caller after this check */
        if ((rc = check_like(fn, gn[i], gt[i], like[i], ln[i], 1, err))) return rc;
        *gp[i] = gt[i]->data;
        *gv[i] = *gt[i];
        copy_strides(gs[i], gt[i], varlen);
    }
    if (gin->softmax_d.present) {
        const mf_tensor *d = &gin->softmax_d;
        if ((rc = check_like(fn, "softmax_d", d, &in->lse, "softmax_lse", 1, err))) return rc;
        g->delta = (float *)d->data;
        g->tdelta = *d;
        g->delta_stride_b = varlen ? 0 : d->stride[0];
        g->delta_stride_h = d->stride[varlen ? 0 : 1];
        if (d->ndim >= 1 && d->stride[d->ndim - 1] != 1 && d->shape[d->ndim - 1] > 1)
            return mf_fail(err, MF_ERR_VALUE, "[%s] softmax_d: must be contiguous along the rows", fn);
    }
    /* lse is read along rows with unit stride too (check_last_stride in mf_problem_build) */
    return MF_OK;
}
