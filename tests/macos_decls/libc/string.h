/* C11 7.24.2.1 memcpy, 7.24.6.1 memset */
#ifndef MF_DECLS_STRING_H
#define MF_DECLS_STRING_H
#include <stddef.h>
void *memcpy(void *restrict s1, const void *restrict s2, size_t n);
void *memset(void *s, int c, size_t n);
#endif
