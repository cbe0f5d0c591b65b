/* common.c - error helper and dtype/device names. */
#include <stdarg.h>
#include <stdio.h>

#include "mf_common.h"

int mf_fail(mf_error *err, mf_errkind kind, const char *fmt, ...) {
    va_list ap;
    err->kind = kind;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    return (int)kind;
}

size_t mf_dtype_size(mf_dtype dt) {
    switch (dt) {
    case MF_F32: return 4;
    case MF_F16: return 2;
    case MF_BF16: return 2;
    case MF_I32: return 4;
    default: return 0;
    }
}

const char *mf_dtype_name(mf_dtype dt) {
    switch (dt) {
    case MF_F32: return "float32";
    case MF_F16: return "float16";
    case MF_BF16: return "bfloat16";
    case MF_I32: return "int32";
    default: return "other";
    }
}

const char *mf_device_name(mf_device dev) {
    switch (dev) {
    case MF_DEV_CPU: return "cpu";
    case MF_DEV_MPS: return "mps";
    case MF_DEV_CUDA: return "cuda";
    default: return "other";
    }
}
