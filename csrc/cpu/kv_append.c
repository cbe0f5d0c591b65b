/* kv_append.c - the append + rotary pass of a kv cache call, on the CPU.
 *
 * flash_attn_with_kvcache(..., k=k_new, v=v_new, rotary_cos=cos, rotary_sin=sin) first writes
 * the new rows into the cache, then attends over the updated cache. For sequence b and new row t
 * the destination is key position pos = cache_seqlens[b] + t, addressed exactly as attention
 * addresses keys (dense: row kv_batch(b) of the cache; paged: block
 * block_table[b, pos / page_size], slot pos % page_size):
 *   v row: copied bitwise;
 *   k row: copied bitwise, or rotated at position pos when rotary is on;
 *   q row i of sequence b (rotary only): rotated at cache_seqlens[b] + i when the call is causal
 *   or local, else at cache_seqlens[b], into q_rot (the caller's q is never modified).
 * Rotation of a row x with c = cos[pos], s = sin[pos] (rotary_dim / 2 entries), in fp32:
 *   interleaved (GPT-J):  (x[2i], x[2i+1])  -> (x[2i] c[i] - x[2i+1] s[i], x[2i] s[i] + x[2i+1] c[i])
 *   halves (GPT-NeoX):    (x[i], x[i+rd/2]) -> (x[i] c[i] - x[i+rd/2] s[i], x[i] s[i] + x[i+rd/2] c[i])
 * dims past rotary_dim unchanged; the result rounded to the cache's dtype (nearest even).
 * Each row is written by one task from its own inputs only, so the result does not depend on
 * the number of threads. Nothing here allocates. */
#include <string.h>

#include "cpu/cpu.h"
#include "cpu/kernels.h"
#include "cpu/pool.h"

typedef struct append_job {
    const mf_problem *pb;
    const mf_cpu_kernels *kn;
    int64_t es;
    int64_t kv_tasks; /* batch x seqlen_new: one new row (all kv heads) each; q rows follow */
} append_job;

static void rotate(float *x, const float *c, const float *s, int rd, int interleaved) {
    const int h = rd / 2;
    if (interleaved) {
        for (int i = 0; i < h; i++) {
            const float x0 = x[2 * i], x1 = x[2 * i + 1];
            x[2 * i] = x0 * c[i] - x1 * s[i];
            x[2 * i + 1] = x0 * s[i] + x1 * c[i];
        }
    } else {
        for (int i = 0; i < h; i++) {
            const float x0 = x[i], x1 = x[i + h];
            x[i] = x0 * c[i] - x1 * s[i];
            x[i + h] = x0 * s[i] + x1 * c[i];
        }
    }
}

/* cos/sin of one position, in fp32 */
static void load_cos_sin(const append_job *jb, int64_t pos, float *c, float *s) {
    const mf_append *a = &jb->pb->app;
    const int h = a->rotary_dim / 2;
    jb->kn->load(c, (const char *)a->cos + pos * a->cos_stride * jb->es, h, jb->pb->dtype, 1.0f);
    jb->kn->load(s, (const char *)a->sin + pos * a->sin_stride * jb->es, h, jb->pb->dtype, 1.0f);
}

static void append_task(void *ctx, int64_t task, int worker) {
    (void)worker;
    const append_job *jb = (const append_job *)ctx;
    const mf_problem *pb = jb->pb;
    const mf_params *p = &pb->p;
    const mf_append *a = &pb->app;
    const int64_t es = jb->es;
    const int D = p->head_dim, Dv = p->head_dim_v, rd = a->rotary_dim;
    float x[MF_MAX_HEAD_DIM], c[MF_MAX_HEAD_DIM / 2], s[MF_MAX_HEAD_DIM / 2];
    if (task < jb->kv_tasks) { /* new row t of sequence b, every kv head */
        const int b = (int)(task / a->seqlen_new);
        const int64_t t = task % a->seqlen_new, pos = (int64_t)pb->seqused_k[b] + t;
        int64_t kb, row = pos;
        if (p->flags & MF_FLAG_PAGED) {
            kb = pb->kv_index[b * p->block_table_stride_b + pos / p->page_size];
            row = pos % p->page_size;
        } else {
            kb = mf_problem_kv_batch(pb, b);
        }
        if (rd > 0) load_cos_sin(jb, pos, c, s);
        for (int g = 0; g < p->heads_k; g++) {
            char *kd = (char *)pb->k + (kb * p->k_stride_b + row * p->k_stride_s + (int64_t)g * p->k_stride_h) * es;
            char *vd = (char *)pb->v + (kb * p->v_stride_b + row * p->v_stride_s + (int64_t)g * p->v_stride_h) * es;
            const char *ks = (const char *)a->k_new + (b * a->kn_stride[0] + t * a->kn_stride[1] + g * a->kn_stride[2]) * es;
            const char *vs = (const char *)a->v_new + (b * a->vn_stride[0] + t * a->vn_stride[1] + g * a->vn_stride[2]) * es;
            memmove(vd, vs, (size_t)(Dv * es));
            if (rd == 0) {
                memmove(kd, ks, (size_t)(D * es));
            } else {
                jb->kn->load(x, ks, D, pb->dtype, 1.0f);
                rotate(x, c, s, rd, a->interleaved);
                jb->kn->store(kd, x, D, pb->dtype, 1.0f);
            }
        }
        return;
    }
    /* q row i of sequence b, every query head, into q_rot */
    const int64_t qt = task - jb->kv_tasks;
    const int b = (int)(qt / p->seqlen_q);
    const int64_t i = qt % p->seqlen_q;
    const int64_t pos = (int64_t)pb->seqused_k[b] + (a->q_per_row ? i : 0);
    load_cos_sin(jb, pos, c, s);
    for (int h = 0; h < p->heads_q; h++) {
        const char *qs = (const char *)a->q_src + (b * a->qs_stride[0] + i * a->qs_stride[1] + h * a->qs_stride[2]) * es;
        char *qd = (char *)pb->q + (b * p->q_stride_b + i * p->q_stride_s + (int64_t)h * p->q_stride_h) * es;
        jb->kn->load(x, qs, D, pb->dtype, 1.0f);
        rotate(x, c, s, rd, a->interleaved);
        jb->kn->store(qd, x, D, pb->dtype, 1.0f);
    }
}

int mf_cpu_append(const mf_problem *pb, int n_threads, mf_error *err) {
    (void)err;
    const mf_append *a = &pb->app;
    if (!a->present) return MF_OK;
    append_job jb = {pb, mf_cpu_kernels_get(), (int64_t)mf_dtype_size(pb->dtype),
                     (int64_t)pb->p.batch * a->seqlen_new};
    const int64_t q_tasks = mf_problem_rotates_q(pb) ? (int64_t)pb->p.batch * pb->p.seqlen_q : 0;
    const int64_t tasks = jb.kv_tasks + q_tasks;
    if (tasks > 0) mf_pool_run(tasks < n_threads ? (int)tasks : n_threads, tasks, append_task, &jb);
    return MF_OK;
}
