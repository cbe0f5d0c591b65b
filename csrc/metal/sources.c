/* sources.c - see sources.h. Plain C, so it is built and tested on every platform. */
#include "metal/sources.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct buf {
    char *data;
    size_t len, cap;
} buf;

static int buf_put(buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1) cap *= 2;
        char *d = (char *)realloc(b->data, cap);
        if (d == NULL) return -1;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

/* Loads one file: from the override directory, or the embedded table. Returns a malloc'd copy. */
static char *load(const char *name, size_t *size, mf_error *err) {
    const char *dir = getenv("MTLFLASH_METAL_SOURCE_DIR");
    if (dir != NULL && *dir != '\0') {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, name);
        FILE *f = fopen(path, "rb");
        if (f == NULL) {
            mf_fail(err, MF_ERR_RUNTIME, "MTLFLASH_METAL_SOURCE_DIR: cannot open %s", path);
            return NULL;
        }
        buf b = {0};
        char chunk[8192];
        size_t n;
        while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
            if (buf_put(&b, chunk, n) < 0) {
                fclose(f);
                free(b.data);
                mf_fail(err, MF_ERR_MEMORY, "out of memory reading %s", path);
                return NULL;
            }
        }
        fclose(f);
        *size = b.len;
        if (b.data == NULL) b.data = (char *)calloc(1, 1);
        return b.data;
    }
    for (const mf_embedded_file *e = mf_metal_files; e->name != NULL; e++) {
        if (strcmp(e->name, name) != 0) continue;
        char *copy = (char *)malloc(e->size + 1);
        if (copy == NULL) {
            mf_fail(err, MF_ERR_MEMORY, "out of memory");
            return NULL;
        }
        memcpy(copy, e->data, e->size);
        copy[e->size] = '\0';
        *size = e->size;
        return copy;
    }
    mf_fail(err, MF_ERR_RUNTIME, "no Metal source named '%s' is embedded in this build", name);
    return NULL;
}

typedef struct expander {
    buf out;
} expander;

static int expand(expander *x, const char *name, int depth, mf_error *err) {
    /* Every #include is inlined where it stands (the headers have include guards, and an include
     * may sit in one branch of an #ifdef), so only the depth is bounded. */
    if (depth > 8)
        return mf_fail(err, MF_ERR_RUNTIME, "Metal sources: includes nested too deeply at '%s'", name);
    size_t size = 0;
    char *text = load(name, &size, err);
    if (text == NULL) return err->kind;
    int rc = MF_OK;
    const char *p = text, *end = text + size;
    while (p < end && rc == MF_OK) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *eol = nl ? nl + 1 : end;
        const char *s = p;
        while (s < eol && (*s == ' ' || *s == '\t')) s++;
        if (eol - s > 9 && s[0] == '#' && strncmp(s + 1, "include", 7) == 0) {
            const char *q = s + 8;
            while (q < eol && (*q == ' ' || *q == '\t')) q++;
            if (q < eol && *q == '"') {
                const char *close = memchr(q + 1, '"', (size_t)(eol - q - 1));
                if (close == NULL || close - q - 1 >= 256) {
                    rc = mf_fail(err, MF_ERR_RUNTIME, "Metal sources: malformed #include in '%s'", name);
                    break;
                }
                /* names live in the embedded table or stay valid for the expansion */
                const char *inc = NULL;
                for (const mf_embedded_file *e = mf_metal_files; e->name != NULL; e++)
                    if ((size_t)(close - q - 1) == strlen(e->name) && strncmp(e->name, q + 1, (size_t)(close - q - 1)) == 0)
                        inc = e->name;
                if (inc == NULL) {
                    rc = mf_fail(err, MF_ERR_RUNTIME, "Metal sources: '%s' includes an unknown file %.*s",
                                 name, (int)(close - q + 1), q);
                    break;
                }
                char marker[320];
                snprintf(marker, sizeof marker, "/* ---- %s ---- */\n", inc);
                if (buf_put(&x->out, marker, strlen(marker)) < 0) goto oom;
                rc = expand(x, inc, depth + 1, err);
                if (buf_put(&x->out, "\n", 1) < 0) goto oom;
                p = eol;
                continue;
            }
        }
        if (buf_put(&x->out, p, (size_t)(eol - p)) < 0) goto oom;
        p = eol;
    }
    free(text);
    return rc;
oom:
    free(text);
    return mf_fail(err, MF_ERR_MEMORY, "out of memory expanding Metal sources");
}

char *mf_metal_source(const char *name, mf_error *err) {
    expander x;
    memset(&x, 0, sizeof x);
    /* only names from the embedded table (the override directory holds the same files) */
    const char *known = NULL;
    for (const mf_embedded_file *e = mf_metal_files; e->name != NULL; e++)
        if (strcmp(e->name, name) == 0) known = e->name;
    if (known == NULL) {
        mf_fail(err, MF_ERR_RUNTIME, "no Metal source named '%s' is embedded in this build", name);
        return NULL;
    }
    if (expand(&x, known, 0, err) != MF_OK) {
        free(x.out.data);
        return NULL;
    }
    return x.out.data;
}
