/* mfemu_runtime.cpp - runs the kernels of one emulator library: registry, fibers, scheduler,
 * checks, and the C entry point mfemu_launch.
 *
 * One launch = a grid of threadgroups. Each threadgroup runs to completion on one OS thread
 * (several OS threads take threadgroups from a shared counter); each GPU thread of it is a
 * fiber with its own stack. Fibers run one after another, each until its next
 * synchronisation point (barrier, simd collective, simdgroup multiply) or its end, in the
 * order of the schedule (forward, reverse, seeded random permutation per step). When every
 * fiber is blocked, the scheduler matches the waits: a simdgroup whose lanes all wait at the
 * same collective is combined and released; when nothing else can move, a threadgroup whose
 * threads all wait at the same barrier is released. Anything else is a divergence, reported.
 *
 * A failed check inside a fiber records the message and switches back to the scheduler, which
 * abandons the threadgroup (kernels own no resources, so nothing needs unwinding); a failed
 * check while combining (scheduler context) longjmps to the scheduler.
 */
#define MFEMU_RUNTIME 1
#include "mfemu.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <signal.h>
#include <unistd.h>

#if !defined(__x86_64__) || defined(MFEMU_UCONTEXT)
#include <ucontext.h>
#endif

#define MFEMU_EXPORT extern "C" __attribute__((visibility("default")))

#if defined(__x86_64__) && !defined(MFEMU_UCONTEXT)
/* mfemu_switch(save, to): push the callee-saved registers, store rsp in *save, load `to`,
 * pop, return into the other context. */
extern "C" void mfemu_switch(void **save, void *to);
__asm__(".text\n"
        ".p2align 4\n"
        ".hidden mfemu_switch\n"
        ".globl mfemu_switch\n"
        ".type mfemu_switch,@function\n"
        "mfemu_switch:\n"
        "  pushq %rbp\n"
        "  pushq %rbx\n"
        "  pushq %r12\n"
        "  pushq %r13\n"
        "  pushq %r14\n"
        "  pushq %r15\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  popq %r15\n"
        "  popq %r14\n"
        "  popq %r13\n"
        "  popq %r12\n"
        "  popq %rbx\n"
        "  popq %rbp\n"
        "  ret\n"
        ".size mfemu_switch, .-mfemu_switch\n");
#endif

namespace mfemu {
namespace {

const unsigned kMaxThreads = 1024;
const size_t kMaxThreadgroupBytes = 32768;
const int kMaxArrays = 64;
const int kMaxKernels = 256;
const int kNumSlots = 13; /* MF_NUM_SLOTS */
const int kParamsSlot = 9; /* MF_SLOT_PARAMS: passed by value, not a region */

struct kernel_entry {
    const char *name;
    kernel_fn fn;
    size_t params_size;
};
kernel_entry g_kernels[kMaxKernels];
int g_nkernels;


enum fiber_state { F_RUNNABLE, F_WAIT_SIMD, F_WAIT_TG, F_DONE };

struct fiber {
    void *sp;
#if !defined(__x86_64__) || defined(MFEMU_UCONTEXT)
    ucontext_t uc;
#endif
    char *stack_lo, *stack_hi;
    thread_args args;
    int state;
    /* the synchronisation point it waits at */
    const char *op;
    const char *file;
    unsigned line;
    uint64_t site;
    uint64_t seq;
    void *data;
    combine_fn fn;
    /* number of simd-level / threadgroup-level synchronisations passed */
    uint64_t n_simd, n_tg;
};

struct tg_array_rec {
    const void *tag;
    char *p;
    size_t bytes;
    const char *file;
    unsigned line;
    region reg;
};

struct launch_state {
    const kernel_entry *kernel;
    region regions[kNumSlots];
    const void *params;
    unsigned grid[3], tg[3];
    unsigned nthreads;
    uint64_t ngroups;
    int schedule;
    unsigned long long seed;
    size_t stack_size;
    /* shared between workers */
    pthread_mutex_t mu;
    uint64_t next_group;
    bool stop;
    bool failed;
    uint64_t failed_group;
    char err[4096];
    /* watchdog: after timeout_s seconds every worker still inside a fiber is interrupted */
    unsigned timeout_s;
    volatile bool timed_out;
    pthread_mutex_t wd_mu;
    pthread_cond_t wd_cv;
    bool wd_done;
};

struct worker {
    launch_state *L;
    fiber *fibers;
    char *stack_mem;
    size_t stack_mem_bytes;
    void *sched_sp;
#if !defined(__x86_64__) || defined(MFEMU_UCONTEXT)
    ucontext_t sched_uc;
#endif
    jmp_buf jb;
    fiber *cur;
    uint64_t group;
    unsigned gx, gy, gz;
    /* threadgroup memory */
    char *arena;
    size_t arena_used;
    tg_array_rec arrays[kMaxArrays];
    int narrays;
    /* error */
    bool failed;
    char err[4096];
    uint64_t rng;
    unsigned order[kMaxThreads];
    char *sig_stack;
    stack_t old_sig_stack;
    pthread_t self;
    bool alive; /* under L->wd_mu: the watchdog may signal it */
};

thread_local worker *tl_w;

/* ------------------------------------------------------------------ messages ---- */

const char *base_name(const char *path)
{
    if (!path) return "?";
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

void describe_thread(worker *w, const fiber *f, char *buf, size_t n)
{
    if (f)
        snprintf(buf, n, "kernel '%s', threadgroup (%u,%u,%u), thread %u (simdgroup %u, lane %u, position (%u,%u,%u))",
                 w->L->kernel->name, w->gx, w->gy, w->gz, f->args.tid, f->args.sg, f->args.lane,
                 f->args.t_pos.x, f->args.t_pos.y, f->args.t_pos.z);
    else
        snprintf(buf, n, "kernel '%s', threadgroup (%u,%u,%u)", w->L->kernel->name, w->gx, w->gy, w->gz);
}

void switch_to_scheduler(worker *w, fiber *f)
{
#if defined(__x86_64__) && !defined(MFEMU_UCONTEXT)
    mfemu_switch(&f->sp, w->sched_sp);
#else
    swapcontext(&f->uc, &w->sched_uc);
#endif
}

[[noreturn]] void raise_failure(worker *w)
{
    w->failed = true;
    fiber *f = w->cur;
    if (f) {
        f->state = F_DONE;
        switch_to_scheduler(w, f);
    } else {
        longjmp(w->jb, 1);
    }
    abort(); /* never resumed */
}

[[noreturn]] void vfailf(const char *prefix_extra, const char *fmt, va_list ap)
{
    worker *w = tl_w;
    if (!w) {
        vfprintf(stderr, fmt, ap);
        fprintf(stderr, "\n[mfemu] check failed outside a launch\n");
        abort();
    }
    char head[512], body[2048];
    describe_thread(w, w->cur, head, sizeof head);
    vsnprintf(body, sizeof body, fmt, ap);
    snprintf(w->err, sizeof w->err, "[mfemu] %s%s: %s", head, prefix_extra ? prefix_extra : "", body);
    raise_failure(w);
}

/* the pc of a failed access, as an offset into this library (emu.py turns it into file:line) */
void pc_note(void *pc, char *buf, size_t n)
{
    Dl_info info;
    if (pc && dladdr(pc, &info) && info.dli_fbase)
        snprintf(buf, n, " @@PC:%#lx@@", (unsigned long)((char *)pc - (char *)info.dli_fbase) - 1); /* the call */
    else
        buf[0] = 0;
}

/* ------------------------------------------------------------------ call sites ---- */

/* Identity of a synchronisation call: a hash of the return addresses on the fiber's
 * frame-pointer chain, so the same function reached from two places counts as two sites. */
__attribute__((noinline)) uint64_t call_path_hash(const fiber *f)
{
    uintptr_t *fp = (uintptr_t *)__builtin_frame_address(0);
    uint64_t h = 1469598103934665603ull;
    for (int depth = 0; depth < 128 && fp; depth++) {
        if ((char *)fp < f->stack_lo || (char *)fp + 2 * sizeof(uintptr_t) > f->stack_hi) break;
        h = (h ^ (uint64_t)fp[1]) * 1099511628211ull;
        uintptr_t *next = (uintptr_t *)fp[0];
        if (next <= fp) break;
        fp = next;
    }
    return h;
}

/* ------------------------------------------------------------------ fibers ---- */

void fiber_main()
{
    worker *w = tl_w;
    fiber *f = w->cur;
    w->L->kernel->fn(f->args);
    f->state = F_DONE;
    switch_to_scheduler(w, f);
    abort();
}

#if defined(__x86_64__) && !defined(MFEMU_UCONTEXT)
void fiber_entry() { fiber_main(); }
#endif

void fiber_init(worker *w, fiber *f)
{
#if defined(__x86_64__) && !defined(MFEMU_UCONTEXT)
    (void)w;
    uintptr_t top = (uintptr_t)f->stack_hi & ~(uintptr_t)15;
    void **sp = (void **)top;
    *--sp = nullptr;                     /* return address of the entry (alignment, never used) */
    *--sp = (void *)&fiber_entry;      /* `ret` target */
    *--sp = nullptr;                     /* rbp: ends the frame chain */
    *--sp = nullptr;                     /* rbx */
    *--sp = nullptr;                     /* r12 */
    *--sp = nullptr;                     /* r13 */
    *--sp = nullptr;                     /* r14 */
    *--sp = nullptr;                     /* r15 */
    f->sp = sp;
#else
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack_lo;
    f->uc.uc_stack.ss_size = (size_t)(f->stack_hi - f->stack_lo);
    f->uc.uc_link = &w->sched_uc;
    makecontext(&f->uc, (void (*)())fiber_main, 0);
#endif
}

void resume(worker *w, fiber *f)
{
    w->cur = f;
#if defined(__x86_64__) && !defined(MFEMU_UCONTEXT)
    mfemu_switch(&w->sched_sp, f->sp);
#else
    swapcontext(&w->sched_uc, &f->uc);
#endif
    w->cur = nullptr;
}

/* ------------------------------------------------------------------ scheduling ---- */

uint64_t splitmix(uint64_t &s)
{
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void make_order(worker *w, unsigned n)
{
    for (unsigned i = 0; i < n; i++) w->order[i] = w->L->schedule == 1 ? n - 1 - i : i;
    if (w->L->schedule == 2)
        for (unsigned i = n; i > 1; i--) {
            unsigned j = (unsigned)(splitmix(w->rng) % i);
            unsigned t = w->order[i - 1];
            w->order[i - 1] = w->order[j];
            w->order[j] = t;
        }
}

bool same_place(const fiber *a, const fiber *b)
{
    return a->op == b->op && a->site == b->site && a->seq == b->seq && a->line == b->line &&
           (a->file == b->file || (a->file && b->file && !strcmp(a->file, b->file)));
}

/* "0-31, 40, 45-47" */
void format_ids(const unsigned *ids, int n, char *buf, size_t cap)
{
    size_t len = 0;
    buf[0] = 0;
    for (int i = 0; i < n && len + 24 < cap;) {
        int j = i;
        while (j + 1 < n && ids[j + 1] == ids[j] + 1) j++;
        if (j > i)
            len += (size_t)snprintf(buf + len, cap - len, "%s%u-%u", i ? ", " : "", ids[i], ids[j]);
        else
            len += (size_t)snprintf(buf + len, cap - len, "%s%u", i ? ", " : "", ids[i]);
        i = j + 1;
    }
}

/* Groups the given fibers by where they stand and writes one line per group. */
void describe_groups(fiber *const *fs, int n, bool lanes, char *buf, size_t cap)
{
    bool used[kMaxThreads] = {};
    size_t len = 0;
    buf[0] = 0;
    for (int i = 0; i < n; i++) {
        if (used[i]) continue;
        unsigned ids[kMaxThreads];
        int m = 0;
        const fiber *a = fs[i];
        for (int j = i; j < n; j++) {
            const fiber *b = fs[j];
            bool same = a->state == b->state &&
                        (a->state == F_DONE || same_place(a, b));
            if (!used[j] && same) {
                used[j] = true;
                ids[m++] = lanes ? b->args.lane : b->args.tid;
            }
        }
        char idbuf[512];
        format_ids(ids, m, idbuf, sizeof idbuf);
        if (len + 16 >= cap) break;
        if (a->state == F_DONE)
            len += (size_t)snprintf(buf + len, cap - len, "\n  %s %s: returned from the kernel",
                                    lanes ? "lanes" : "threads", idbuf);
        else
            len += (size_t)snprintf(buf + len, cap - len, "\n  %s %s: wait at %s (%s:%u), call #%llu of %s",
                                    lanes ? "lanes" : "threads", idbuf, a->op, base_name(a->file), a->line,
                                    (unsigned long long)a->seq + 1,
                                    a->state == F_WAIT_TG ? "threadgroup barriers" : "simdgroup synchronisations");
    }
}

[[noreturn]] void fail_divergence(worker *w, const char *what, fiber *const *fs, int n, bool lanes)
{
    char head[512], groups[3000];
    describe_thread(w, nullptr, head, sizeof head);
    describe_groups(fs, n, lanes, groups, sizeof groups);
    /* same file:line but different call paths deserves a word */
    bool same_line_diff_path = false;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++)
            if (fs[i]->state != F_DONE && fs[j]->state != F_DONE && fs[i]->line == fs[j]->line &&
                fs[i]->file == fs[j]->file && fs[i]->site != fs[j]->site)
                same_line_diff_path = true;
    snprintf(w->err, sizeof w->err, "[mfemu] %s: %s%s%s", head, what, groups,
             same_line_diff_path ? "\n  (same source line reached through different call paths)" : "");
    w->failed = true;
    longjmp(w->jb, 1);
}

/* Runs one threadgroup; false when a check failed (message in w->err). */
bool run_group(worker *w, uint64_t g)
{
    launch_state *L = w->L;
    w->group = g;
    w->gx = (unsigned)(g % L->grid[0]);
    w->gy = (unsigned)((g / L->grid[0]) % L->grid[1]);
    w->gz = (unsigned)(g / ((uint64_t)L->grid[0] * L->grid[1]));
    w->arena_used = 0;
    w->narrays = 0;
    w->failed = false;
    w->cur = nullptr;
    uint64_t s = L->seed ^ (g * 0xd1b54a32d192ed03ull);
    w->rng = splitmix(s);

    const unsigned n = L->nthreads;
    for (unsigned t = 0; t < n; t++) {
        fiber *f = &w->fibers[t];
        f->stack_lo = w->stack_mem + (size_t)t * L->stack_size + 4096; /* guard page below */
        f->stack_hi = w->stack_mem + (size_t)(t + 1) * L->stack_size;
        thread_args &a = f->args;
        a.regions = L->regions;
        a.params = L->params;
        a.tg_pos = uint3{w->gx, w->gy, w->gz};
        a.tgs_per_grid = uint3{L->grid[0], L->grid[1], L->grid[2]};
        a.tg_size = uint3{L->tg[0], L->tg[1], L->tg[2]};
        a.t_pos = uint3{t % L->tg[0], (t / L->tg[0]) % L->tg[1], t / (L->tg[0] * L->tg[1])};
        a.tid = t;
        a.sg = t / 32;
        a.lane = t % 32;
        f->state = F_RUNNABLE;
        f->n_simd = f->n_tg = 0;
        f->op = nullptr;
        f->file = nullptr;
        f->line = 0;
        f->site = 0;
        f->seq = 0;
        f->data = nullptr;
        f->fn = nullptr;
        fiber_init(w, f);
    }

    if (setjmp(w->jb)) return false;

    const unsigned nsg = (n + 31) / 32;
    for (;;) {
        make_order(w, n);
        for (unsigned i = 0; i < n; i++) {
            fiber *f = &w->fibers[w->order[i]];
            if (f->state != F_RUNNABLE) continue;
            resume(w, f);
            if (w->failed) return false;
        }
        /* everything is blocked or done: match the simdgroup-level waits */
        bool progress = false;
        for (unsigned sg = 0; sg < nsg; sg++) {
            unsigned lo = sg * 32, hi = lo + 32 < n ? lo + 32 : n;
            int nsimd = 0, ntg = 0, ndone = 0;
            fiber *fs[32];
            for (unsigned t = lo; t < hi; t++) {
                fiber *f = &w->fibers[t];
                fs[t - lo] = f;
                nsimd += f->state == F_WAIT_SIMD;
                ntg += f->state == F_WAIT_TG;
                ndone += f->state == F_DONE;
            }
            if (!nsimd) continue;
            char what[160];
            if (ntg || ndone) {
                snprintf(what, sizeof what, "divergent simdgroup synchronisation in simdgroup %u: not all lanes reach it%s",
                         sg, ndone ? " (some returned while others wait)" : "");
                fail_divergence(w, what, fs, (int)(hi - lo), true);
            }
            const fiber *a = fs[0];
            for (unsigned t = 1; t < hi - lo; t++)
                if (!same_place(fs[t], a)) {
                    snprintf(what, sizeof what, "divergent simdgroup synchronisation in simdgroup %u: lanes wait at different places", sg);
                    fail_divergence(w, what, fs, (int)(hi - lo), true);
                }
            if (a->fn) {
                void *data[32];
                for (unsigned t = 0; t < hi - lo; t++) data[t] = fs[t]->data;
                w->cur = nullptr;
                a->fn(data, (int)(hi - lo)); /* may longjmp on a failed check */
            }
            for (unsigned t = 0; t < hi - lo; t++) fs[t]->state = F_RUNNABLE;
            progress = true;
        }
        if (progress) continue;
        /* then the threadgroup barrier */
        unsigned ndone = 0;
        for (unsigned t = 0; t < n; t++) ndone += w->fibers[t].state == F_DONE;
        if (ndone == n) return true;
        static thread_local fiber *all[kMaxThreads];
        for (unsigned t = 0; t < n; t++) all[t] = &w->fibers[t];
        if (ndone)
            fail_divergence(w, "divergent threadgroup_barrier: some threads returned while others wait at a barrier",
                            all, (int)n, false);
        const fiber *a = all[0];
        for (unsigned t = 1; t < n; t++)
            if (!same_place(all[t], a))
                fail_divergence(w, "divergent threadgroup_barrier: threads wait at different barriers", all, (int)n,
                                false);
        for (unsigned t = 0; t < n; t++) all[t]->state = F_RUNNABLE;
    }
}


/* ------------------------------------------------------------------ crashes ---- */

/* A fault inside a fiber (a fiber stack overflow, an out-of-range index into a private array
 * caught by -fsanitize=array-bounds traps, integer division by zero) fails the launch like any
 * other check instead of killing the process. Faults outside fibers go to the handler that was
 * installed before the launch. */
const int kNumSignals = 5;
const int kCrashSignals[kNumSignals] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGUSR2 /* watchdog */};
struct sigaction g_old_actions[kNumSignals];
int g_handlers_installed;

void crash_handler(int sig, siginfo_t *info, void *ctx)
{
    worker *w = tl_w;
    fiber *f = w ? w->cur : nullptr;
    if (sig == SIGUSR2 && (!f || w->failed || !w->L->timed_out)) return; /* not (yet) for us */
    if (!f || w->failed) {
        for (int i = 0; i < kNumSignals; i++)
            if (kCrashSignals[i] == sig) sigaction(sig, &g_old_actions[i], nullptr);
        return; /* the fault repeats under the previous handler */
    }
    void *pc = nullptr;
    char *sp = nullptr;
#if defined(__x86_64__) && defined(__linux__)
    pc = (void *)((ucontext_t *)ctx)->uc_mcontext.gregs[REG_RIP];
    sp = (char *)((ucontext_t *)ctx)->uc_mcontext.gregs[REG_RSP];
#else
    (void)ctx;
#endif
    char where[64];
    where[0] = 0;
    Dl_info dli;
    if (pc && dladdr(pc, &dli) && dli.dli_fbase)
        snprintf(where, sizeof where, " @@PC:%#lx@@", (unsigned long)((char *)pc - (char *)dli.dli_fbase));
    char head[512];
    describe_thread(w, f, head, sizeof head);
    char *addr = (char *)info->si_addr;
    const char *what;
    if ((sig == SIGSEGV || sig == SIGBUS) &&
        ((addr >= f->stack_lo - 4096 && addr < f->stack_lo + 256) || (sp && sp < f->stack_lo)))
        what = "fiber stack overflow (large private arrays? raise MFEMU_STACK_KB)";
    else if (sig == SIGILL)
        what = "trap: index out of range of a private (thread) array, or another undefined-behaviour trap";
    else if (sig == SIGFPE)
        what = "arithmetic fault (integer division by zero or overflow)";
    else if (sig == SIGUSR2)
        what = "the launch ran past MFEMU_TIMEOUT_S (an endless loop?); interrupted here";
    else
        what = "invalid memory access through an unchecked pointer";
    if (sig == SIGUSR2)
        snprintf(w->err, sizeof w->err, "[mfemu] %s: %s (after %u s)%s", head, what, w->L->timeout_s, where);
    else
        snprintf(w->err, sizeof w->err, "[mfemu] %s: %s (signal %d, address %p)%s", head, what, sig, (void *)addr,
                 where);
    w->failed = true;
    f->state = F_DONE;
    /* leave the signal frame for the scheduler (SA_NODEFER: the signal is not left blocked) */
#if defined(__x86_64__) && !defined(MFEMU_UCONTEXT)
    void *dead;
    mfemu_switch(&dead, w->sched_sp);
#else
    setcontext(&w->sched_uc);
#endif
}

void install_crash_handlers()
{
    if (g_handlers_installed++) return;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = crash_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < kNumSignals; i++) sigaction(kCrashSignals[i], &sa, &g_old_actions[i]);
}

void remove_crash_handlers()
{
    if (--g_handlers_installed) return;
    for (int i = 0; i < kNumSignals; i++) sigaction(kCrashSignals[i], &g_old_actions[i], nullptr);
}

const size_t kSigStackBytes = 65536;

struct watchdog_arg {
    launch_state *L;
    worker *ws;
    unsigned nw;
};

void *watchdog_main(void *arg)
{
    watchdog_arg *a = (watchdog_arg *)arg;
    launch_state *L = a->L;
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += L->timeout_s;
    pthread_mutex_lock(&L->wd_mu);
    while (!L->wd_done) {
        int rc = pthread_cond_timedwait(&L->wd_cv, &L->wd_mu, &deadline);
        if (rc == ETIMEDOUT && !L->wd_done) {
            L->timed_out = true;
            for (unsigned i = 0; i < a->nw; i++)
                if (a->ws[i].alive) pthread_kill(a->ws[i].self, SIGUSR2);
            clock_gettime(CLOCK_REALTIME, &deadline);
            deadline.tv_nsec += 50000000L; /* again in 50 ms, until the workers are out */
            if (deadline.tv_nsec >= 1000000000L) {
                deadline.tv_sec++;
                deadline.tv_nsec -= 1000000000L;
            }
        }
    }
    pthread_mutex_unlock(&L->wd_mu);
    return nullptr;
}

void *worker_main(void *arg)
{
    worker *w = (worker *)arg;
    launch_state *L = w->L;
    tl_w = w;
    pthread_mutex_lock(&L->wd_mu);
    w->self = pthread_self();
    w->alive = true;
    pthread_mutex_unlock(&L->wd_mu);
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_sp = w->sig_stack;
    ss.ss_size = kSigStackBytes;
    sigaltstack(&ss, &w->old_sig_stack);
    for (;;) {
        pthread_mutex_lock(&L->mu);
        uint64_t g = L->next_group;
        bool stop = L->stop || g >= L->ngroups;
        if (!stop) L->next_group++;
        pthread_mutex_unlock(&L->mu);
        if (stop) break;
        if (!run_group(w, g)) {
            pthread_mutex_lock(&L->mu);
            if (!L->failed || g < L->failed_group) {
                L->failed = true;
                L->failed_group = g;
                snprintf(L->err, sizeof L->err, "%s", w->err);
            }
            L->stop = true;
            pthread_mutex_unlock(&L->mu);
            break;
        }
    }
    pthread_mutex_lock(&L->wd_mu);
    w->alive = false;
    pthread_mutex_unlock(&L->wd_mu);
    sigaltstack(&w->old_sig_stack, nullptr);
    tl_w = nullptr;
    return nullptr;
}

bool worker_setup(worker *w, launch_state *L, char *err, size_t err_len)
{
    memset((void *)w, 0, sizeof *w);
    w->L = L;
    w->fibers = (fiber *)calloc(L->nthreads, sizeof(fiber));
    w->stack_mem_bytes = (size_t)L->nthreads * L->stack_size;
    void *m = mmap(nullptr, w->stack_mem_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    w->arena = (char *)aligned_alloc(64, kMaxThreadgroupBytes);
    w->sig_stack = (char *)malloc(kSigStackBytes);
    if (!w->fibers || m == MAP_FAILED || !w->arena || !w->sig_stack) {
        snprintf(err, err_len, "[mfemu] out of memory setting up %u fibers", L->nthreads);
        if (m != MAP_FAILED) munmap(m, w->stack_mem_bytes);
        free(w->fibers);
        free(w->arena);
        free(w->sig_stack);
        return false;
    }
    w->stack_mem = (char *)m;
    for (unsigned t = 0; t < L->nthreads; t++) mprotect(w->stack_mem + (size_t)t * L->stack_size, 4096, PROT_NONE);
    return true;
}

void worker_teardown(worker *w)
{
    munmap(w->stack_mem, w->stack_mem_bytes);
    free(w->fibers);
    free(w->arena);
    free(w->sig_stack);
}

unsigned env_uint(const char *name, unsigned dflt, unsigned lo, unsigned hi)
{
    const char *s = getenv(name);
    if (!s || !*s) return dflt;
    long v = strtol(s, nullptr, 10);
    if (v < (long)lo) return lo;
    if (v > (long)hi) return hi;
    return (unsigned)v;
}

} /* namespace */

/* ------------------------------------------------------------------ kernel-facing API ---- */

void register_kernel(const char *name, kernel_fn fn, size_t params_size)
{
    if (g_nkernels < kMaxKernels) g_kernels[g_nkernels++] = kernel_entry{name, fn, params_size};
}

void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfailf(nullptr, fmt, ap);
}

void fail_lane(const char *op, int lane, const char *fmt, ...)
{
    char extra[128];
    snprintf(extra, sizeof extra, ", %s, lane %d", op, lane);
    va_list ap;
    va_start(ap, fmt);
    vfailf(extra, fmt, ap);
}

void fail_access(const region *r, uintptr_t addr, size_t size, size_t align)
{
    char pc[64];
    pc_note(__builtin_return_address(0), pc, sizeof pc);
    if (!r) fail("access through a null or unbound pointer%s", pc);
    intptr_t off = (intptr_t)(addr - (uintptr_t)r->base);
    const char *space = r->space ? "threadgroup array" : "buffer";
    if (off >= 0 && (size_t)off + size <= r->bytes && (size_t)off % align)
        fail("misaligned access to %s '%s': %zu-byte element at byte offset %ld (needs alignment %zu)%s", space,
             r->name, size, (long)off, align, pc);
    if (r->bytes == 0 && r->space == 0)
        fail("out-of-bounds access to %s '%s', which is not bound (empty): %zu-byte element at byte offset %ld%s",
             space, r->name, size, (long)off, pc);
    fail("out-of-bounds access to %s '%s' (%zu bytes): %zu-byte element at byte offset %ld (element index %ld)%s",
         space, r->name, r->bytes, size, (long)off, (long)(off >= 0 ? off / (long)size : -((-off + (long)size - 1) / (long)size)), pc);
}

void *threadgroup_alloc(const void *tag, size_t elem_size, size_t elem_align, size_t count, const char *name,
                        const char *file, unsigned line, const region **out)
{
    worker *w = tl_w;
    for (int i = 0; i < w->narrays; i++)
        if (w->arrays[i].tag == tag) {
            *out = &w->arrays[i].reg;
            return w->arrays[i].p;
        }
    size_t bytes = elem_size * count;
    if (elem_align < 16) elem_align = 16;
    size_t start = (w->arena_used + elem_align - 1) & ~(elem_align - 1);
    size_t end = start + ((bytes + 15) & ~(size_t)15);
    if (end > kMaxThreadgroupBytes || w->narrays >= kMaxArrays || count > kMaxThreadgroupBytes) {
        char list[1024];
        size_t len = 0;
        list[0] = 0;
        for (int i = 0; i < w->narrays && len + 100 < sizeof list; i++)
            len += (size_t)snprintf(list + len, sizeof list - len, "%s '%s' %zu bytes (%s:%u)", i ? "," : "",
                                    w->arrays[i].reg.name, w->arrays[i].bytes, base_name(w->arrays[i].file),
                                    w->arrays[i].line);
        fail("threadgroup memory over the 32 KiB limit: array '%s' (%zu bytes, %s:%u) on top of %zu bytes already "
             "declared%s%s",
             name, bytes, base_name(file), line, w->arena_used, w->narrays ? ":" : "", list);
    }
    tg_array_rec &a = w->arrays[w->narrays++];
    a.tag = tag;
    a.p = w->arena + start;
    a.bytes = bytes;
    a.file = file;
    a.line = line;
    a.reg = region{a.p, bytes, name, 1};
    memset(a.p, 0xff, end - start); /* poison: NaN for float/half/bfloat, -1 for ints */
    w->arena_used = end;
    *out = &a.reg;
    return a.p;
}

void sync_simd(const char *op, const char *file, unsigned line, void *data, combine_fn fn)
{
    worker *w = tl_w;
    fiber *f = w->cur;
    f->op = op;
    f->file = file;
    f->line = line;
    f->site = call_path_hash(f);
    f->seq = f->n_simd++;
    f->data = data;
    f->fn = fn;
    f->state = F_WAIT_SIMD;
    switch_to_scheduler(w, f);
}

void sync_threadgroup(const char *op, const char *file, unsigned line)
{
    worker *w = tl_w;
    fiber *f = w->cur;
    f->op = op;
    f->file = file;
    f->line = line;
    f->site = call_path_hash(f);
    f->seq = f->n_tg++;
    f->data = nullptr;
    f->fn = nullptr;
    f->state = F_WAIT_TG;
    switch_to_scheduler(w, f);
}

uint current_lane() { return tl_w->cur->args.lane; }


} /* namespace mfemu */

/* ------------------------------------------------------------------ C entry points ---- */

using namespace mfemu;

MFEMU_EXPORT int mfemu_kernel_count(void) { return g_nkernels; }

MFEMU_EXPORT const char *mfemu_kernel_name(int i) { return i >= 0 && i < g_nkernels ? g_kernels[i].name : nullptr; }

MFEMU_EXPORT int mfemu_launch(const char *kernel, const unsigned grid[3], const unsigned tg[3], void **buffers,
                              const size_t *buffer_bytes, int n_buffers, const void *params, size_t params_bytes,
                              int schedule, unsigned long long seed, char *err, size_t err_len)
{
    static const char *const slot_names[kNumSlots] = {"q (slot 0)", "k (slot 1)", "v (slot 2)", "o (slot 3)",
                                                      "lse (slot 4)", "cu_seqlens_q (slot 5)",
                                                      "cu_seqlens_k (slot 6)", "alibi (slot 7)",
                                                      "scratch (slot 8)", "params (slot 9)",
                                                      "kv_index (slot 10)", "seqused_k (slot 11)",
                                                      "leftpad_k (slot 12)"};
    static char empty_buffer[64] __attribute__((aligned(64)));
    if (err && err_len) err[0] = 0;
    const kernel_entry *ke = nullptr;
    for (int i = 0; i < g_nkernels; i++)
        if (!strcmp(g_kernels[i].name, kernel)) ke = &g_kernels[i];
    if (!ke) {
        char names[1024];
        size_t len = 0;
        names[0] = 0;
        for (int i = 0; i < g_nkernels && len + 80 < sizeof names; i++)
            len += (size_t)snprintf(names + len, sizeof names - len, "%s%s", i ? ", " : "", g_kernels[i].name);
        snprintf(err, err_len, "[mfemu] no kernel named '%s' in this library (kernels: %s)", kernel, names);
        return 1;
    }
    if (params_bytes != ke->params_size || params_bytes > 4096) {
        snprintf(err, err_len, "[mfemu] kernel '%s': params are %zu bytes, sizeof(mf_params) is %zu", kernel,
                 params_bytes, ke->params_size);
        return 1;
    }
    uint64_t nthreads = (uint64_t)tg[0] * tg[1] * tg[2];
    if (nthreads == 0 || nthreads > kMaxThreads) {
        snprintf(err, err_len,
                 "[mfemu] kernel '%s': %llu threads per threadgroup (%u x %u x %u); Metal allows 1 to %u", kernel,
                 (unsigned long long)nthreads, tg[0], tg[1], tg[2], kMaxThreads);
        return 1;
    }
    if (schedule < 0 || schedule > 2) {
        snprintf(err, err_len, "[mfemu] schedule must be 0 (forward), 1 (reverse) or 2 (random), not %d", schedule);
        return 1;
    }
    uint64_t ngroups = (uint64_t)grid[0] * grid[1] * grid[2];
    if (ngroups == 0) return 0;

    static launch_state L; /* one launch at a time per library */
    static pthread_mutex_t launch_mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&launch_mu);
    memset((void *)&L, 0, sizeof L);
    L.kernel = ke;
    for (int s = 0; s < kNumSlots; s++) {
        bool bound = s < n_buffers && s != kParamsSlot && buffers && buffers[s];
        L.regions[s] = region{bound ? (char *)buffers[s] : empty_buffer, bound ? buffer_bytes[s] : 0, slot_names[s], 0};
    }
    alignas(16) static unsigned char params_copy[4096];
    memcpy(params_copy, params, params_bytes);
    L.params = params_copy;
    for (int i = 0; i < 3; i++) {
        L.grid[i] = grid[i];
        L.tg[i] = tg[i];
    }
    L.nthreads = (unsigned)nthreads;
    L.ngroups = ngroups;
    L.schedule = schedule;
    L.seed = seed;
    L.stack_size = (size_t)env_uint("MFEMU_STACK_KB", 256, 32, 8192) * 1024;
    pthread_mutex_init(&L.mu, nullptr);
    pthread_mutex_init(&L.wd_mu, nullptr);
    pthread_cond_init(&L.wd_cv, nullptr);
    L.timeout_s = env_uint("MFEMU_TIMEOUT_S", 300, 0, 1u << 30);

    unsigned nw = env_uint("MFEMU_THREADS", 2, 1, 64);
    if (nw > ngroups) nw = (unsigned)ngroups;
    worker *ws = (worker *)calloc(nw, sizeof(worker));
    pthread_t th[64];
    unsigned started = 0;
    int rc = 0;
    if (!ws) {
        snprintf(err, err_len, "[mfemu] out of memory");
        rc = 1;
    }
    for (unsigned i = 0; !rc && i < nw; i++) {
        if (!worker_setup(&ws[i], &L, err, err_len)) {
            rc = 1;
            break;
        }
        started = i + 1;
    }
    if (!rc) {
        install_crash_handlers();
        unsigned spawned = 0;
        for (unsigned i = 1; i < started; i++) {
            if (pthread_create(&th[i], nullptr, worker_main, &ws[i]) != 0) break;
            spawned = i;
        }
        watchdog_arg wa = {&L, ws, started};
        pthread_t wd;
        bool have_wd = L.timeout_s > 0 && pthread_create(&wd, nullptr, watchdog_main, &wa) == 0;
        worker_main(&ws[0]);
        for (unsigned i = 1; i <= spawned; i++) pthread_join(th[i], nullptr);
        if (have_wd) {
            pthread_mutex_lock(&L.wd_mu);
            L.wd_done = true;
            pthread_cond_signal(&L.wd_cv);
            pthread_mutex_unlock(&L.wd_mu);
            pthread_join(wd, nullptr);
        }
        remove_crash_handlers();
        if (L.failed) {
            snprintf(err, err_len, "%s", L.err);
            rc = 1;
        }
    }
    for (unsigned i = 0; i < started; i++) worker_teardown(&ws[i]);
    free(ws);
    pthread_mutex_destroy(&L.mu);
    pthread_mutex_destroy(&L.wd_mu);
    pthread_cond_destroy(&L.wd_cv);
    pthread_mutex_unlock(&launch_mu);
    return rc;
}
