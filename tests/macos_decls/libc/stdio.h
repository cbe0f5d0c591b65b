/* The C library subset bridge.m uses, as declared by the C standard (C11 7.21.6.5 snprintf). */
#ifndef MF_DECLS_STDIO_H
#define MF_DECLS_STDIO_H
#include <stddef.h>
int snprintf(char *restrict s, size_t n, const char *restrict format, ...)
    __attribute__((format(printf, 3, 4)));
#endif
