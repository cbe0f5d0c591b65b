/* tensor.c - copy-free views of torch tensors (through their Python attributes, so there is no
 * libtorch linkage) and NumPy arrays (through the NumPy C API). */
#define PY_ARRAY_UNIQUE_SYMBOL mtlflash_ARRAY_API
#define NO_IMPORT_ARRAY
#include "tensor.h"

#include <numpy/arrayobject.h>
#include <stdio.h>
#include <string.h>

/* torch objects, looked up once the caller has imported torch (this file never imports it). */
static PyObject *g_torch_tensor_type; /* torch.Tensor */
static PyObject *g_torch_dtype[4];   /* indexed by mf_dtype: float32, float16, bfloat16, int32 */

static int torch_lookup(void) {
    static const char *names[4] = {"float32", "float16", "bfloat16", "int32"};
    if (g_torch_tensor_type != NULL) return 1;
    PyObject *name = PyUnicode_FromString("torch");
    if (name == NULL) return -1;
    PyObject *torch = PyImport_GetModule(name);
    Py_DECREF(name);
    if (torch == NULL) return PyErr_Occurred() ? -1 : 0;
    PyObject *types[5] = {NULL};
    int ok = 1;
    types[4] = PyObject_GetAttrString(torch, "Tensor");
    ok = types[4] != NULL;
    for (int i = 0; ok && i < 4; i++) {
        types[i] = PyObject_GetAttrString(torch, names[i]);
        ok = types[i] != NULL;
    }
    Py_DECREF(torch);
    if (!ok) {
        for (int i = 0; i < 5; i++) Py_XDECREF(types[i]);
        return -1;
    }
    for (int i = 0; i < 4; i++) g_torch_dtype[i] = types[i];
    g_torch_tensor_type = types[4];
    return 1;
}

static int is_torch_tensor(PyObject *obj) {
    int r = torch_lookup();
    if (r <= 0) return r;
    return PyObject_IsInstance(obj, g_torch_tensor_type);
}

int mf_is_array_like(PyObject *obj) {
    if (PyArray_Check(obj)) return 1;
    return is_torch_tensor(obj);
}

/* how torch and NumPy spell the dtypes mtlflash knows (indexed by mf_dtype), so the common case
 * needs no str() call */
static const char *const g_torch_names[4] = {"torch.float32", "torch.float16", "torch.bfloat16", "torch.int32"};
static const char *const g_numpy_names[4] = {"float32", "float16", "bfloat16", "int32"};

static void set_name(mf_dtype dt, const char *const *names, char *dst, size_t n) {
    snprintf(dst, n, "%s", names[dt]);
}

static void set_repr(PyObject *o, char *dst, size_t n) {
    PyObject *s = PyObject_Str(o);
    const char *c = s ? PyUnicode_AsUTF8(s) : NULL;
    snprintf(dst, n, "%s", c ? c : "?");
    if (c == NULL) PyErr_Clear();
    Py_XDECREF(s);
}

/* Reads a tuple/sequence of ints into dst; returns its length or -1. */
static int read_int_seq(PyObject *seq, int64_t *dst, int max) {
    PyObject *fast = PySequence_Fast(seq, "expected a sequence");
    if (fast == NULL) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > max) {
        Py_DECREF(fast);
        return (int)n;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        dst[i] = v;
    }
    Py_DECREF(fast);
    return (int)n;
}

/* Attribute and method names, interned once: looking them up by C string would build a new
 * Python string on every call. */
enum { N_DTYPE, N_DEVICE, N_TYPE, N_SHAPE, N_STRIDE, N_DATA_PTR, N_UNTYPED_STORAGE, N_NBYTES,
       N_STORAGE_OFFSET, N_NEW_EMPTY, N_COUNT };
static PyObject *g_names[N_COUNT];

static PyObject *name_of(int id) {
    static const char *const text[N_COUNT] = {"dtype", "device", "type", "shape", "stride", "data_ptr",
                                              "untyped_storage", "nbytes", "storage_offset", "new_empty"};
    if (g_names[id] == NULL) g_names[id] = PyUnicode_InternFromString(text[id]);
    return g_names[id];
}

static PyObject *get_attr(PyObject *obj, int id) {
    PyObject *name = name_of(id);
    return name ? PyObject_GetAttr(obj, name) : NULL;
}

static PyObject *call_method(PyObject *obj, int id) {
    PyObject *name = name_of(id);
    return name ? PyObject_CallMethodNoArgs(obj, name) : NULL;
}

static long long call_int_method(PyObject *obj, int id) {
    PyObject *r = call_method(obj, id);
    if (r == NULL) return -1;
    long long v = PyLong_AsLongLong(r);
    Py_DECREF(r);
    return v;
}

static int view_numpy(PyArrayObject *a, const char *fn, const char *arg, mf_tensor *t, mf_error *err) {
    t->is_numpy = 1;
    t->device = MF_DEV_CPU;
    switch (PyArray_TYPE(a)) {
    case NPY_FLOAT32: t->dtype = MF_F32; break;
    case NPY_FLOAT16: t->dtype = MF_F16; break;
    case NPY_INT32: t->dtype = MF_I32; break;
    default: t->dtype = MF_DTYPE_OTHER; break;
    }
    if (PyArray_DESCR(a)->byteorder == '>') t->dtype = MF_DTYPE_OTHER; /* non-native byte order */
    if (t->dtype == MF_DTYPE_OTHER) set_repr((PyObject *)PyArray_DESCR(a), t->dtype_repr, sizeof t->dtype_repr);
    else set_name(t->dtype, g_numpy_names, t->dtype_repr, sizeof t->dtype_repr);
    int nd = PyArray_NDIM(a);
    if (nd > MF_MAX_DIMS)
        return mf_fail(err, MF_ERR_VALUE, "[%s] %s: expected at most %d dimensions, got %d", fn,
                       arg, MF_MAX_DIMS, nd);
    t->ndim = nd;
    int64_t item = (int64_t)PyArray_ITEMSIZE(a);
    for (int i = 0; i < nd; i++) {
        t->shape[i] = PyArray_DIM(a, i);
        int64_t s = PyArray_STRIDE(a, i);
        if (item > 0 && s % item != 0)
            return mf_fail(err, MF_ERR_VALUE,
                           "[%s] %s: stride %lld bytes of dimension %d is not a multiple of the "
                           "element size %lld",
                           fn, arg, (long long)s, i, (long long)item);
        t->stride[i] = item > 0 ? s / item : 0;
    }
    t->data = PyArray_DATA(a);
    t->readonly = !PyArray_ISWRITEABLE(a);
    return MF_OK;
}

static int view_torch(PyObject *obj, const char *fn, const char *arg, mf_tensor *t, mf_error *err) {
    int rc = MF_ERR_RUNTIME;
    PyObject *dtype = NULL, *device = NULL, *devtype = NULL, *shape = NULL, *stride = NULL;
    PyObject *storage = NULL;

    dtype = get_attr(obj, N_DTYPE);
    if (dtype == NULL) goto py_error;
    t->dtype = MF_DTYPE_OTHER;
    for (int i = 0; i < 4; i++)
        if (dtype == g_torch_dtype[i]) t->dtype = (mf_dtype)i;
    if (t->dtype == MF_DTYPE_OTHER) set_repr(dtype, t->dtype_repr, sizeof t->dtype_repr);
    else set_name(t->dtype, g_torch_names, t->dtype_repr, sizeof t->dtype_repr);

    device = get_attr(obj, N_DEVICE);
    if (device == NULL) goto py_error;
    devtype = get_attr(device, N_TYPE);
    if (devtype == NULL) goto py_error;
    const char *dt = PyUnicode_AsUTF8(devtype);
    if (dt == NULL) goto py_error;
    t->device = strcmp(dt, "cpu") == 0    ? MF_DEV_CPU
                : strcmp(dt, "mps") == 0  ? MF_DEV_MPS
                : strcmp(dt, "cuda") == 0 ? MF_DEV_CUDA
                                          : MF_DEV_OTHER;
    if (t->device == MF_DEV_OTHER) {
        rc = mf_fail(err, MF_ERR_VALUE, "[%s] %s: tensors on device '%s' are not supported "
                     "(expected cpu or mps)", fn, arg, dt);
        goto done;
    }

    shape = get_attr(obj, N_SHAPE);
    if (shape == NULL) goto py_error;
    int nd = read_int_seq(shape, t->shape, MF_MAX_DIMS);
    if (nd < 0) goto py_error;
    if (nd > MF_MAX_DIMS) {
        rc = mf_fail(err, MF_ERR_VALUE, "[%s] %s: expected at most %d dimensions, got %d", fn, arg,
                     MF_MAX_DIMS, nd);
        goto done;
    }
    t->ndim = nd;
    stride = call_method(obj, N_STRIDE);
    if (stride == NULL) goto py_error;
    if (read_int_seq(stride, t->stride, MF_MAX_DIMS) != nd) goto py_error;

    if (t->device == MF_DEV_CPU) {
        long long p = call_int_method(obj, N_DATA_PTR);
        if (p == -1 && PyErr_Occurred()) goto py_error;
        t->data = (void *)(uintptr_t)p;
    } else if (t->device == MF_DEV_MPS) {
        /* The storage's data pointer is the id<MTLBuffer> itself (see metal.md section 1). */
        storage = call_method(obj, N_UNTYPED_STORAGE);
        if (storage == NULL) goto py_error;
        long long handle = call_int_method(storage, N_DATA_PTR);
        if (handle == -1 && PyErr_Occurred()) goto py_error;
        long long nbytes = call_int_method(storage, N_NBYTES);
        if (nbytes == -1 && PyErr_Occurred()) goto py_error;
        long long off = call_int_method(obj, N_STORAGE_OFFSET);
        if (off == -1 && PyErr_Occurred()) goto py_error;
        t->mtl_buffer = (uint64_t)handle;
        t->storage_nbytes = nbytes;
        t->byte_offset = off * (long long)mf_dtype_size(t->dtype);
    }
    rc = MF_OK;
    goto done;

py_error:
    {
        /* Report the Python-level failure as our error, naming the argument. */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        char msg[256] = "unknown error";
        if (ev != NULL) set_repr(ev, msg, sizeof msg);
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        rc = mf_fail(err, MF_ERR_TYPE, "[%s] %s: could not read the tensor (%s)", fn, arg, msg);
    }
done:
    Py_XDECREF(dtype);
    Py_XDECREF(device);
    Py_XDECREF(devtype);
    Py_XDECREF(shape);
    Py_XDECREF(stride);
    Py_XDECREF(storage);
    return rc;
}

/* The CPU kernels read elements through typed pointers, so CPU data must be aligned to its element
 * size (an array viewed at an odd byte offset of a buffer, torch.frombuffer(..., offset=1), ...). */
static int check_aligned(const mf_tensor *t, const char *fn, const char *arg, mf_error *err) {
    size_t es = mf_dtype_size(t->dtype);
    if (t->device != MF_DEV_CPU || t->data == NULL || es < 2) return MF_OK;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] == 0) return MF_OK; /* no element is ever read */
    if ((uintptr_t)t->data % es != 0)
        return mf_fail(err, MF_ERR_VALUE,
                       "[%s] %s: data is not aligned to its %zu-byte elements (address %p); pass an "
                       "aligned copy", fn, arg, es, t->data);
    return MF_OK;
}

int mf_tensor_view(PyObject *obj, const char *fn, const char *arg, int allow_none, mf_tensor *t,
                   mf_error *err) {
    memset(t, 0, sizeof *t);
    if (obj == NULL || obj == Py_None) {
        if (allow_none) return MF_OK;
        return mf_fail(err, MF_ERR_TYPE, "[%s] %s: expected a torch.Tensor or numpy.ndarray, got None",
                       fn, arg);
    }
    t->present = 1;
    if (PyArray_Check(obj)) {
        int rc = view_numpy((PyArrayObject *)obj, fn, arg, t, err);
        return rc ? rc : check_aligned(t, fn, arg, err);
    }
    int r = is_torch_tensor(obj);
    if (r < 0) {
        PyErr_Clear();
        r = 0;
    }
    if (r == 0)
        return mf_fail(err, MF_ERR_TYPE, "[%s] %s: expected a torch.Tensor or numpy.ndarray, got %s",
                       fn, arg, Py_TYPE(obj)->tp_name);
    int rc = view_torch(obj, fn, arg, t, err);
    return rc ? rc : check_aligned(t, fn, arg, err);
}

PyObject *mf_tensor_new_like(PyObject *like, const mf_tensor *like_view, int ndim,
                             const int64_t *shape, mf_dtype dtype) {
    if (like_view->is_numpy) {
        npy_intp dims[MF_MAX_DIMS];
        for (int i = 0; i < ndim; i++) dims[i] = (npy_intp)shape[i];
        int typenum = dtype == MF_F16 ? NPY_FLOAT16 : NPY_FLOAT32;
        return PyArray_EMPTY(ndim, dims, typenum, 0);
    }
    PyObject *tuple = PyTuple_New(ndim);
    if (tuple == NULL) return NULL;
    for (int i = 0; i < ndim; i++) {
        PyObject *v = PyLong_FromLongLong(shape[i]);
        if (v == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
        PyTuple_SET_ITEM(tuple, i, v);
    }
    PyObject *args = PyTuple_Pack(1, tuple);
    PyObject *kwargs = Py_BuildValue("{s:O}", "dtype", g_torch_dtype[dtype]);
    PyObject *meth = get_attr(like, N_NEW_EMPTY);
    PyObject *res = NULL;
    if (args && kwargs && meth) res = PyObject_Call(meth, args, kwargs);
    Py_XDECREF(meth);
    Py_XDECREF(kwargs);
    Py_XDECREF(args);
    Py_DECREF(tuple);
    return res;
}

int mf_tensor_view_new(PyObject *obj, const mf_tensor *like_view, int ndim, const int64_t *shape,
                       mf_dtype dtype, const char *fn, const char *arg, mf_tensor *t, mf_error *err) {
    /* A plain CPU torch.Tensor just made by new_empty: everything but the address is known. */
    if (like_view->is_numpy || like_view->device != MF_DEV_CPU || g_torch_tensor_type == NULL ||
        (PyObject *)Py_TYPE(obj) != g_torch_tensor_type)
        return mf_tensor_view(obj, fn, arg, 0, t, err);
    memset(t, 0, sizeof *t);
    long long p = call_int_method(obj, N_DATA_PTR);
    if (p == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return mf_tensor_view(obj, fn, arg, 0, t, err);
    }
    t->present = 1;
    t->dtype = dtype;
    t->device = MF_DEV_CPU;
    t->ndim = ndim;
    int64_t step = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        t->shape[i] = shape[i];
        t->stride[i] = step;
        step *= shape[i] > 1 ? shape[i] : 1;
    }
    t->data = (void *)(uintptr_t)p;
    set_name(dtype, g_torch_names, t->dtype_repr, sizeof t->dtype_repr);
    return MF_OK;
}
