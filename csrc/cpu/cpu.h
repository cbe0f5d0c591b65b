/* cpu.h - the CPU backend: blocked online-softmax flash attention in C. */
#ifndef MF_CPU_H
#define MF_CPU_H

#include "problem.h"

/* Runs the forward pass of a validated CPU problem on up to n_threads threads. Call without the
 * GIL. Returns MF_OK or an error (out of memory). */
int mf_cpu_forward(const mf_problem *pb, int n_threads, mf_error *err);

/* The append + rotary pass of a kv cache call (pb->app.present): writes the new k (rotated) and
 * v rows into the cache and the rotated q into q_rot. Call without the GIL, before
 * mf_cpu_forward. Results do not depend on n_threads. */
int mf_cpu_append(const mf_problem *pb, int n_threads, mf_error *err);

/* The backward pass of a validated problem (pb->pass == MF_PASS_BACKWARD): writes dq, dk, dv and
 * softmax_d. Call without the GIL. Results do not depend on n_threads. */
int mf_cpu_backward(const mf_problem *pb, int n_threads, mf_error *err);

/* The SIMD path in use ("avx2+fma" or "generic"). */
const char *mf_cpu_simd_path(void);

#endif /* MF_CPU_H */
