/* C11 7.22.3.3 free */
#ifndef MF_DECLS_STDLIB_H
#define MF_DECLS_STDLIB_H
#include <stddef.h>
void free(void *ptr);
#endif
