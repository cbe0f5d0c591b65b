/* mf_common.h - types shared by every layer of the C core: dtypes, devices, errors. */
#ifndef MF_COMMON_H
#define MF_COMMON_H

#include <stddef.h>
#include <stdint.h>

typedef enum mf_dtype { MF_F32 = 0, MF_F16 = 1, MF_BF16 = 2, MF_I32 = 3, MF_DTYPE_OTHER = 4 } mf_dtype;

typedef enum mf_device { MF_DEV_CPU = 0, MF_DEV_MPS = 1, MF_DEV_CUDA = 2, MF_DEV_OTHER = 3 } mf_device;

/* Python exception class an error maps to (module.c does the mapping). */
typedef enum mf_errkind {
    MF_OK = 0,
    MF_ERR_TYPE,     /* TypeError */
    MF_ERR_VALUE,    /* ValueError */
    MF_ERR_NOTIMPL,  /* NotImplementedError */
    MF_ERR_MEMORY,   /* MemoryError */
    MF_ERR_RUNTIME,  /* RuntimeError */
} mf_errkind;

typedef struct mf_error {
    mf_errkind kind;
    char msg[512];
} mf_error;

/* Sets err and returns its kind; printf-style message. */
int mf_fail(mf_error *err, mf_errkind kind, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

size_t mf_dtype_size(mf_dtype dt);
const char *mf_dtype_name(mf_dtype dt); /* "float32", "float16", "bfloat16", "int32", "other" */
const char *mf_device_name(mf_device dev);

#endif /* MF_COMMON_H */
