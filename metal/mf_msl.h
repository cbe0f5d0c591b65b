/* mf_msl.h - the few macros where Metal Shading Language and the C++17 emulator differ.
 *
 * Every kernel file starts with `#include "mf_msl.h"` (which also includes mf_params.h) and is
 * written in the dual-compile subset (tests/metal_emu/README.md, "Writing a kernel" and "The
 * rules of the dual-compile subset"). Under Metal (__METAL_VERSION__) the macros expand to plain MSL;
 * under the emulator they expand to checked C++ types from tests/metal_emu/mfemu.h, which the
 * emulator harness includes before the kernel file.
 *
 *   MF_DTYPE=0|1|2            element type MF_T = float | half | bfloat (default 0)
 *   MF_ATTN_KERNEL(name)      opens an attention kernel with the fixed signature (slots 0..12 of
 *                             mf_params.h, then the thread-position values); the body follows
 *   MF_APPEND_KERNEL(name)    opens a kv-cache append kernel (its own slots, see mf_params.h:
 *                             q_src, k_cache, v_cache, q_rot, k_new, v_new, rotary_cos,
 *                             rotary_sin, aparams, params, kv_index, seqused_k)
 *   MF_THREADGROUP_ARRAY(type, name, count)
 *                             threadgroup array declared at the top level of a kernel body
 *   MF_DEVICE_PTR(T)          type of a pointer into device memory: `MF_DEVICE_PTR(const MF_T) p`
 *   MF_THREADGROUP_PTR(T)     type of a pointer into threadgroup memory
 *   MF_DEVICE_CAST(T, p)      reinterpret a device pointer as `device T *` (e.g. const half4)
 *   MF_THREADGROUP_CAST(T, p) reinterpret a threadgroup pointer as `threadgroup T *`
 *   MF_CONVERT(T, x)          value conversion between vector types (float4 <- half4, ...)
 */
#ifndef MF_MSL_H
#define MF_MSL_H

#ifndef MF_DTYPE
#define MF_DTYPE 0
#endif

#ifdef __METAL_VERSION__ /* ------------------------------------------------ Metal ---- */

#include <metal_stdlib>
using namespace metal;
#include "mf_params.h"

#if MF_DTYPE == 0
typedef float MF_T;
#elif MF_DTYPE == 1
typedef half MF_T;
#elif MF_DTYPE == 2
typedef bfloat MF_T;
#else
#error "MF_DTYPE must be 0 (float), 1 (half) or 2 (bfloat)"
#endif

#define MF_DEVICE_PTR(T) device T *
#define MF_THREADGROUP_PTR(T) threadgroup T *
#define MF_DEVICE_CAST(T, p) ((device T *)(p))
#define MF_THREADGROUP_CAST(T, p) ((threadgroup T *)(p))
#define MF_CONVERT(T, x) static_cast<T>(x)

#define MF_THREADGROUP_ARRAY(type, name, count) threadgroup type name[count]

#define MF_ATTN_KERNEL(name)                                                                    \
    kernel void name(device const MF_T *q [[buffer(0)]], device const MF_T *k [[buffer(1)]],    \
                     device const MF_T *v [[buffer(2)]], device MF_T *o [[buffer(3)]],          \
                     device float *lse [[buffer(4)]], device const int *cu_seqlens_q [[buffer(5)]], \
                     device const int *cu_seqlens_k [[buffer(6)]],                              \
                     device const float *alibi [[buffer(7)]], device float *scratch [[buffer(8)]], \
                     constant mf_params &params [[buffer(9)]],                                  \
                     device const int *kv_index [[buffer(10)]],                                 \
                     device const int *seqused_k [[buffer(11)]],                                \
                     device const int *leftpad_k [[buffer(12)]],                                \
                     MF_THREAD_POSITION_PARAMS)

#define MF_THREAD_POSITION_PARAMS                                                               \
                     uint3 tg_pos [[threadgroup_position_in_grid]],                             \
                     uint3 tgs_per_grid [[threadgroups_per_grid]],                              \
                     uint3 tg_size [[threads_per_threadgroup]],                                 \
                     uint3 t_pos [[thread_position_in_threadgroup]],                            \
                     uint tid [[thread_index_in_threadgroup]],                                  \
                     uint sg [[simdgroup_index_in_threadgroup]],                                \
                     uint lane [[thread_index_in_simdgroup]]

#define MF_APPEND_KERNEL(name)                                                                  \
    kernel void name(device const MF_T *q_src [[buffer(0)]], device MF_T *k_cache [[buffer(1)]], \
                     device MF_T *v_cache [[buffer(2)]], device MF_T *q_rot [[buffer(3)]],      \
                     device const MF_T *k_new [[buffer(4)]], device const MF_T *v_new [[buffer(5)]], \
                     device const MF_T *rotary_cos [[buffer(6)]],                               \
                     device const MF_T *rotary_sin [[buffer(7)]],                               \
                     constant mf_append_params &aparams [[buffer(8)]],                          \
                     constant mf_params &params [[buffer(9)]],                                  \
                     device const int *kv_index [[buffer(10)]],                                 \
                     device const int *seqused_k [[buffer(11)]],                                \
                     MF_THREAD_POSITION_PARAMS)

#else /* ------------------------------------------------------------------ emulator ---- */

#ifndef MFEMU_H
#error "mf_msl.h: outside Metal, kernels compile only through the emulator (tests/metal_emu/emu.py), which includes mfemu.h first"
#endif

#include "mf_params.h"
using namespace metal;

#if MF_DTYPE == 0
typedef float MF_T;
#elif MF_DTYPE == 1
typedef half MF_T;
#elif MF_DTYPE == 2
typedef bfloat MF_T;
#else
#error "MF_DTYPE must be 0 (float), 1 (half) or 2 (bfloat)"
#endif

#define MF_DEVICE_PTR(T) ::mfemu::device_ptr<T>
#define MF_THREADGROUP_PTR(T) ::mfemu::threadgroup_ptr<T>
#define MF_DEVICE_CAST(T, p) ::mfemu::ptr_cast<T>(p)
#define MF_THREADGROUP_CAST(T, p) ::mfemu::ptr_cast<T>(p)
#define MF_CONVERT(T, x) ::mfemu::convert<T>(x)

/* Storage shared by the threads of the current threadgroup, found by the address of a static
 * tag; poisoned with 0xFF bytes (NaN) when first reached in each threadgroup and counted
 * against the 32 KiB limit. */
#define MF_THREADGROUP_ARRAY(type, name, count)                                                 \
    static const char name##_mfemu_tag_ = 0;                                                    \
    ::mfemu::threadgroup_ptr<type> name =                                                      \
        ::mfemu::threadgroup_array<type>(&name##_mfemu_tag_, (count), #name, __FILE__, __LINE__)

#define MFEMU_U [[maybe_unused]]
#define MFEMU_ATTN_SIGNATURE                                                                    \
    MFEMU_U ::mfemu::device_ptr<const MF_T> q, MFEMU_U ::mfemu::device_ptr<const MF_T> k,       \
        MFEMU_U ::mfemu::device_ptr<const MF_T> v, MFEMU_U ::mfemu::device_ptr<MF_T> o,         \
        MFEMU_U ::mfemu::device_ptr<float> lse,                                                 \
        MFEMU_U ::mfemu::device_ptr<const int> cu_seqlens_q,                                    \
        MFEMU_U ::mfemu::device_ptr<const int> cu_seqlens_k,                                    \
        MFEMU_U ::mfemu::device_ptr<const float> alibi, MFEMU_U ::mfemu::device_ptr<float> scratch, \
        MFEMU_U const mf_params &params, MFEMU_U ::mfemu::device_ptr<const int> kv_index,       \
        MFEMU_U ::mfemu::device_ptr<const int> seqused_k,                                       \
        MFEMU_U ::mfemu::device_ptr<const int> leftpad_k, MFEMU_POSITION_SIGNATURE

#define MFEMU_POSITION_SIGNATURE                                                                \
    MFEMU_U uint3 tg_pos, MFEMU_U uint3 tgs_per_grid, MFEMU_U uint3 tg_size, MFEMU_U uint3 t_pos, \
        MFEMU_U uint tid, MFEMU_U uint sg, MFEMU_U uint lane
#define MFEMU_POSITION_ARGS a_.tg_pos, a_.tgs_per_grid, a_.tg_size, a_.t_pos, a_.tid, a_.sg, a_.lane

#define MF_ATTN_KERNEL(name)                                                                    \
    static void name(MFEMU_ATTN_SIGNATURE);                                                     \
    static void name##_mfemu_thunk_(const ::mfemu::thread_args &a_)                             \
    {                                                                                           \
        static_assert(sizeof(mf_params) == MF_PARAMS_SIZE, "mf_params size");                  \
        name(a_.buffer<const MF_T>(MF_SLOT_Q), a_.buffer<const MF_T>(MF_SLOT_K),                \
             a_.buffer<const MF_T>(MF_SLOT_V), a_.buffer<MF_T>(MF_SLOT_O),                      \
             a_.buffer<float>(MF_SLOT_LSE), a_.buffer<const int>(MF_SLOT_CU_Q),                 \
             a_.buffer<const int>(MF_SLOT_CU_K), a_.buffer<const float>(MF_SLOT_ALIBI),         \
             a_.buffer<float>(MF_SLOT_SCRATCH), *(const mf_params *)a_.params,                  \
             a_.buffer<const int>(MF_SLOT_KV_INDEX), a_.buffer<const int>(MF_SLOT_SEQUSED_K),   \
             a_.buffer<const int>(MF_SLOT_LEFTPAD_K), MFEMU_POSITION_ARGS);                     \
    }                                                                                           \
    static const ::mfemu::kernel_registrar name##_mfemu_reg_(#name, &name##_mfemu_thunk_,       \
                                                             sizeof(mf_params));                \
    static void name(MFEMU_ATTN_SIGNATURE)

#define MFEMU_APPEND_SIGNATURE                                                                  \
    MFEMU_U ::mfemu::device_ptr<const MF_T> q_src, MFEMU_U ::mfemu::device_ptr<MF_T> k_cache,   \
        MFEMU_U ::mfemu::device_ptr<MF_T> v_cache, MFEMU_U ::mfemu::device_ptr<MF_T> q_rot,     \
        MFEMU_U ::mfemu::device_ptr<const MF_T> k_new,                                          \
        MFEMU_U ::mfemu::device_ptr<const MF_T> v_new,                                          \
        MFEMU_U ::mfemu::device_ptr<const MF_T> rotary_cos,                                     \
        MFEMU_U ::mfemu::device_ptr<const MF_T> rotary_sin,                                     \
        MFEMU_U const mf_append_params &aparams, MFEMU_U const mf_params &params,               \
        MFEMU_U ::mfemu::device_ptr<const int> kv_index,                                        \
        MFEMU_U ::mfemu::device_ptr<const int> seqused_k, MFEMU_POSITION_SIGNATURE

/* The append params travel in slot 8 as a byte buffer (setBytes on the GPU). */
#define MF_APPEND_KERNEL(name)                                                                  \
    static void name(MFEMU_APPEND_SIGNATURE);                                                   \
    static void name##_mfemu_thunk_(const ::mfemu::thread_args &a_)                             \
    {                                                                                           \
        static_assert(sizeof(mf_params) == MF_PARAMS_SIZE, "mf_params size");                  \
        static_assert(sizeof(mf_append_params) == MF_APPEND_PARAMS_SIZE, "mf_append_params size"); \
        if (a_.regions[MF_APP_SLOT_APP_PARAMS].bytes != sizeof(mf_append_params))               \
            ::mfemu::fail("[mfemu] kernel '%s': slot 8 must hold the %zu bytes of "             \
                          "mf_append_params, got %zu", #name, sizeof(mf_append_params),         \
                          a_.regions[MF_APP_SLOT_APP_PARAMS].bytes);                            \
        name(a_.buffer<const MF_T>(MF_APP_SLOT_Q_SRC), a_.buffer<MF_T>(MF_APP_SLOT_K_CACHE),    \
             a_.buffer<MF_T>(MF_APP_SLOT_V_CACHE), a_.buffer<MF_T>(MF_APP_SLOT_Q_ROT),          \
             a_.buffer<const MF_T>(MF_APP_SLOT_K_NEW), a_.buffer<const MF_T>(MF_APP_SLOT_V_NEW), \
             a_.buffer<const MF_T>(MF_APP_SLOT_COS), a_.buffer<const MF_T>(MF_APP_SLOT_SIN),    \
             *(const mf_append_params *)(const void *)a_.regions[MF_APP_SLOT_APP_PARAMS].base,  \
             *(const mf_params *)a_.params, a_.buffer<const int>(MF_SLOT_KV_INDEX),             \
             a_.buffer<const int>(MF_SLOT_SEQUSED_K), MFEMU_POSITION_ARGS);                     \
    }                                                                                           \
    static const ::mfemu::kernel_registrar name##_mfemu_reg_(#name, &name##_mfemu_thunk_,       \
                                                             sizeof(mf_params));                \
    static void name(MFEMU_APPEND_SIGNATURE)

#endif /* __METAL_VERSION__ */

#endif /* MF_MSL_H */
