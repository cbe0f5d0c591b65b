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

/* A borrowed view of a torch tensor or NumPy array (built by tensor.c). */
#define MF_MAX_DIMS 6

typedef struct mf_tensor {
    int present;                  /* 0 for an absent optional argument (None) */
    int is_numpy;
    int readonly;                 /* a NumPy array whose WRITEABLE flag is off */
    mf_dtype dtype;
    mf_device device;
    int ndim;
    int64_t shape[MF_MAX_DIMS];
    int64_t stride[MF_MAX_DIMS]; /* in elements */
    void *data;                  /* CPU: address of element [0,...,0]; MPS: NULL */
    uint64_t mtl_buffer;         /* MPS: the id<MTLBuffer> of the storage */
    int64_t byte_offset;         /* MPS: offset of element [0,...,0] in that buffer */
    int64_t storage_nbytes;      /* MPS: size of the storage, for bounds checks */
    char dtype_repr[40];         /* how the caller spells the dtype, for messages */
} mf_tensor;

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
