/* Self-test kernels for simdgroup_matrix. */
#include "mf_msl.h"

/* q: an 8x8 matrix. scratch[2 * lane + i] = thread_elements()[i] after simdgroup_load;
 * o: a matrix whose lane l wrote (2l, 2l + 1) through thread_elements(), then simdgroup_store. */
MF_ATTN_KERNEL(st_sgm_layout)
{
    simdgroup_matrix<MF_T, 8, 8> m;
    simdgroup_load(m, q, 8);
    const vec<MF_T, 2> e = m.thread_elements();
    scratch[2 * lane] = float(e[0]);
    scratch[2 * lane + 1] = float(e[1]);

    simdgroup_matrix<MF_T, 8, 8> w;
    w.thread_elements()[0] = MF_T(float(2 * lane));
    w.thread_elements()[1] = MF_T(float(2 * lane + 1));
    simdgroup_store(w, o, 8);
}

/* Simdgroup s computes D = A_s B + C with A_s the rows [8s, 8s + 8) of q (or, transposed,
 * columns), ld = params.head_dim; B from k (ld head_dim); C from v (8x8). A is staged
 * through threadgroup memory. D (type MF_T) -> o + 64 s. In float: Cf from scratch[0..64),
 * Df = A_s B + Cf -> scratch + 64 + 64 s.
 * params.flags: 1 = load A transposed, 2 = load B transposed. */
MF_ATTN_KERNEL(st_sgm_mma)
{
    MF_THREADGROUP_ARRAY(MF_T, a_stage, 2 * 8 * 16);
    const bool ta = (params.flags & 1) != 0, tb = (params.flags & 2) != 0;
    const ulong ld = ulong(params.head_dim);
    for (uint i = tid; i < 16 * ld; i += tg_size.x) a_stage[i] = q[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);

    simdgroup_matrix<MF_T, 8, 8> a, b, c, d;
    MF_THREADGROUP_PTR(const MF_T) a_src = a_stage + (ta ? sg * 8 : sg * 8 * ld);
    simdgroup_load(a, a_src, ld, ulong2(0), ta);
    simdgroup_load(b, k, ld, ulong2(0), tb);
    simdgroup_load(c, v, 8);
    simdgroup_multiply_accumulate(d, a, b, c);
    simdgroup_store(d, o + 64 * sg, 8);

    simdgroup_float8x8 cf;
    simdgroup_load(cf, scratch, 8);
    simdgroup_multiply_accumulate(cf, a, b, cf);
    simdgroup_store(cf, scratch + 64 + 64 * sg, 8);
}

/* matrix_origin: D = tile (row 8, col 4) of a 16 x ld matrix q, copied through a load/store
 * with origin; -> o (8x8). */
MF_ATTN_KERNEL(st_sgm_origin)
{
    simdgroup_matrix<MF_T, 8, 8> m;
    simdgroup_load(m, q, ulong(params.head_dim), ulong2{4, 8}, false);
    simdgroup_store(m, o, 8);
}

/* lanes 0..15 skip the multiply: caught */
MF_ATTN_KERNEL(st_sgm_divergent)
{
    simdgroup_float8x8 a = make_filled_simdgroup_matrix<float, 8, 8>(1.0f), d;
    if (lane >= 16) simdgroup_multiply_accumulate(d, a, a, a);
    scratch[lane] = 1.0f;
}
