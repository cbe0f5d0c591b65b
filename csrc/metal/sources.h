/* sources.h - the Metal kernel sources, embedded at build time, made self-contained for runtime
 * compilation (newLibraryWithSource does not read #include "..." files from disk). */
#ifndef MF_METAL_SOURCES_H
#define MF_METAL_SOURCES_H

#include <stddef.h>

#include "mf_common.h"

typedef struct mf_embedded_file {
    const char *name; /* file name in metal/, e.g. "attn_vec.metal"; NULL ends the table */
    const char *data;
    size_t size;
} mf_embedded_file;

extern const mf_embedded_file mf_metal_files[];

/* The source of metal/<name> with every `#include "x"` replaced by the text of x (each one
 * inlined where it stands; <system> includes are kept). Files come from the directory named by
 * MTLFLASH_METAL_SOURCE_DIR when it is set (development override), else from the embedded copy.
 * Returns a malloc'd string (caller frees) or NULL with err set. */
char *mf_metal_source(const char *name, mf_error *err);

#endif /* MF_METAL_SOURCES_H */
