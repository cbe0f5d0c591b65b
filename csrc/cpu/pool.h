/* pool.h - a small persistent pthread pool handing out work items through an atomic counter.
 *
 * The calling thread works too. Calls from several Python threads at once are safe: a call that
 * finds the pool busy runs its items on its own thread (same results, items are independent). */
#ifndef MF_POOL_H
#define MF_POOL_H

#include <stdint.h>

/* fn(ctx, item, worker) for every item in [0, n_items); worker is in [0, n_threads). */
typedef void (*mf_pool_fn)(void *ctx, int64_t item, int worker);

/* Runs the items on up to n_threads threads (the caller included) and returns when all are done.
 * Returns the number of threads that took part (>= 1). */
int mf_pool_run(int n_threads, int64_t n_items, mf_pool_fn fn, void *ctx);

#endif /* MF_POOL_H */
