/* module.c - the extension module mtlflash._C: argument parsing, output allocation, dispatch.
 *
 * Pipeline: Python objects -> tensor views (tensor.c) -> one validated problem (problem.c)
 * -> plan (plan.c) -> backend (cpu/ or metal/). The GIL is released only around the compute. */
#define PY_SSIZE_T_CLEAN
#define PY_ARRAY_UNIQUE_SYMBOL mtlflash_ARRAY_API
#include <Python.h>
#include <numpy/arrayobject.h>
#include <stdlib.h>

#include "cpu/cpu.h"
#include "metal/bridge.h"
#include "metal/dispatch.h"
#include "metal/sources.h"
#include "plan.h"
#include "problem.h"
#include "tensor.h"

static PyObject *raise(const mf_error *err) {
    PyObject *type = PyExc_RuntimeError;
    switch (err->kind) {
    case MF_ERR_TYPE: type = PyExc_TypeError; break;
    case MF_ERR_VALUE: type = PyExc_ValueError; break;
    case MF_ERR_NOTIMPL: type = PyExc_NotImplementedError; break;
    case MF_ERR_MEMORY: type = PyExc_MemoryError; break;
    default: break;
    }
    PyErr_SetString(type, err->msg);
    return NULL;
}

/* Every argument of one attention call, as the Python layer passes them. */
typedef struct call_args {
    const char *fn;
    PyObject *q, *k, *v, *out, *lse, *cu_q, *cu_k, *alibi, *block_table;
    PyObject *cu_q_dev, *cu_k_dev; /* varlen offsets on the inputs' device (Metal tiers) */
    /* kv cache (flash_attn_with_kvcache); index tensors come as CPU copies (validated and read
     * here) and, for the Metal tiers, on the inputs' device */
    PyObject *k_new, *v_new, *cos, *sin, *cache_seqlens, *cache_batch_idx, *cache_leftpad;
    PyObject *kv_index_dev, *seqused_dev, *leftpad_dev;
    PyObject *q_rot;
    long long max_q, max_k, window_left, window_right;
    PyObject *scale;
    int causal, want_lse, num_splits, rotary_interleaved, kvcache;
    double softcap;
    double dropout_p;
    unsigned long long seed, offset;
    mf_inputs in;
    mf_options opt;
} call_args;

/* Builds views and options from parsed arguments (outputs only if given). */
static int views_and_options(call_args *a, mf_error *err) {
    int rc;
    const char *fn = a->fn;
    mf_inputs *in = &a->in;
    struct { PyObject *obj; const char *name; int optional; mf_tensor *t; } v[] = {
        {a->q, "q", 0, &in->q},
        {a->k, a->kvcache ? "k_cache" : "k", 0, &in->k},
        {a->v, a->kvcache ? "v_cache" : "v", 0, &in->v},
        {a->out, "out", 1, &in->out},
        {a->lse, "lse", 1, &in->lse},
        {a->cu_q, "cu_seqlens_q", 1, &in->cu_q},
        {a->cu_k, "cu_seqlens_k", 1, &in->cu_k},
        {a->alibi, "alibi_slopes", 1, &in->alibi},
        {a->block_table, "block_table", 1, &in->block_table},
        {a->k_new, "k", 1, &in->k_new},
        {a->v_new, "v", 1, &in->v_new},
        {a->cos, "rotary_cos", 1, &in->rotary_cos},
        {a->sin, "rotary_sin", 1, &in->rotary_sin},
        {a->cache_seqlens, "cache_seqlens", 1, &in->cache_seqlens},
        {a->cache_batch_idx, "cache_batch_idx", 1, &in->cache_batch_idx},
        {a->cache_leftpad, "cache_leftpad", 1, &in->cache_leftpad},
        {a->q_rot, "q_rot", 1, &in->q_rot},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        if ((rc = mf_tensor_view(v[i].obj, fn, v[i].name, v[i].optional, v[i].t, err))) return rc;
    mf_options *o = &a->opt;
    o->fn = fn;
    o->varlen = in->cu_q.present || in->cu_k.present;
    o->kvcache = a->kvcache;
    o->has_scale = a->scale != Py_None;
    if (o->has_scale) {
        o->softmax_scale = PyFloat_AsDouble(a->scale);
        if (o->softmax_scale == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return mf_fail(err, MF_ERR_TYPE, "[%s] softmax_scale: expected a float or None, got %s", fn,
                           Py_TYPE(a->scale)->tp_name);
        }
    }
    o->causal = a->causal;
    o->window_left = a->window_left;
    o->window_right = a->window_right;
    o->softcap = a->softcap;
    o->max_seqlen_q = a->max_q;
    o->max_seqlen_k = a->max_k;
    o->want_lse = a->want_lse;
    o->rotary_interleaved = a->rotary_interleaved;
    o->num_splits = a->num_splits;
    o->dropout_p = a->dropout_p;
    o->dropout_seed = a->seed;
    o->dropout_offset = a->offset;
    return MF_OK;
}

static int build(call_args *a, mf_problem *pb, mf_error *err) {
    int rc = views_and_options(a, err);
    if (rc) return rc;
    return mf_problem_build(pb, &a->in, &a->opt, err);
}

/* build() again once forward() has allocated the outputs (views already in a->in) */
static int rebuild_with_outputs(call_args *a, mf_problem *pb, mf_error *err) {
    return mf_problem_build(pb, &a->in, &a->opt, err);
}

static char *g_kwlist[] = {"fn", "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                           "max_seqlen_k", "softmax_scale", "causal", "window_left", "window_right",
                           "softcap", "alibi_slopes", "return_lse", "out", "lse", "num_splits",
                           "cu_seqlens_q_device", "cu_seqlens_k_device", "block_table",
                           "block_table_device", "dropout_p", "seed", "offset", NULL};

static void defaults(call_args *a) {
    memset(a, 0, sizeof *a);
    a->cu_q = a->cu_k = a->alibi = a->out = a->lse = a->scale = a->cu_q_dev = a->cu_k_dev = Py_None;
    a->block_table = a->kv_index_dev = a->seqused_dev = a->leftpad_dev = Py_None;
    a->k_new = a->v_new = a->cos = a->sin = a->cache_seqlens = a->cache_batch_idx = a->cache_leftpad = Py_None;
    a->q_rot = Py_None;
    a->window_left = a->window_right = -1;
    a->num_splits = 1;
    a->rotary_interleaved = 1;
}

static int parse(PyObject *args, PyObject *kwargs, const char *format, call_args *a) {
    defaults(a);
    return PyArg_ParseTupleAndKeywords(args, kwargs, format, g_kwlist, &a->fn, &a->q, &a->k, &a->v,
                                       &a->cu_q, &a->cu_k, &a->max_q, &a->max_k, &a->scale,
                                       &a->causal, &a->window_left, &a->window_right, &a->softcap,
                                       &a->alibi, &a->want_lse, &a->out, &a->lse, &a->num_splits,
                                       &a->cu_q_dev, &a->cu_k_dev, &a->block_table, &a->kv_index_dev,
                                       &a->dropout_p, &a->seed, &a->offset);
}

static char *g_kvcache_kwlist[] = {"fn", "q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin",
                                   "cache_seqlens", "cache_batch_idx", "cache_leftpad", "block_table",
                                   "softmax_scale", "causal", "window_left", "window_right", "softcap",
                                   "rotary_interleaved", "alibi_slopes", "num_splits", "return_lse",
                                   "kv_index_device", "cache_seqlens_device", "cache_leftpad_device", NULL};

static int parse_kvcache(PyObject *args, PyObject *kwargs, call_args *a) {
    defaults(a);
    a->kvcache = 1;
    a->num_splits = 0;
    return PyArg_ParseTupleAndKeywords(args, kwargs, "sOOO|OOOOOOOOOpLLdpOipOOO:kvcache", g_kvcache_kwlist,
                                       &a->fn, &a->q, &a->k, &a->v, &a->k_new, &a->v_new, &a->cos, &a->sin,
                                       &a->cache_seqlens, &a->cache_batch_idx, &a->cache_leftpad,
                                       &a->block_table, &a->scale, &a->causal, &a->window_left,
                                       &a->window_right, &a->softcap, &a->rotary_interleaved, &a->alibi,
                                       &a->num_splits, &a->want_lse, &a->kv_index_dev, &a->seqused_dev,
                                       &a->leftpad_dev);
}

#define FORWARD_FORMAT "sOOO|OOLLOpLLdOpOOiOOOOdKK:forward"

PyDoc_STRVAR(forward_doc,
"forward($module, /, fn, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,\n"
"        max_seqlen_k=0, softmax_scale=None, causal=False, window_left=-1, window_right=-1,\n"
"        softcap=0.0, alibi_slopes=None, return_lse=False, cu_seqlens_q_device=None,\n"
"        cu_seqlens_k_device=None)\n--\n\n"
"Validates one attention call, chooses its tier and runs it when the tier is native.\n"
"Returns (out, lse or None, tier, stream_plan). For the 'reference' tier nothing is computed\n"
"and out and lse are None: the caller runs mtlflash.reference. With MTLFLASH_DISPATCH=stream a\n"
"Metal tier is planned, out/lse are allocated but not written, and stream_plan (a dict like\n"
"metal_plan's) is for the caller to encode on torch's stream; otherwise stream_plan is None.\n"
"Queue mode (default) expects the caller to have called torch.mps.synchronize().");

static PyObject *plan_to_dict(const mf_metal_plan *plan);
static int plan_tier_and_caps(PyObject *args, const char *fn, int *tier, int *is_auto, mf_metal_caps *caps);

/* The device copy of an index tensor a Metal kernel reads (block table, kv batch index, cache
 * lengths, leftpad): present, int32, contiguous rows, and the same shape as the CPU copy that
 * problem.c validated. */
static int check_device_index(const char *fn, const char *name, const mf_tensor *dev, const mf_tensor *cpu,
                              mf_error *err) {
    int ok = dev->present && dev->dtype == MF_I32 && dev->ndim == cpu->ndim;
    for (int i = 0; ok && i < dev->ndim; i++) ok = dev->shape[i] == cpu->shape[i];
    if (ok && dev->ndim >= 1 && dev->shape[dev->ndim - 1] > 1) ok = dev->stride[dev->ndim - 1] == 1;
    if (!ok)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: the Metal tiers need a copy on the device (int32, contiguous "
                       "rows, the shape of the CPU copy); none was given or it does not match", fn, name);
    return MF_OK;
}

/* Runs a Metal tier in queue mode, or plans it for stream mode (*stream_plan set). */
static int run_metal(call_args *a, const mf_problem *pb, mf_tier tier, PyObject **stream_plan, mf_error *err) {
    int rc;
    mf_dispatch mode;
    mf_metal_caps caps;
    mf_metal_plan mplan;
    mf_metal_binding slots[MF_NUM_SLOTS], app_slots[MF_NUM_SLOTS];
    mf_tensor cu_q_dev, cu_k_dev, kv_index_dev, seqused_dev, leftpad_dev;
    char msg[512];
    const int flags = pb->p.flags;
    if ((rc = mf_plan_dispatch(&mode, err))) return rc;
    if (mf_metal_caps_of(pb->tq.mtl_buffer, &caps, msg, sizeof msg) != 0)
        return mf_fail(err, MF_ERR_RUNTIME, "[%s] %s", a->fn, msg);
    if ((rc = mf_metal_plan_make(pb, tier, &caps, &mplan, err))) return rc;
    memset(slots, 0, sizeof slots);
    memset(app_slots, 0, sizeof app_slots);
    if ((rc = mf_tensor_view(a->cu_q_dev, a->fn, "cu_seqlens_q", 1, &cu_q_dev, err))) return rc;
    if ((rc = mf_tensor_view(a->cu_k_dev, a->fn, "cu_seqlens_k", 1, &cu_k_dev, err))) return rc;
    if ((rc = mf_tensor_view(a->kv_index_dev, a->fn, "kv_index_device", 1, &kv_index_dev, err))) return rc;
    if ((rc = mf_tensor_view(a->seqused_dev, a->fn, "cache_seqlens_device", 1, &seqused_dev, err))) return rc;
    if ((rc = mf_tensor_view(a->leftpad_dev, a->fn, "cache_leftpad_device", 1, &leftpad_dev, err))) return rc;
    if (flags & MF_FLAG_VARLEN) {
        const mf_tensor *cu[2] = {&cu_q_dev, &cu_k_dev};
        for (int i = 0; i < 2; i++)
            if (!cu[i]->present || cu[i]->dtype != MF_I32 || cu[i]->ndim != 1 ||
                (cu[i]->shape[0] > 1 && cu[i]->stride[0] != 1))
                return mf_fail(err, MF_ERR_VALUE, "[%s] %s: the Metal tiers need it as a contiguous int32 "
                               "tensor on the device", a->fn, i ? "cu_seqlens_k" : "cu_seqlens_q");
    }
    /* the kv layout's index tensors, as the kernels read them: device copies of the CPU ones */
    if (flags & (MF_FLAG_PAGED | MF_FLAG_KV_BATCH_IDX)) {
        const char *name = (flags & MF_FLAG_PAGED) ? "block_table" : "cache_batch_idx";
        if ((rc = check_device_index(a->fn, name, &kv_index_dev, &pb->tkv_index, err))) return rc;
        /* the kernels step through the device copy's rows */
        if (flags & MF_FLAG_PAGED) mplan.params.block_table_stride_b = kv_index_dev.stride[0];
    } else {
        kv_index_dev.present = 0;
    }
    if (flags & MF_FLAG_SEQUSED_K) {
        if ((rc = check_device_index(a->fn, "cache_seqlens", &seqused_dev, &pb->tseqused_k, err))) return rc;
    } else {
        seqused_dev.present = 0;
    }
    if (flags & MF_FLAG_LEFTPAD_K) {
        if ((rc = check_device_index(a->fn, "cache_leftpad", &leftpad_dev, &pb->tleftpad_k, err))) return rc;
    } else {
        leftpad_dev.present = 0;
    }
    /* every bound tensor checked against its storage, in both dispatch modes */
    const mf_tensor *views[MF_NUM_SLOTS] = {&pb->tq, &pb->tk, &pb->tv, &pb->to, &pb->tlse, &cu_q_dev, &cu_k_dev,
                                            &pb->talibi, NULL, NULL, &kv_index_dev, &seqused_dev, &leftpad_dev};
    const char *names[MF_NUM_SLOTS] = {"q", "k", "v", "out", "lse", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes",
                                       NULL, NULL, "kv_index", "cache_seqlens", "cache_leftpad"};
    for (int s = 0; s < MF_NUM_SLOTS; s++)
        if (views[s] != NULL && (rc = mf_metal_bind(views[s], a->fn, names[s], &slots[s], err))) return rc;
    if (mplan.append.present) { /* the append pass's own slots (mf_params.h) */
        const int rot = mf_problem_rotates_q(pb);
        const mf_append *ap = &pb->app;
        const mf_tensor *app_views[MF_NUM_SLOTS] = {rot ? &ap->tq_src : NULL, &pb->tk, &pb->tv, rot ? &pb->tq : NULL,
                                                    &ap->tk_new, &ap->tv_new, rot ? &ap->tcos : NULL,
                                                    rot ? &ap->tsin : NULL, NULL, NULL, &kv_index_dev, &seqused_dev,
                                                    NULL};
        const char *app_names[MF_NUM_SLOTS] = {"q", "k_cache", "v_cache", "q_rot", "k", "v", "rotary_cos",
                                               "rotary_sin", NULL, NULL, "kv_index", "cache_seqlens", NULL};
        for (int s = 0; s < MF_NUM_SLOTS; s++)
            if (app_views[s] != NULL && (rc = mf_metal_bind(app_views[s], a->fn, app_names[s], &app_slots[s], err)))
                return rc;
    }
    if (mode == MF_DISPATCH_STREAM) {
        *stream_plan = plan_to_dict(&mplan);
        if (*stream_plan == NULL) return mf_fail(err, MF_ERR_MEMORY, "[%s] out of memory", a->fn);
        /* the rotated q is bound by the caller too (attention's slot 0, the append's slot 3) */
        if (PyDict_SetItemString(*stream_plan, "q_rot", a->q_rot) < 0) {
            PyErr_Clear();
            return mf_fail(err, MF_ERR_MEMORY, "[%s] out of memory", a->fn);
        }
        return MF_OK;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = mf_metal_run(&mplan, slots, app_slots, msg, sizeof msg);
    Py_END_ALLOW_THREADS
    if (failed) return mf_fail(err, MF_ERR_RUNTIME, "[%s] %s tier: %s", a->fn, mf_tier_name(tier), msg);
    return MF_OK;
}

/* Allocates out, lse (when asked for) and q_rot (when the append pass rotates q) like q, stores
 * them in a's views and PyObjects, and rebuilds the problem with them. New references in
 * *out / *lse / *q_rot (NULL when not allocated); on failure they are released by the caller. */
static int alloc_outputs(call_args *a, mf_problem *pb, PyObject **out, PyObject **lse, PyObject **q_rot,
                         mf_error *err) {
    const mf_tensor *tq = &a->in.q;
    int64_t shape[4];
    int rc, n = mf_problem_out_shape(pb, shape);
    *out = mf_tensor_new_like(a->q, tq, n, shape, pb->dtype);
    if (*out == NULL) return -1;
    if ((rc = mf_tensor_view_new(*out, tq, n, shape, pb->dtype, a->fn, "out", &a->in.out, err))) return rc;
    if (a->want_lse) {
        n = mf_problem_lse_shape(pb, shape);
        *lse = mf_tensor_new_like(a->q, tq, n, shape, MF_F32);
        if (*lse == NULL) return -1;
        if ((rc = mf_tensor_view_new(*lse, tq, n, shape, MF_F32, a->fn, "lse", &a->in.lse, err))) return rc;
    }
    if (mf_problem_rotates_q(pb)) { /* the rotated q, written by the append pass */
        for (int i = 0; i < 4; i++) shape[i] = tq->shape[i];
        *q_rot = mf_tensor_new_like(a->q, tq, 4, shape, pb->dtype);
        if (*q_rot == NULL) return -1;
        if ((rc = mf_tensor_view_new(*q_rot, tq, 4, shape, pb->dtype, a->fn, "q_rot", &a->in.q_rot, err))) return rc;
    }
    a->out = *out;
    a->lse = *lse ? *lse : Py_None;
    a->q_rot = *q_rot ? *q_rot : Py_None;
    return rebuild_with_outputs(a, pb, err);
}

/* The common body of forward() and kvcache(): validate, plan, allocate, run. */
static PyObject *run_call(call_args *a) {
    mf_problem pb;
    mf_plan plan;
    mf_error err = {MF_OK, ""};
    PyObject *out = NULL, *lse = NULL, *q_rot = NULL, *stream_plan = NULL;
    int rc;
    a->out = a->lse = a->q_rot = Py_None; /* outputs are allocated here */
    if (build(a, &pb, &err)) return raise(&err);
    if (mf_plan_choose(&pb, getenv("MTLFLASH_KERNEL"), &plan, &err)) return raise(&err);
    if (plan.tier == MF_TIER_REFERENCE) return Py_BuildValue("(OOsO)", Py_None, Py_None, "reference", Py_None);

    if ((rc = alloc_outputs(a, &pb, &out, &lse, &q_rot, &err))) {
        if (rc < 0) goto fail;
        goto fail_err;
    }
    if (plan.tier == MF_TIER_CPU) {
        Py_BEGIN_ALLOW_THREADS
        rc = pb.app.present ? mf_cpu_append(&pb, plan.num_threads, &err) : MF_OK;
        if (rc == MF_OK) rc = mf_cpu_forward(&pb, plan.num_threads, &err);
        Py_END_ALLOW_THREADS
    } else {
        rc = run_metal(a, &pb, plan.tier, &stream_plan, &err);
    }
    if (rc) goto fail_err;
    PyObject *res = Py_BuildValue("(OOsO)", out, lse ? lse : Py_None, mf_tier_name(plan.tier),
                                  stream_plan ? stream_plan : Py_None);
    Py_DECREF(out);
    Py_XDECREF(lse);
    Py_XDECREF(q_rot);
    Py_XDECREF(stream_plan);
    return res;
fail_err:
    raise(&err);
fail:
    Py_XDECREF(out);
    Py_XDECREF(lse);
    Py_XDECREF(q_rot);
    Py_XDECREF(stream_plan);
    return NULL;
}

static PyObject *py_forward(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    call_args a;
    if (!parse(args, kwargs, FORWARD_FORMAT, &a)) return NULL;
    return run_call(&a);
}

PyDoc_STRVAR(kvcache_doc,
"kvcache($module, /, fn, q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,\n"
"        cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,\n"
"        softmax_scale=None, causal=False, window_left=-1, window_right=-1, softcap=0.0,\n"
"        rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_lse=False,\n"
"        kv_index_device=None, cache_seqlens_device=None, cache_leftpad_device=None)\n--\n\n"
"flash_attn_with_kvcache's core: validates the whole call (nothing is written when it is\n"
"refused), appends k/v into the cache (rotated k when rotary_cos/sin are given), then runs\n"
"attention of q (rotated likewise) over the updated cache. Index tensors (cache_seqlens,\n"
"cache_batch_idx, cache_leftpad, block_table) must be int32 and readable on the CPU; the\n"
"*_device copies are what the Metal tiers bind. Returns (out, lse or None, tier, stream_plan)\n"
"like forward(); for the 'reference' tier nothing is computed or written.");

static PyObject *py_kvcache(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    call_args a;
    if (!parse_kvcache(args, kwargs, &a)) return NULL;
    return run_call(&a);
}

#define PLAN_FORMAT "sOOO|OOLLOpLLdOpOOiOOOOdKK:plan"

PyDoc_STRVAR(plan_doc,
"plan($module, /, fn, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,\n"
"     max_seqlen_k=0, softmax_scale=None, causal=False, window_left=-1, window_right=-1,\n"
"     softcap=0.0, alibi_slopes=None)\n--\n\n"
"Validates a call exactly like forward() and returns the name of the tier that would run it,\n"
"without computing anything.");

static PyObject *py_plan(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    call_args a;
    mf_problem pb;
    mf_plan plan;
    mf_error err = {MF_OK, ""};
    if (!parse(args, kwargs, PLAN_FORMAT, &a)) return NULL;
    a.out = a.lse = Py_None;
    if (build(&a, &pb, &err)) return raise(&err);
    if (mf_plan_choose(&pb, getenv("MTLFLASH_KERNEL"), &plan, &err)) return raise(&err);
    return PyUnicode_FromString(mf_tier_name(plan.tier));
}

#define PARAMS_FORMAT "sOOO|OOLLOpLLdOpOOiOOOOdKK:metal_params"

PyDoc_STRVAR(metal_params_doc,
"metal_params($module, /, fn, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,\n"
"             max_seqlen_k=0, softmax_scale=None, causal=False, window_left=-1, window_right=-1,\n"
"             softcap=0.0, alibi_slopes=None, return_lse=False, out=None, lse=None, num_splits=1)\n"
"--\n\n"
"Validates a call exactly like forward() and returns the mf_params block (bytes) that the\n"
"Metal kernels receive, for the given out (and lse) buffers. num_splits > 1 sets the split-KV\n"
"fields (split_size = ceil(max keys / num_splits)).");

static PyObject *py_metal_params(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    call_args a;
    mf_problem pb;
    mf_error err = {MF_OK, ""};
    if (!parse(args, kwargs, PARAMS_FORMAT, &a)) return NULL;
    if (a.out == Py_None) {
        PyErr_SetString(PyExc_TypeError, "metal_params: out is required");
        return NULL;
    }
    if (a.num_splits < 1) {
        PyErr_SetString(PyExc_ValueError, "metal_params: num_splits must be >= 1");
        return NULL;
    }
    if (build(&a, &pb, &err)) return raise(&err);
    pb.p.num_splits = a.num_splits;
    pb.p.split_size = a.num_splits > 1 ? (pb.p.seqlen_k + a.num_splits - 1) / a.num_splits : 0;
    return PyBytes_FromStringAndSize((const char *)&pb.p, sizeof pb.p);
}

static int caps_from_dict(PyObject *d, mf_metal_caps *caps) {
    static const char *keys[3] = {"apple_family", "bfloat", "tensorops"};
    int *fields[3] = {&caps->apple_family, &caps->bfloat, &caps->tensorops};
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "metal_plan: caps must be a dict");
        return -1;
    }
    for (int i = 0; i < 3; i++) {
        PyObject *v = PyDict_GetItemString(d, keys[i]);
        if (v == NULL) {
            PyErr_Format(PyExc_KeyError, "metal_plan: caps needs '%s'", keys[i]);
            return -1;
        }
        long x = PyLong_AsLong(v);
        if (x == -1 && PyErr_Occurred()) return -1;
        *fields[i] = (int)x;
    }
    return 0;
}

PyDoc_STRVAR(metal_plan_doc,
"metal_plan($module, tier, caps, /, fn, q, k, v, ...same as metal_params...)\n--\n\n"
"The launch plan of a call on a Metal tier (or 'auto': the automatic choice) for a device with\n"
"the given capabilities\n"
"(caps: dict with apple_family, bfloat, tensorops): a dict with source, defines, launches\n"
"[(kernel, grid, threadgroup)], scratch_floats, threadgroup_memory and params (bytes).\n"
"Raises RuntimeError with the reason when the tier does not serve the call.");

static PyObject *py_metal_plan(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    call_args a;
    mf_problem pb;
    mf_metal_caps caps;
    mf_metal_plan plan;
    mf_error err = {MF_OK, ""};
    int tier, is_auto;
    if (plan_tier_and_caps(args, "metal_plan", &tier, &is_auto, &caps) < 0) return NULL;
    PyObject *rest = PyTuple_GetSlice(args, 2, PyTuple_GET_SIZE(args));
    if (rest == NULL) return NULL;
    int ok = parse(rest, kwargs, "sOOO|OOLLOpLLdOpOOiOOOOdKK:metal_plan", &a);
    Py_DECREF(rest);
    if (!ok) return NULL;
    if (build(&a, &pb, &err)) return raise(&err);
    if (is_auto) { /* the automatic choice on this device */
        tier = (int)mf_metal_choose(&pb, &caps);
        if (tier == MF_NUM_TIERS) {
            mf_fail(&err, MF_ERR_RUNTIME, "[%s] no Metal tier serves this call on this device", a.fn);
            return raise(&err);
        }
    }
    if (mf_metal_plan_make(&pb, (mf_tier)tier, &caps, &plan, &err)) return raise(&err);
    return plan_to_dict(&plan);
}

static PyObject *defines_to_dict(const mf_metal_define *defs, int n) {
    PyObject *d = PyDict_New();
    for (int i = 0; d != NULL && i < n; i++) {
        PyObject *v = PyLong_FromLong(defs[i].value);
        if (v == NULL || PyDict_SetItemString(d, defs[i].name, v) < 0) {
            Py_XDECREF(v);
            Py_CLEAR(d);
            break;
        }
        Py_DECREF(v);
    }
    return d;
}

static PyObject *launch_to_tuple(const mf_metal_launch *l) {
    return Py_BuildValue("(s(III)(III))", l->kernel, l->grid[0], l->grid[1], l->grid[2], l->threadgroup[0],
                         l->threadgroup[1], l->threadgroup[2]);
}

static PyObject *plan_to_dict(const mf_metal_plan *plan) {
    PyObject *defines = defines_to_dict(plan->defines, plan->n_defines), *launches = PyList_New(0), *res = NULL;
    PyObject *append = NULL;
    if (defines == NULL || launches == NULL) goto done;
    for (int i = 0; i < plan->n_launches; i++) {
        PyObject *item = launch_to_tuple(&plan->launches[i]);
        if (item == NULL || PyList_Append(launches, item) < 0) {
            Py_XDECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    if (plan->append.present) {
        const mf_metal_append *ap = &plan->append;
        PyObject *adefs = defines_to_dict(ap->defines, ap->n_defines), *alaunch = launch_to_tuple(&ap->launch);
        if (adefs != NULL && alaunch != NULL)
            append = Py_BuildValue("{s:s,s:O,s:O,s:y#}", "source", ap->source, "defines", adefs, "launch", alaunch,
                                   "params", (const char *)&ap->params, (Py_ssize_t)sizeof ap->params);
        Py_XDECREF(adefs);
        Py_XDECREF(alaunch);
        if (append == NULL) goto done;
    } else {
        append = Py_None;
        Py_INCREF(append);
    }
    res = Py_BuildValue("{s:s,s:s,s:O,s:O,s:K,s:I,s:y#,s:O}", "tier", mf_tier_name(plan->tier), "source",
                        plan->source ? plan->source : "", "defines", defines, "launches", launches,
                        "scratch_floats", (unsigned long long)plan->scratch_floats, "threadgroup_memory",
                        plan->threadgroup_memory, "params", (const char *)&plan->params,
                        (Py_ssize_t)sizeof plan->params, "append", append);
done:
    Py_XDECREF(defines);
    Py_XDECREF(launches);
    Py_XDECREF(append);
    return res;
}

PyDoc_STRVAR(kvcache_metal_plan_doc,
"kvcache_metal_plan($module, tier, caps, /, fn, q, k_cache, v_cache, ...same as kvcache...)\n--\n\n"
"The launch plan of a flash_attn_with_kvcache call on a Metal tier (or 'auto') for a device with\n"
"the given capabilities, like metal_plan, with out, lse and q_rot allocated exactly as kvcache()\n"
"allocates them (CPU tensors here; their strides are in params): a dict with metal_plan's keys\n"
"(append: None, or source, defines, launch and params (bytes of mf_append_params) of the\n"
"append + rotary pass) plus out, lse and q_rot (None when absent). Nothing is computed or\n"
"written. Raises RuntimeError with the reason when the tier does not serve the call.");

/* tier name and caps from the first two positional arguments; -1 with an exception set */
static int plan_tier_and_caps(PyObject *args, const char *fn, int *tier, int *is_auto, mf_metal_caps *caps) {
    if (PyTuple_GET_SIZE(args) < 2) {
        PyErr_Format(PyExc_TypeError, "%s: expected tier and caps first", fn);
        return -1;
    }
    const char *tier_name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(args, 0));
    if (tier_name == NULL || caps_from_dict(PyTuple_GET_ITEM(args, 1), caps) < 0) return -1;
    *tier = -1;
    *is_auto = strcmp(tier_name, "auto") == 0;
    for (int t = 0; t < MF_NUM_TIERS; t++)
        if (strcmp(tier_name, mf_tier_name((mf_tier)t)) == 0) *tier = t;
    if (*tier < 0 && !*is_auto) {
        PyErr_Format(PyExc_ValueError, "%s: unknown tier '%s'", fn, tier_name);
        return -1;
    }
    return 0;
}

static PyObject *py_kvcache_metal_plan(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    call_args a;
    mf_problem pb;
    mf_metal_caps caps;
    mf_metal_plan plan;
    mf_error err = {MF_OK, ""};
    PyObject *out = NULL, *lse = NULL, *q_rot = NULL, *res = NULL;
    int tier, is_auto, rc;
    if (plan_tier_and_caps(args, "kvcache_metal_plan", &tier, &is_auto, &caps) < 0) return NULL;
    PyObject *rest = PyTuple_GetSlice(args, 2, PyTuple_GET_SIZE(args));
    if (rest == NULL) return NULL;
    int ok = parse_kvcache(rest, kwargs, &a);
    Py_DECREF(rest);
    if (!ok) return NULL;
    a.out = a.lse = a.q_rot = Py_None;
    if (build(&a, &pb, &err)) return raise(&err);
    if ((rc = alloc_outputs(&a, &pb, &out, &lse, &q_rot, &err))) {
        if (rc > 0) raise(&err);
        goto done;
    }
    if (is_auto) {
        tier = (int)mf_metal_choose(&pb, &caps);
        if (tier == MF_NUM_TIERS) {
            mf_fail(&err, MF_ERR_RUNTIME, "[%s] no Metal tier serves this call on this device", a.fn);
            raise(&err);
            goto done;
        }
    }
    if (mf_metal_plan_make(&pb, (mf_tier)tier, &caps, &plan, &err)) {
        raise(&err);
        goto done;
    }
    res = plan_to_dict(&plan);
    if (res != NULL && (PyDict_SetItemString(res, "out", out) < 0 ||
                        PyDict_SetItemString(res, "lse", lse ? lse : Py_None) < 0 ||
                        PyDict_SetItemString(res, "q_rot", q_rot ? q_rot : Py_None) < 0))
        Py_CLEAR(res);
done:
    Py_XDECREF(out);
    Py_XDECREF(lse);
    Py_XDECREF(q_rot);
    return res;
}

PyDoc_STRVAR(metal_source_doc,
"metal_source($module, name, /)\n--\n\n"
"The self-contained source of metal/<name> as the bridge compiles it (includes inlined).");

static PyObject *py_metal_source(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL) return NULL;
    mf_error err = {MF_OK, ""};
    char *src = mf_metal_source(name, &err);
    if (src == NULL) return raise(&err);
    PyObject *res = PyUnicode_FromString(src);
    free(src);
    return res;
}

PyDoc_STRVAR(metal_files_doc, "metal_files($module, /)\n--\n\nNames of the embedded Metal sources.");

static PyObject *py_metal_files(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    PyObject *list = PyList_New(0);
    for (const mf_embedded_file *e = mf_metal_files; list != NULL && e->name != NULL; e++) {
        PyObject *s = PyUnicode_FromString(e->name);
        if (s == NULL || PyList_Append(list, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(s);
    }
    return list;
}

PyDoc_STRVAR(disable_metal_doc, "disable_metal($module, reason, /)\n--\n\nTurn the Metal tiers off for this process.");

static PyObject *py_disable_metal(PyObject *self, PyObject *arg) {
    (void)self;
    const char *why = PyUnicode_AsUTF8(arg);
    if (why == NULL) return NULL;
    mf_plan_disable_metal(why);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(tiers_doc, "tiers($module, /)\n--\n\nList of (tier, available, reason).");

static PyObject *py_tiers(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    PyObject *list = PyList_New(0);
    if (list == NULL) return NULL;
    for (int t = 0; t < MF_NUM_TIERS; t++) {
        char reason[256];
        int ok = mf_tier_available((mf_tier)t, reason, sizeof reason);
        PyObject *item = Py_BuildValue("(sOs)", mf_tier_name((mf_tier)t), ok ? Py_True : Py_False, reason);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

PyDoc_STRVAR(build_info_doc, "build_info($module, /)\n--\n\nFacts about this build: SIMD path, Metal bridge, params size.");

static PyObject *py_build_info(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("{s:s,s:s,s:n,s:i,s:i}", "cpu_simd", mf_cpu_simd_path(), "metal",
                         mf_metal_build_info(), "params_size", (Py_ssize_t)sizeof(mf_params),
                         "max_head_dim", MF_MAX_HEAD_DIM, "max_head_dim_v", MF_MAX_HEAD_DIM_V);
}

PyDoc_STRVAR(num_threads_doc, "num_threads($module, /)\n--\n\nCPU threads a call uses (MTLFLASH_NUM_THREADS or all cores).");

static PyObject *py_num_threads(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    mf_error err = {MF_OK, ""};
    int n = mf_plan_num_threads(&err);
    if (n < 0) return raise(&err);
    return PyLong_FromLong(n);
}

static char *g_backward_kwlist[] = {"fn", "dout", "q", "k", "v", "out", "lse", "cu_seqlens_q", "cu_seqlens_k",
                                    "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal", "window_left",
                                    "window_right", "softcap", "alibi_slopes", "dropout_p", "seed", "offset",
                                    "dq", "dk", "dv", "softmax_d", NULL};

PyDoc_STRVAR(backward_doc,
"backward($module, /, fn, dout, q, k, v, out, lse, cu_seqlens_q=None, cu_seqlens_k=None,\n"
"         max_seqlen_q=0, max_seqlen_k=0, softmax_scale=None, causal=False, window_left=-1,\n"
"         window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0, offset=0,\n"
"         dq=None, dk=None, dv=None, softmax_d=None)\n--\n\n"
"The backward pass of one attention call: from dout, the forward's inputs, out and lse (and the\n"
"dropout seed/offset it used) computes dq, dk, dv and softmax_d = rowsum(dout * out) (fp32, the\n"
"shape of lse). Gradients are written into dq/dk/dv/softmax_d when given (any strides with a\n"
"contiguous last dimension), else allocated. Returns (dq, dk, dv, softmax_d, tier); for the\n"
"'reference' tier (MPS tensors) nothing is computed and the four are None.");

static PyObject *py_backward(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    call_args a;
    mf_problem pb;
    mf_plan plan;
    mf_grad_inputs gin;
    mf_error err = {MF_OK, ""};
    PyObject *dout, *g_obj[4] = {Py_None, Py_None, Py_None, Py_None}, *made[4] = {NULL, NULL, NULL, NULL};
    PyObject *res = NULL;
    int rc;
    defaults(&a);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sOOOOOO|OOLLOpLLdOdKKOOOO:backward", g_backward_kwlist, &a.fn,
                                     &dout, &a.q, &a.k, &a.v, &a.out, &a.lse, &a.cu_q, &a.cu_k, &a.max_q, &a.max_k,
                                     &a.scale, &a.causal, &a.window_left, &a.window_right, &a.softcap, &a.alibi,
                                     &a.dropout_p, &a.seed, &a.offset, &g_obj[0], &g_obj[1], &g_obj[2], &g_obj[3]))
        return NULL;
    memset(&gin, 0, sizeof gin);
    if (views_and_options(&a, &err)) return raise(&err);
    mf_tensor *gv[4] = {&gin.dq, &gin.dk, &gin.dv, &gin.softmax_d};
    const char *gn[4] = {"dq", "dk", "dv", "softmax_d"};
    if (mf_tensor_view(dout, a.fn, "dout", 1, &gin.dout, &err)) return raise(&err);
    for (int i = 0; i < 4; i++)
        if (mf_tensor_view(g_obj[i], a.fn, gn[i], 1, gv[i], &err)) return raise(&err);
    if (mf_problem_build_backward(&pb, &a.in, &gin, &a.opt, &err)) return raise(&err);
    if (mf_plan_choose_backward(&pb, getenv("MTLFLASH_KERNEL"), &plan, &err)) return raise(&err);
    if (plan.tier == MF_TIER_REFERENCE)
        return Py_BuildValue("(OOOOs)", Py_None, Py_None, Py_None, Py_None, "reference");
    /* allocate what the caller did not give: dq/dk/dv like q/k/v, softmax_d like lse */
    const mf_tensor *like[4] = {&a.in.q, &a.in.k, &a.in.v, &a.in.lse};
    for (int i = 0; i < 4; i++) {
        if (gv[i]->present) continue;
        const mf_dtype dt = i == 3 ? MF_F32 : pb.dtype;
        made[i] = mf_tensor_new_like(a.q, &a.in.q, like[i]->ndim, like[i]->shape, dt);
        if (made[i] == NULL) goto done;
        if (mf_tensor_view_new(made[i], &a.in.q, like[i]->ndim, like[i]->shape, dt, a.fn, gn[i], gv[i], &err))
            goto fail_err;
        g_obj[i] = made[i];
    }
    if (mf_problem_build_backward(&pb, &a.in, &gin, &a.opt, &err)) goto fail_err;
    Py_BEGIN_ALLOW_THREADS
    rc = mf_cpu_backward(&pb, plan.num_threads, &err);
    Py_END_ALLOW_THREADS
    if (rc) goto fail_err;
    res = Py_BuildValue("(OOOOs)", g_obj[0], g_obj[1], g_obj[2], g_obj[3], mf_tier_name(plan.tier));
    goto done;
fail_err:
    raise(&err);
done:
    for (int i = 0; i < 4; i++) Py_XDECREF(made[i]);
    return res;
}

static PyMethodDef methods[] = {
    {"backward", (PyCFunction)(void (*)(void))py_backward, METH_VARARGS | METH_KEYWORDS, backward_doc},
    {"forward", (PyCFunction)(void (*)(void))py_forward, METH_VARARGS | METH_KEYWORDS, forward_doc},
    {"kvcache", (PyCFunction)(void (*)(void))py_kvcache, METH_VARARGS | METH_KEYWORDS, kvcache_doc},
    {"metal_params", (PyCFunction)(void (*)(void))py_metal_params, METH_VARARGS | METH_KEYWORDS, metal_params_doc},
    {"plan", (PyCFunction)(void (*)(void))py_plan, METH_VARARGS | METH_KEYWORDS, plan_doc},
    {"metal_plan", (PyCFunction)(void (*)(void))py_metal_plan, METH_VARARGS | METH_KEYWORDS, metal_plan_doc},
    {"kvcache_metal_plan", (PyCFunction)(void (*)(void))py_kvcache_metal_plan, METH_VARARGS | METH_KEYWORDS,
     kvcache_metal_plan_doc},
    {"metal_source", py_metal_source, METH_O, metal_source_doc},
    {"metal_files", py_metal_files, METH_NOARGS, metal_files_doc},
    {"disable_metal", py_disable_metal, METH_O, disable_metal_doc},
    {"tiers", py_tiers, METH_NOARGS, tiers_doc},
    {"build_info", py_build_info, METH_NOARGS, build_info_doc},
    {"num_threads", py_num_threads, METH_NOARGS, num_threads_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "mtlflash._C",
                                    "mtlflash's C core (see mtlflash for the public API).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    return PyModule_Create(&module);
}
