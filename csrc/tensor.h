/* tensor.h - a borrowed, copy-free view of a torch tensor or NumPy array.
 *
 * This and module.c are the only places that look at Python objects. A view records dtype,
 * device, shape and element strides, plus the CPU data pointer (CPU tensors, NumPy arrays) or
 * the MTLBuffer handle and byte offset (MPS tensors). The object must outlive the view.
 * (The mf_tensor struct itself lives in mf_common.h, free of Python types.) */
#ifndef MF_TENSOR_H
#define MF_TENSOR_H

#include <Python.h>

#include "mf_common.h"

/* Fills *t from obj (None gives present = 0 when allow_none). Errors name `arg`. */
int mf_tensor_view(PyObject *obj, const char *fn, const char *arg, int allow_none, mf_tensor *t,
                   mf_error *err);

/* Allocates an uninitialised array/tensor like `like` (same library and device) with the given
 * shape and dtype (MF_F32/MF_F16/MF_BF16 or MF_F32 for lse). Returns a new reference. */
PyObject *mf_tensor_new_like(PyObject *like, const mf_tensor *like_view, int ndim,
                             const int64_t *shape, mf_dtype dtype);

/* The view of an output just made by mf_tensor_new_like(like, like_view, ndim, shape, dtype):
 * for a plain CPU torch.Tensor only its address is read (it is contiguous); otherwise as
 * mf_tensor_view. */
int mf_tensor_view_new(PyObject *obj, const mf_tensor *like_view, int ndim, const int64_t *shape,
                       mf_dtype dtype, const char *fn, const char *arg, mf_tensor *t, mf_error *err);

/* Is the object a torch.Tensor (torch already imported by the caller) or a NumPy array? */
int mf_is_array_like(PyObject *obj);

#endif /* MF_TENSOR_H */
