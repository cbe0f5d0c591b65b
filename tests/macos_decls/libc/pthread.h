/* POSIX mutexes as bridge.m uses them (https://pubs.opengroup.org/onlinepubs/9799919799/functions/pthread_mutex_lock.html).
 * The type is opaque here; Darwin's real one is a struct of a signature and an opaque array,
 * statically initialised by PTHREAD_MUTEX_INITIALIZER. */
#ifndef MF_DECLS_PTHREAD_H
#define MF_DECLS_PTHREAD_H
typedef struct { long __sig; char __opaque[56]; } pthread_mutex_t;
#define PTHREAD_MUTEX_INITIALIZER {0x32AAABA7, {0}}
int pthread_mutex_lock(pthread_mutex_t *mutex);
int pthread_mutex_unlock(pthread_mutex_t *mutex);
#endif
