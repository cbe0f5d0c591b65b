/* pool.c - see pool.h. Workers sleep on a condition variable between jobs; a job is published
 * with a generation number, workers claim items with an atomic counter, and the caller waits
 * until every participating worker has left the job. */
#include "pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#define MF_POOL_MAX 256

static struct {
    pthread_mutex_t busy;  /* held by the caller that owns the pool for one job */
    pthread_mutex_t lock;  /* protects the fields below */
    pthread_cond_t wake;   /* job published */
    pthread_cond_t done;   /* a worker left the job */
    int n_workers;         /* threads created (excluding callers) */
    uint64_t generation;   /* incremented per job */
    int wanted;            /* workers that take part in the current job */
    int joined;            /* workers that have claimed a participant slot */
    int running;           /* participants still inside the job */
    mf_pool_fn fn;
    void *ctx;
    int64_t n_items;
    atomic_llong next;
} g_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
            PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0, 0};

static void drain(mf_pool_fn fn, void *ctx, int64_t n_items, int worker) {
    for (;;) {
        int64_t i = atomic_fetch_add(&g_pool.next, 1);
        if (i >= n_items) break;
        fn(ctx, i, worker);
    }
}

static void *worker_main(void *arg) {
    /* The generation current when this worker was created: the job being published by its
     * creator is the next one, so a worker that starts late still takes part in it. */
    uint64_t seen = (uint64_t)(uintptr_t)arg;
    pthread_mutex_lock(&g_pool.lock);
    for (;;) {
        while (g_pool.generation == seen) pthread_cond_wait(&g_pool.wake, &g_pool.lock);
        seen = g_pool.generation;
        if (g_pool.joined >= g_pool.wanted) continue; /* this job needs fewer threads */
        int worker = ++g_pool.joined;                  /* the caller is worker 0 */
        mf_pool_fn fn = g_pool.fn;
        void *ctx = g_pool.ctx;
        int64_t n = g_pool.n_items;
        pthread_mutex_unlock(&g_pool.lock);
        drain(fn, ctx, n, worker);
        pthread_mutex_lock(&g_pool.lock);
        if (--g_pool.running == 0) pthread_cond_signal(&g_pool.done);
    }
    return NULL;
}

static void after_fork_child(void) {
    /* Only the forking thread exists in the child: start again with no workers. */
    pthread_mutex_init(&g_pool.busy, NULL);
    pthread_mutex_init(&g_pool.lock, NULL);
    pthread_cond_init(&g_pool.wake, NULL);
    pthread_cond_init(&g_pool.done, NULL);
    g_pool.n_workers = 0;
    g_pool.wanted = g_pool.joined = g_pool.running = 0;
}

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static void pool_init(void) { pthread_atfork(NULL, NULL, after_fork_child); }

static void run_inline(int64_t n_items, mf_pool_fn fn, void *ctx) {
    for (int64_t i = 0; i < n_items; i++) fn(ctx, i, 0);
}

int mf_pool_run(int n_threads, int64_t n_items, mf_pool_fn fn, void *ctx) {
    if (n_threads > n_items) n_threads = (int)n_items;
    if (n_threads > MF_POOL_MAX) n_threads = MF_POOL_MAX;
    if (n_threads <= 1 || pthread_mutex_trylock(&g_pool.busy) != 0) {
        run_inline(n_items, fn, ctx);
        return 1;
    }
    pthread_once(&g_once, pool_init);
    pthread_mutex_lock(&g_pool.lock);
    while (g_pool.n_workers < n_threads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, worker_main, (void *)(uintptr_t)g_pool.generation);
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* run with the threads we have */
        g_pool.n_workers++;
    }
    int helpers = n_threads - 1 < g_pool.n_workers ? n_threads - 1 : g_pool.n_workers;
    g_pool.fn = fn;
    g_pool.ctx = ctx;
    g_pool.n_items = n_items;
    atomic_store(&g_pool.next, 0);
    g_pool.wanted = helpers;
    g_pool.joined = 0;
    g_pool.running = helpers;
    g_pool.generation++;
    pthread_cond_broadcast(&g_pool.wake);
    pthread_mutex_unlock(&g_pool.lock);

    drain(fn, ctx, n_items, 0);

    pthread_mutex_lock(&g_pool.lock);
    while (g_pool.running > 0) pthread_cond_wait(&g_pool.done, &g_pool.lock);
    pthread_mutex_unlock(&g_pool.lock);
    pthread_mutex_unlock(&g_pool.busy);
    return helpers + 1;
}
