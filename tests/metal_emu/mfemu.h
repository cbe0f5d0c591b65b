/* mfemu.h - the Metal Shading Language subset used by the metal/ kernel files, as C++17 for clang.
 *
 * The harness (emu.py) compiles `#include "mfemu.h"` followed by the kernel file. Types and
 * functions live in namespace metal (kernels say `using namespace metal;`, through mf_msl.h);
 * the machinery lives in namespace mfemu and in mfemu_runtime.cpp (fibers, scheduler, checks).
 *
 * Needs clang >= 15 with -Xclang -ffloat16-excess-precision=none (so that every half
 * operation is rounded to half, as on the GPU) and frame pointers (call-site identity).
 * No system header that declares math functions is included: metal::exp and friends must be
 * the only candidates a kernel sees.
 */
#ifndef MFEMU_H
#define MFEMU_H

#include <stddef.h>
#include <stdint.h>

#if !defined(__clang__) || __clang_major__ < 15
#error "the Metal emulator needs clang >= 15 (ext_vector_type swizzles, _Float16 on x86)"
#endif

/* ------------------------------------------------------------------ scalar types ---- */

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;

namespace mfemu {

template <bool B, class T = void> struct enable_if {};
template <class T> struct enable_if<true, T> { typedef T type; };
template <class A, class B> struct is_same { static constexpr bool value = false; };
template <class A> struct is_same<A, A> { static constexpr bool value = true; };
template <class T> struct remove_const { typedef T type; };
template <class T> struct remove_const<const T> { typedef T type; };

template <class T> struct is_integral { static constexpr bool value = false; };
#define MFEMU_INTEGRAL(T) template <> struct is_integral<T> { static constexpr bool value = true; };
MFEMU_INTEGRAL(bool)
MFEMU_INTEGRAL(char)
MFEMU_INTEGRAL(signed char)
MFEMU_INTEGRAL(unsigned char)
MFEMU_INTEGRAL(short)
MFEMU_INTEGRAL(unsigned short)
MFEMU_INTEGRAL(int)
MFEMU_INTEGRAL(unsigned int)
MFEMU_INTEGRAL(long)
MFEMU_INTEGRAL(unsigned long)
MFEMU_INTEGRAL(long long)
MFEMU_INTEGRAL(unsigned long long)
#undef MFEMU_INTEGRAL

template <class T> struct is_fp { static constexpr bool value = false; };
template <> struct is_fp<float> { static constexpr bool value = true; };
template <> struct is_fp<double> { static constexpr bool value = true; };
template <> struct is_fp<half> { static constexpr bool value = true; };

inline uint16_t f32_to_bf16(float f)
{
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                         /* nearest even */
    return (uint16_t)(u >> 16);
}
inline float bf16_to_f32(uint16_t b) { return __builtin_bit_cast(float, (uint32_t)b << 16); }

} /* namespace mfemu */

/* bfloat: storage of the upper 16 bits of a float; arithmetic in float, rounded back
 * (round to nearest even) after every operation. */
struct bfloat {
    uint16_t bits;
    bfloat() = default;
    template <class U, class = typename mfemu::enable_if<mfemu::is_integral<U>::value ||
                                                          mfemu::is_fp<U>::value>::type>
    bfloat(U x) : bits(mfemu::f32_to_bf16((float)x)) {}
    operator float() const { return mfemu::bf16_to_f32(bits); }
    static bfloat from_bits(uint16_t b)
    {
        bfloat r;
        r.bits = b;
        return r;
    }
    bfloat operator-() const { return from_bits((uint16_t)(bits ^ 0x8000u)); }
    bfloat operator+() const { return *this; }
};

namespace mfemu {
template <class U> struct bf_mixed {
    /* bfloat op U: integers stay bfloat, floating types compute in float (or double) */
    typedef typename enable_if<is_integral<U>::value || is_fp<U>::value,
                               decltype(+(float)0 + (U)0)>::type fp_type;
};
} /* namespace mfemu */

#define MFEMU_BF_OP(op)                                                                          \
    inline bfloat operator op(bfloat a, bfloat b) { return bfloat((float)a op (float)b); }       \
    template <class U, class = typename mfemu::enable_if<mfemu::is_integral<U>::value>::type,   \
              int = 0>                                                                           \
    inline bfloat operator op(bfloat a, U b)                                                     \
    {                                                                                            \
        return bfloat((float)a op (float)b);                                                     \
    }                                                                                            \
    template <class U, class = typename mfemu::enable_if<mfemu::is_integral<U>::value>::type,   \
              int = 0>                                                                           \
    inline bfloat operator op(U a, bfloat b)                                                     \
    {                                                                                            \
        return bfloat((float)a op (float)b);                                                     \
    }                                                                                            \
    template <class U, class = typename mfemu::enable_if<mfemu::is_fp<U>::value>::type>          \
    inline auto operator op(bfloat a, U b)->decltype((float)a op (float)b)                       \
    {                                                                                            \
        return (float)a op (float)b;                                                             \
    }                                                                                            \
    template <class U, class = typename mfemu::enable_if<mfemu::is_fp<U>::value>::type>          \
    inline auto operator op(U a, bfloat b)->decltype((float)a op (float)b)                       \
    {                                                                                            \
        return (float)a op (float)b;                                                             \
    }                                                                                            \
    inline bfloat &operator op##=(bfloat &a, bfloat b) { return a = a op b; }                    \
    template <class U> inline bfloat &operator op##=(bfloat &a, U b) { return a = bfloat(a op b); }
MFEMU_BF_OP(+)
MFEMU_BF_OP(-)
MFEMU_BF_OP(*)
MFEMU_BF_OP(/)
#undef MFEMU_BF_OP

#define MFEMU_BF_CMP(op)                                                                         \
    inline bool operator op(bfloat a, bfloat b) { return (float)a op (float)b; }                 \
    template <class U, class = typename mfemu::enable_if<mfemu::is_integral<U>::value ||        \
                                                          mfemu::is_fp<U>::value>::type>         \
    inline bool operator op(bfloat a, U b)                                                       \
    {                                                                                            \
        return (float)a op (float)b;                                                             \
    }                                                                                            \
    template <class U, class = typename mfemu::enable_if<mfemu::is_integral<U>::value ||        \
                                                          mfemu::is_fp<U>::value>::type>         \
    inline bool operator op(U a, bfloat b)                                                       \
    {                                                                                            \
        return (float)a op (float)b;                                                             \
    }
MFEMU_BF_CMP(<)
MFEMU_BF_CMP(<=)
MFEMU_BF_CMP(>)
MFEMU_BF_CMP(>=)
MFEMU_BF_CMP(==)
MFEMU_BF_CMP(!=)
#undef MFEMU_BF_CMP

/* ------------------------------------------------------------------ vector types ---- */

#define MFEMU_VEC(T, name)                                                                       \
    typedef T name##2 __attribute__((ext_vector_type(2)));                                       \
    typedef T name##3 __attribute__((ext_vector_type(3)));                                       \
    typedef T name##4 __attribute__((ext_vector_type(4)));
MFEMU_VEC(float, float)
MFEMU_VEC(half, half)
MFEMU_VEC(int, int)
MFEMU_VEC(uint, uint)
MFEMU_VEC(short, short)
MFEMU_VEC(ushort, ushort)
MFEMU_VEC(char, char)
MFEMU_VEC(uchar, uchar)
MFEMU_VEC(long, long)
MFEMU_VEC(ulong, ulong)
#undef MFEMU_VEC

#define MFEMU_PACKED(T, name)                                                                    \
    typedef T packed_##name##2 __attribute__((ext_vector_type(2), aligned(sizeof(T))));          \
    typedef T packed_##name##3 __attribute__((ext_vector_type(3), aligned(sizeof(T))));          \
    typedef T packed_##name##4 __attribute__((ext_vector_type(4), aligned(sizeof(T))));
MFEMU_PACKED(float, float)
MFEMU_PACKED(half, half)
MFEMU_PACKED(int, int)
MFEMU_PACKED(uint, uint)
MFEMU_PACKED(short, short)
MFEMU_PACKED(ushort, ushort)
#undef MFEMU_PACKED

namespace mfemu {

/* bfloat vectors: no ext_vector_type of a struct, so a small aggregate with x/y(/z/w). */
template <int N> struct bvec;
template <> struct alignas(4) bvec<2> {
    bfloat x, y;
    bfloat &operator[](int i) { return (&x)[i]; }
    const bfloat &operator[](int i) const { return (&x)[i]; }
};
template <> struct alignas(8) bvec<3> {
    bfloat x, y, z;
    bfloat &operator[](int i) { return (&x)[i]; }
    const bfloat &operator[](int i) const { return (&x)[i]; }
};
template <> struct alignas(8) bvec<4> {
    bfloat x, y, z, w;
    bfloat &operator[](int i) { return (&x)[i]; }
    const bfloat &operator[](int i) const { return (&x)[i]; }
};
#define MFEMU_BVEC_OP(op)                                                                        \
    template <int N> inline bvec<N> operator op(bvec<N> a, bvec<N> b)                            \
    {                                                                                            \
        for (int i = 0; i < N; i++) a[i] = a[i] op b[i];                                         \
        return a;                                                                                \
    }                                                                                            \
    template <int N> inline bvec<N> operator op(bvec<N> a, bfloat b)                             \
    {                                                                                            \
        for (int i = 0; i < N; i++) a[i] = a[i] op b;                                            \
        return a;                                                                                \
    }                                                                                            \
    template <int N> inline bvec<N> &operator op##=(bvec<N> &a, bvec<N> b) { return a = a op b; }
MFEMU_BVEC_OP(+)
MFEMU_BVEC_OP(-)
MFEMU_BVEC_OP(*)
MFEMU_BVEC_OP(/)
#undef MFEMU_BVEC_OP

} /* namespace mfemu */

typedef mfemu::bvec<2> bfloat2;
typedef mfemu::bvec<3> bfloat3;
typedef mfemu::bvec<4> bfloat4;

namespace mfemu {

/* element type and length of scalars and vectors */
template <class T> struct vt {
    static constexpr int n = 1;
    typedef T elem;
};
template <class E, int N> struct vt<E __attribute__((ext_vector_type(N)))> {
    static constexpr int n = N;
    typedef E elem;
};
template <int N> struct vt<bvec<N>> {
    static constexpr int n = N;
    typedef bfloat elem;
};

template <class T> inline typename vt<T>::elem el(const T &x, int i)
{
    if constexpr (vt<T>::n == 1) {
        (void)i;
        return x;
    } else {
        return x[i];
    }
}
template <class T> inline void set_el(T &x, int i, typename vt<T>::elem v)
{
    if constexpr (vt<T>::n == 1) {
        (void)i;
        x = v;
    } else {
        x[i] = v;
    }
}

template <class T, int N> struct vec_sel {
    typedef T type __attribute__((ext_vector_type(N)));
};
template <class T> struct vec_sel<T, 1> { typedef T type; };
template <int N> struct vec_sel<bfloat, N> { typedef bvec<N> type; };
template <> struct vec_sel<bfloat, 1> { typedef bfloat type; };

/* value conversion between vector types (a C-style cast between vectors of one size is a
 * bit cast in clang, a conversion in Metal) */
template <class To, class From> inline To convert(const From &x)
{
    static_assert(vt<To>::n == vt<From>::n, "MF_CONVERT: vector lengths differ");
    To r{};
    for (int i = 0; i < vt<To>::n; i++)
        set_el(r, i, (typename vt<To>::elem)(float)el(x, i));
    return r;
}
template <class To> inline To convert(const int4 &x)
{
    To r{};
    for (int i = 0; i < 4; i++) set_el(r, i, (typename vt<To>::elem)x[i]);
    return r;
}
template <class To> inline To convert(const uint4 &x)
{
    To r{};
    for (int i = 0; i < 4; i++) set_el(r, i, (typename vt<To>::elem)x[i]);
    return r;
}

} /* namespace mfemu */

/* ------------------------------------------------------------------ runtime interface ---- */

namespace mfemu {

/* a bounds-checked memory region (a slot buffer or a threadgroup array) */
struct region {
    char *base;
    size_t bytes;
    const char *name;
    int space; /* 0 device, 1 threadgroup */
};

struct thread_args {
    const region *regions; /* one per buffer slot */
    const void *params;
    uint3 tg_pos, tgs_per_grid, tg_size, t_pos;
    uint tid, sg, lane;
    template <class T> inline auto buffer(int slot) const;
};

typedef void (*kernel_fn)(const thread_args &);
typedef void (*combine_fn)(void *const *lane_data, int n_lanes);

void register_kernel(const char *name, kernel_fn fn, size_t params_size);
struct kernel_registrar {
    kernel_registrar(const char *name, kernel_fn fn, size_t params_size)
    {
        register_kernel(name, fn, params_size);
    }
};

[[noreturn]] void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] __attribute__((noinline)) void fail_access(const region *r, uintptr_t addr, size_t size,
                                                         size_t align);
void *threadgroup_alloc(const void *tag, size_t elem_size, size_t elem_align, size_t count,
                        const char *name, const char *file, unsigned line, const region **out);
/* rendezvous of the lanes of the current simdgroup; `fn` combines the deposits of all lanes */
__attribute__((noinline)) void sync_simd(const char *op, const char *file, unsigned line, void *data,
                                         combine_fn fn);
/* rendezvous of all threads of the current threadgroup */
__attribute__((noinline)) void sync_threadgroup(const char *op, const char *file, unsigned line);
uint current_lane();

/* ------------------------------------------------------------------ checked pointers ---- */

template <class T, int S> struct ptr {
    T *p;
    const region *r;

    ptr() : p(nullptr), r(nullptr) {}
    ptr(T *p_, const region *r_) : p(p_), r(r_) {}
    template <class U, class = typename enable_if<is_same<const U, T>::value &&
                                                  !is_same<U, T>::value>::type>
    ptr(const ptr<U, S> &o) : p(o.p), r(o.r)
    {
    }

    T *at(intptr_t i) const
    {
        uintptr_t a = (uintptr_t)p + (uintptr_t)(i * (intptr_t)sizeof(T));
        if (__builtin_expect(!r || a < (uintptr_t)r->base ||
                                 a - (uintptr_t)r->base > r->bytes ||
                                 r->bytes - (a - (uintptr_t)r->base) < sizeof(T) ||
                                 (a - (uintptr_t)r->base) % alignof(T) != 0,
                             0))
            fail_access(r, a, sizeof(T), alignof(T));
        return (T *)a;
    }
    T &operator*() const { return *at(0); }
    T *operator->() const { return at(0); }
    template <class I, class = typename enable_if<is_integral<I>::value>::type>
    T &operator[](I i) const
    {
        return *at((intptr_t)i);
    }
    template <class I, class = typename enable_if<is_integral<I>::value>::type>
    ptr operator+(I i) const
    {
        return ptr((T *)((uintptr_t)p + (uintptr_t)((intptr_t)i * (intptr_t)sizeof(T))), r);
    }
    template <class I, class = typename enable_if<is_integral<I>::value>::type>
    ptr operator-(I i) const
    {
        return ptr((T *)((uintptr_t)p - (uintptr_t)((intptr_t)i * (intptr_t)sizeof(T))), r);
    }
    template <class I, class = typename enable_if<is_integral<I>::value>::type>
    friend ptr operator+(I i, const ptr &a)
    {
        return a + i;
    }
    template <class U> intptr_t operator-(const ptr<U, S> &o) const
    {
        static_assert(is_same<typename remove_const<U>::type, typename remove_const<T>::type>::value,
                      "difference of pointers to different types");
        return ((intptr_t)p - (intptr_t)o.p) / (intptr_t)sizeof(T);
    }
    template <class I> ptr &operator+=(I i) { return *this = *this + i; }
    template <class I> ptr &operator-=(I i) { return *this = *this - i; }
    ptr &operator++() { return *this = *this + 1; }
    ptr &operator--() { return *this = *this - 1; }
    ptr operator++(int)
    {
        ptr t = *this;
        ++*this;
        return t;
    }
    ptr operator--(int)
    {
        ptr t = *this;
        --*this;
        return t;
    }
    template <class U> bool operator==(const ptr<U, S> &o) const { return (const void *)p == (const void *)o.p; }
    template <class U> bool operator!=(const ptr<U, S> &o) const { return (const void *)p != (const void *)o.p; }
    template <class U> bool operator<(const ptr<U, S> &o) const { return (const void *)p < (const void *)o.p; }
    template <class U> bool operator<=(const ptr<U, S> &o) const { return (const void *)p <= (const void *)o.p; }
    template <class U> bool operator>(const ptr<U, S> &o) const { return (const void *)p > (const void *)o.p; }
    template <class U> bool operator>=(const ptr<U, S> &o) const { return (const void *)p >= (const void *)o.p; }
};

template <class T> using device_ptr = ptr<T, 0>;
template <class T> using threadgroup_ptr = ptr<T, 1>;

template <class U, class T, int S> inline ptr<U, S> ptr_cast(const ptr<T, S> &a)
{
    return ptr<U, S>((U *)(void *)(uintptr_t)a.p, a.r);
}

template <class T> inline auto thread_args::buffer(int slot) const
{
    return device_ptr<T>((T *)(void *)regions[slot].base, &regions[slot]);
}

template <class T>
inline threadgroup_ptr<T> threadgroup_array(const void *tag, size_t count, const char *name,
                                            const char *file, unsigned line)
{
    const region *r = nullptr;
    T *p = (T *)threadgroup_alloc(tag, sizeof(T), alignof(T), count, name, file, line, &r);
    return threadgroup_ptr<T>(p, r);
}

/* NaN-propagating min/max: a NaN (poisoned memory) must surface, not vanish */
template <class E> inline E emax(E a, E b)
{
    if constexpr (is_fp<E>::value || is_same<E, bfloat>::value) {
        if (a != a) return a;
        if (b != b) return b;
    }
    return a < b ? b : a;
}
template <class E> inline E emin(E a, E b)
{
    if constexpr (is_fp<E>::value || is_same<E, bfloat>::value) {
        if (a != a) return a;
        if (b != b) return b;
    }
    return b < a ? b : a;
}

} /* namespace mfemu */

#define MFEMU_SITE const char *mfemu_file_ = __builtin_FILE(), unsigned mfemu_line_ = __builtin_LINE()

/* ------------------------------------------------------------------ metal namespace ---- */

namespace metal {

template <class T, int N> using vec = typename mfemu::vec_sel<T, N>::type;

/* --- math (scalars and vectors, elementwise; computed in float, rounded to the type) --- */

#define MFEMU_UNARY(name, expr)                                                                  \
    template <class T> inline T name(T x)                                                        \
    {                                                                                            \
        typedef typename mfemu::vt<T>::elem E;                                                   \
        T r = x;                                                                                 \
        for (int i = 0; i < mfemu::vt<T>::n; i++) {                                              \
            float v = (float)mfemu::el(x, i);                                                    \
            mfemu::set_el(r, i, (E)(expr));                                                      \
        }                                                                                        \
        return r;                                                                                \
    }
MFEMU_UNARY(exp, __builtin_expf(v))
MFEMU_UNARY(exp2, __builtin_exp2f(v))
MFEMU_UNARY(exp10, __builtin_powf(10.0f, v))
MFEMU_UNARY(log, __builtin_logf(v))
MFEMU_UNARY(log2, __builtin_log2f(v))
MFEMU_UNARY(log10, __builtin_log10f(v))
MFEMU_UNARY(tanh, __builtin_tanhf(v))
MFEMU_UNARY(sqrt, __builtin_sqrtf(v))
MFEMU_UNARY(rsqrt, 1.0f / __builtin_sqrtf(v))
MFEMU_UNARY(fabs, __builtin_fabsf(v))
MFEMU_UNARY(floor, __builtin_floorf(v))
MFEMU_UNARY(ceil, __builtin_ceilf(v))
MFEMU_UNARY(trunc, __builtin_truncf(v))
MFEMU_UNARY(round, __builtin_roundf(v))
MFEMU_UNARY(rint, __builtin_rintf(v))
MFEMU_UNARY(sin, __builtin_sinf(v))
MFEMU_UNARY(cos, __builtin_cosf(v))
MFEMU_UNARY(recip, 1.0f / v)
#undef MFEMU_UNARY

template <class T> inline T abs(T x)
{
    T r = x;
    for (int i = 0; i < mfemu::vt<T>::n; i++) {
        typename mfemu::vt<T>::elem e = mfemu::el(x, i);
        mfemu::set_el(r, i, e < 0 ? (typename mfemu::vt<T>::elem)(-e) : e);
    }
    return r;
}

template <class T> inline T fma(T a, T b, T c)
{
    T r = a;
    for (int i = 0; i < mfemu::vt<T>::n; i++)
        mfemu::set_el(r, i,
                      (typename mfemu::vt<T>::elem)__builtin_fmaf((float)mfemu::el(a, i),
                                                                  (float)mfemu::el(b, i),
                                                                  (float)mfemu::el(c, i)));
    return r;
}
template <class T> inline T pow(T a, T b)
{
    T r = a;
    for (int i = 0; i < mfemu::vt<T>::n; i++)
        mfemu::set_el(r, i,
                      (typename mfemu::vt<T>::elem)__builtin_powf((float)mfemu::el(a, i),
                                                                  (float)mfemu::el(b, i)));
    return r;
}
template <class T> inline T powr(T a, T b) { return pow(a, b); }
template <class T> inline T divide(T a, T b) { return a / b; }

template <class T> inline T max(T a, T b)
{
    T r = a;
    for (int i = 0; i < mfemu::vt<T>::n; i++) mfemu::set_el(r, i, mfemu::emax(mfemu::el(a, i), mfemu::el(b, i)));
    return r;
}
template <class T> inline T min(T a, T b)
{
    T r = a;
    for (int i = 0; i < mfemu::vt<T>::n; i++) mfemu::set_el(r, i, mfemu::emin(mfemu::el(a, i), mfemu::el(b, i)));
    return r;
}
template <class T> inline T fmax(T a, T b) { return max(a, b); }
template <class T> inline T fmin(T a, T b) { return min(a, b); }
template <class T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T> inline T mix(T x, T y, T a) { return x + (y - x) * a; }
template <class T> inline T saturate(T x) { return clamp(x, T(0), T(1)); }

/* select(a, b, c): c ? b : a, per component (c a bool, or a vector comparison result) */
template <class T, class C> inline T select(T a, T b, C c)
{
    T r = a;
    for (int i = 0; i < mfemu::vt<T>::n; i++)
        if (mfemu::el(c, i)) mfemu::set_el(r, i, mfemu::el(b, i));
    return r;
}

template <class U, class T> inline U as_type(const T &x)
{
    static_assert(sizeof(U) == sizeof(T), "as_type: sizes differ");
    return __builtin_bit_cast(U, x);
}

inline bool isnan(float x) { return x != x; }
inline bool isnan(half x) { return x != x; }
inline bool isnan(bfloat x) { return (float)x != (float)x; }
inline bool isinf(float x) { return __builtin_fabsf(x) == __builtin_inff(); }
inline bool isinf(half x) { return isinf((float)x); }
inline bool isinf(bfloat x) { return isinf((float)x); }
inline bool isfinite(float x) { return !isnan(x) && !isinf(x); }
inline bool isfinite(half x) { return isfinite((float)x); }
inline bool isfinite(bfloat x) { return isfinite((float)x); }
inline bool signbit(float x) { return __builtin_signbit(x); }

template <class T> inline typename mfemu::vt<T>::elem dot(T a, T b)
{
    typename mfemu::vt<T>::elem s = mfemu::el(a, 0) * mfemu::el(b, 0);
    for (int i = 1; i < mfemu::vt<T>::n; i++) s = s + mfemu::el(a, i) * mfemu::el(b, i);
    return s;
}

template <class T> inline bool all(T c)
{
    for (int i = 0; i < mfemu::vt<T>::n; i++)
        if (!mfemu::el(c, i)) return false;
    return true;
}
template <class T> inline bool any(T c)
{
    for (int i = 0; i < mfemu::vt<T>::n; i++)
        if (mfemu::el(c, i)) return true;
    return false;
}

namespace fast {
using metal::abs;
using metal::clamp;
using metal::cos;
using metal::exp;
using metal::exp10;
using metal::exp2;
using metal::fabs;
using metal::floor;
using metal::fma;
using metal::fmax;
using metal::fmin;
using metal::log;
using metal::log2;
using metal::max;
using metal::min;
using metal::pow;
using metal::powr;
using metal::rsqrt;
using metal::sin;
using metal::sqrt;
using metal::tanh;
using metal::recip;
using metal::divide;
} /* namespace fast */
namespace precise {
using namespace metal::fast;
} /* namespace precise */

template <class T> struct numeric_limits;
template <> struct numeric_limits<float> {
    static constexpr bool is_specialized = true;
    static float infinity() { return __builtin_inff(); }
    static float quiet_NaN() { return __builtin_nanf(""); }
    static float max() { return 3.40282347e+38f; }
    static float lowest() { return -3.40282347e+38f; }
    static float min() { return 1.17549435e-38f; }
    static float epsilon() { return 1.19209290e-7f; }
};
template <> struct numeric_limits<half> {
    static constexpr bool is_specialized = true;
    static half infinity() { return (half)__builtin_inff(); }
    static half quiet_NaN() { return (half)__builtin_nanf(""); }
    static half max() { return (half)65504.0f; }
    static half lowest() { return (half)-65504.0f; }
    static half min() { return (half)6.10351562e-5f; }
    static half epsilon() { return (half)9.765625e-4f; }
};
template <> struct numeric_limits<bfloat> {
    static constexpr bool is_specialized = true;
    static bfloat infinity() { return bfloat::from_bits(0x7f80); }
    static bfloat quiet_NaN() { return bfloat::from_bits(0x7fc0); }
    static bfloat max() { return bfloat::from_bits(0x7f7f); }
    static bfloat lowest() { return bfloat::from_bits(0xff7f); }
    static bfloat min() { return bfloat::from_bits(0x0080); }
    static bfloat epsilon() { return bfloat::from_bits(0x3c00); }
};
template <> struct numeric_limits<int> {
    static constexpr bool is_specialized = true;
    static int max() { return 2147483647; }
    static int lowest() { return -2147483647 - 1; }
    static int min() { return -2147483647 - 1; }
};
template <> struct numeric_limits<uint> {
    static constexpr bool is_specialized = true;
    static uint max() { return 4294967295u; }
    static uint lowest() { return 0u; }
    static uint min() { return 0u; }
};

/* --- barriers --- */

enum class mem_flags : unsigned {
    mem_none = 0,
    mem_device = 1,
    mem_threadgroup = 2,
    mem_texture = 4,
    mem_threadgroup_imageblock = 8,
    mem_object_data = 16
};
inline mem_flags operator|(mem_flags a, mem_flags b) { return (mem_flags)((unsigned)a | (unsigned)b); }

inline void threadgroup_barrier(mem_flags, MFEMU_SITE)
{
    mfemu::sync_threadgroup("threadgroup_barrier", mfemu_file_, mfemu_line_);
}
inline void simdgroup_barrier(mem_flags, MFEMU_SITE)
{
    mfemu::sync_simd("simdgroup_barrier", mfemu_file_, mfemu_line_, nullptr, nullptr);
}

} /* namespace metal */

/* ------------------------------------------------------------------ simd functions ---- */

namespace mfemu {

template <class T> struct lane_io {
    T in;
    T out;
    uint arg; /* shuffle source / delta / mask, per lane */
};

enum { OP_SUM, OP_MAX, OP_MIN, OP_PREFIX_EX, OP_PREFIX_IN, OP_SHUFFLE, OP_XOR, OP_DOWN, OP_UP,
       OP_BROADCAST, OP_FIRST, OP_ALL, OP_ANY };

void fail_lane(const char *op, int lane, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

template <class T> inline T combine_two(int op, T a, T b)
{
    if (op == OP_SUM) return a + b;
    T r = a;
    for (int i = 0; i < vt<T>::n; i++)
        set_el(r, i, op == OP_MAX ? emax(el(a, i), el(b, i)) : emin(el(a, i), el(b, i)));
    return r;
}

template <class T, int OP> void combine(void *const *d, int n)
{
    lane_io<T> *L[32];
    for (int i = 0; i < n; i++) L[i] = (lane_io<T> *)d[i];
    if constexpr (OP == OP_SUM || OP == OP_MAX || OP == OP_MIN) {
        /* pairwise tree over the 32 lane slots (missing lanes of a partial simdgroup skipped) */
        T v[32];
        bool has[32];
        for (int i = 0; i < 32; i++) {
            has[i] = i < n;
            if (i < n) v[i] = L[i]->in;
        }
        for (int s = 1; s < 32; s *= 2)
            for (int i = 0; i + s < 32; i += 2 * s) {
                if (has[i] && has[i + s]) v[i] = combine_two<T>(OP, v[i], v[i + s]);
                else if (has[i + s]) {
                    v[i] = v[i + s];
                    has[i] = true;
                }
            }
        for (int i = 0; i < n; i++) L[i]->out = v[0];
    } else if constexpr (OP == OP_PREFIX_EX || OP == OP_PREFIX_IN) {
        T acc{};
        for (int i = 0; i < n; i++) {
            T x = L[i]->in;
            if (OP == OP_PREFIX_IN) {
                acc = i ? acc + x : x;
                L[i]->out = acc;
            } else {
                L[i]->out = acc;
                acc = i ? acc + x : x;
            }
        }
    } else if constexpr (OP == OP_ALL || OP == OP_ANY) {
        bool r = OP == OP_ALL;
        for (int i = 0; i < n; i++) r = OP == OP_ALL ? (r && L[i]->in) : (r || L[i]->in);
        for (int i = 0; i < n; i++) L[i]->out = r;
    } else {
        const char *name = OP == OP_SHUFFLE ? "simd_shuffle"
                           : OP == OP_XOR   ? "simd_shuffle_xor"
                           : OP == OP_DOWN  ? "simd_shuffle_down"
                           : OP == OP_UP    ? "simd_shuffle_up"
                           : OP == OP_BROADCAST ? "simd_broadcast"
                                                : "simd_broadcast_first";
        for (int i = 0; i < n; i++) {
            uint a = L[i]->arg;
            int src;
            if (OP == OP_SHUFFLE || OP == OP_BROADCAST) src = (int)a;
            else if (OP == OP_XOR) src = (int)(i ^ a);
            else if (OP == OP_DOWN) src = (i + a < 32) ? (int)(i + a) : i;
            else if (OP == OP_UP) src = (a <= (uint)i) ? (int)(i - a) : i;
            else src = 0;
            if (OP == OP_BROADCAST && a != L[0]->arg)
                fail_lane(name, i, "lane %d broadcasts from lane %u but lane 0 from lane %u (the lane "
                          "must be the same for the whole simdgroup)", i, a, L[0]->arg);
            if (src < 0 || src >= n)
                fail_lane(name, i, "lane %d reads lane %d, which %s", i, src,
                          src >= 32 ? "is outside the simdgroup (32 lanes)"
                                    : "does not exist in this partial simdgroup");
        }
        T tmp[32];
        for (int i = 0; i < n; i++) tmp[i] = L[i]->in;
        for (int i = 0; i < n; i++) {
            uint a = L[i]->arg;
            int src = OP == OP_SHUFFLE || OP == OP_BROADCAST ? (int)a
                      : OP == OP_XOR                         ? (int)(i ^ a)
                      : OP == OP_DOWN                        ? ((i + a < 32) ? (int)(i + a) : i)
                      : OP == OP_UP                          ? ((a <= (uint)i) ? (int)(i - a) : i)
                                                             : 0;
            L[i]->out = tmp[src];
        }
    }
}

template <class T, int OP, class R = T>
inline R simd_op(const char *name, T x, uint arg, const char *file, unsigned line)
{
    lane_io<T> io;
    io.in = x;
    io.out = x;
    io.arg = arg;
    sync_simd(name, file, line, &io, &combine<T, OP>);
    return (R)io.out;
}

} /* namespace mfemu */

namespace metal {

template <class T> inline T simd_sum(T x, MFEMU_SITE)
{
    return mfemu::simd_op<T, mfemu::OP_SUM>("simd_sum", x, 0, mfemu_file_, mfemu_line_);
}
template <class T> inline T simd_max(T x, MFEMU_SITE)
{
    return mfemu::simd_op<T, mfemu::OP_MAX>("simd_max", x, 0, mfemu_file_, mfemu_line_);
}
template <class T> inline T simd_min(T x, MFEMU_SITE)
{
    return mfemu::simd_op<T, mfemu::OP_MIN>("simd_min", x, 0, mfemu_file_, mfemu_line_);
}
template <class T> inline T simd_prefix_exclusive_sum(T x, MFEMU_SITE)
{
    return mfemu::simd_op<T, mfemu::OP_PREFIX_EX>("simd_prefix_exclusive_sum", x, 0, mfemu_file_,
                                                  mfemu_line_);
}
template <class T> inline T simd_prefix_inclusive_sum(T x, MFEMU_SITE)
{
    return mfemu::simd_op<T, mfemu::OP_PREFIX_IN>("simd_prefix_inclusive_sum", x, 0, mfemu_file_,
                                                  mfemu_line_);
}
template <class T> inline T simd_shuffle(T x, ushort src_lane, MFEMU_SITE)
{
    return mfemu::simd_op<T, mfemu::OP_SHUFFLE>("simd_shuffle", x, src_lane, mfemu_file_, mfemu_line_);
}
template <class T> inline T simd_shuffle_xor(T x, ushort mask, MFEMU_SITE)
{
    return mfemu::simd_op<T, mfemu::OP_XOR>("simd_shuffle_xor", x, mask, mfemu_file_, mfemu_line_);
}
template <class T> inline T simd_shuffle_down(T x, ushort delta, MFEMU_SITE)
{
    return mfemu::simd_op<T, mfemu::OP_DOWN>("simd_shuffle_down", x, delta, mfemu_file_, mfemu_line_);
}
template <class T> inline T simd_shuffle_up(T x, ushort delta, MFEMU_SITE)
{
    return mfemu::simd_op<T, mfemu::OP_UP>("simd_shuffle_up", x, delta, mfemu_file_, mfemu_line_);
}
template <class T> inline T simd_broadcast(T x, ushort lane, MFEMU_SITE)
{
    return mfemu::simd_op<T, mfemu::OP_BROADCAST>("simd_broadcast", x, lane, mfemu_file_, mfemu_line_);
}
template <class T> inline T simd_broadcast_first(T x, MFEMU_SITE)
{
    return mfemu::simd_op<T, mfemu::OP_FIRST>("simd_broadcast_first", x, 0, mfemu_file_, mfemu_line_);
}
inline bool simd_all(bool c, MFEMU_SITE)
{
    return mfemu::simd_op<bool, mfemu::OP_ALL>("simd_all", c, 0, mfemu_file_, mfemu_line_);
}
inline bool simd_any(bool c, MFEMU_SITE)
{
    return mfemu::simd_op<bool, mfemu::OP_ANY>("simd_any", c, 0, mfemu_file_, mfemu_line_);
}
/* every lane of a simdgroup is active under the dual-compile rules, so the first is lane 0 */
inline bool simd_is_first() { return mfemu::current_lane() == 0; }

/* ------------------------------------------------------------------ simdgroup_matrix ---- */

template <class T, int Cols, int Rows> struct simdgroup_matrix {
    static_assert(Cols == 8 && Rows == 8, "the emulator (and the simdgroup tier) use 8x8 matrices only");
    vec<T, 2> e;

    /* uninitialised on the GPU: NaN here, so a use before the first write shows */
    simdgroup_matrix() { poison(); }
    /* diagonal matrix with `d` on the diagonal */
    explicit simdgroup_matrix(T d)
    {
        uint l = mfemu::current_lane();
        int row = (int)((l >> 4) * 4 + ((l >> 1) & 3)), col = (int)(((l >> 3) & 1) * 4 + (l & 1) * 2);
        for (int i = 0; i < 2; i++) mfemu::set_el(e, i, row == col + i ? d : T(0));
    }
    vec<T, 2> &thread_elements() { return e; }
    const vec<T, 2> &thread_elements() const { return e; }

  private:
    void poison()
    {
        for (int i = 0; i < 2; i++) mfemu::set_el(e, i, (T)__builtin_nanf(""));
    }
};

typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int C, int R> inline simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T v)
{
    simdgroup_matrix<T, C, R> m;
    mfemu::set_el(m.e, 0, v);
    mfemu::set_el(m.e, 1, v);
    return m;
}

} /* namespace metal */

namespace mfemu {
inline int sgm_row(uint l) { return (int)((l >> 4) * 4 + ((l >> 1) & 3)); }
inline int sgm_col(uint l) { return (int)(((l >> 3) & 1) * 4 + (l & 1) * 2); }

template <class TD, class TA, class TB, class TC> struct mma_io {
    typename vec_sel<TD, 2>::type *d;
    const typename vec_sel<TA, 2>::type *a;
    const typename vec_sel<TB, 2>::type *b;
    const typename vec_sel<TC, 2>::type *c; /* null: multiply only */
};

template <class TD, class TA, class TB, class TC> void combine_mma(void *const *d, int n)
{
    if (n != 32) fail("simdgroup_multiply_accumulate needs a full simdgroup of 32 lanes (this one has %d)", n);
    float A[8][8], B[8][8], C[8][8];
    for (int l = 0; l < 32; l++) {
        const mma_io<TD, TA, TB, TC> *io = (const mma_io<TD, TA, TB, TC> *)d[l];
        int r = sgm_row((uint)l), c0 = sgm_col((uint)l);
        for (int i = 0; i < 2; i++) {
            A[r][c0 + i] = (float)el(*io->a, i);
            B[r][c0 + i] = (float)el(*io->b, i);
            C[r][c0 + i] = io->c ? (float)el(*io->c, i) : 0.0f;
        }
    }
    float D[8][8];
    for (int r = 0; r < 8; r++)
        for (int c = 0; c < 8; c++) {
            float s = C[r][c];
            for (int k = 0; k < 8; k++) s = __builtin_fmaf(A[r][k], B[k][c], s);
            D[r][c] = s;
        }
    for (int l = 0; l < 32; l++) {
        const mma_io<TD, TA, TB, TC> *io = (const mma_io<TD, TA, TB, TC> *)d[l];
        int r = sgm_row((uint)l), c0 = sgm_col((uint)l);
        for (int i = 0; i < 2; i++) set_el(*io->d, i, (TD)D[r][c0 + i]);
    }
}
} /* namespace mfemu */

namespace metal {

template <class TD, class TA, class TB, class TC>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8> &d, const simdgroup_matrix<TA, 8, 8> &a,
                                          const simdgroup_matrix<TB, 8, 8> &b,
                                          const simdgroup_matrix<TC, 8, 8> &c, MFEMU_SITE)
{
    mfemu::mma_io<TD, TA, TB, TC> io;
    vec<TD, 2> out = d.e;
    io.d = &out;
    io.a = &a.e;
    io.b = &b.e;
    io.c = &c.e;
    mfemu::sync_simd("simdgroup_multiply_accumulate", mfemu_file_, mfemu_line_, &io,
                     &mfemu::combine_mma<TD, TA, TB, TC>);
    d.e = out;
}
template <class TD, class TA, class TB>
inline void simdgroup_multiply(simdgroup_matrix<TD, 8, 8> &d, const simdgroup_matrix<TA, 8, 8> &a,
                               const simdgroup_matrix<TB, 8, 8> &b, MFEMU_SITE)
{
    mfemu::mma_io<TD, TA, TB, TD> io;
    vec<TD, 2> out = d.e;
    io.d = &out;
    io.a = &a.e;
    io.b = &b.e;
    io.c = nullptr;
    mfemu::sync_simd("simdgroup_multiply", mfemu_file_, mfemu_line_, &io, &mfemu::combine_mma<TD, TA, TB, TD>);
    d.e = out;
}

/* load/store: no rendezvous, each lane moves its own two elements (layout of metal.md §5).
 * Element (r, c) of the matrix is src[(origin.y + r) * elements_per_row + origin.x + c], or
 * with transpose_matrix src[(origin.x + c) * elements_per_row + origin.y + r]. */
template <class T, class P, int S>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8> &d, mfemu::ptr<P, S> src, ulong elements_per_row = 8,
                           ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false)
{
    static_assert(mfemu::is_same<typename mfemu::remove_const<P>::type, T>::value,
                  "simdgroup_load: the source element type must be the matrix element type");
    uint l = mfemu::current_lane();
    int r = mfemu::sgm_row(l), c0 = mfemu::sgm_col(l);
    for (int i = 0; i < 2; i++) {
        ulong c = (ulong)(c0 + i);
        ulong idx = transpose_matrix ? (matrix_origin.x + c) * elements_per_row + matrix_origin.y + (ulong)r
                                     : (matrix_origin.y + (ulong)r) * elements_per_row + matrix_origin.x + c;
        mfemu::set_el(d.e, i, src[(intptr_t)idx]);
    }
}
template <class T, class P, int S>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8> &a, mfemu::ptr<P, S> dst, ulong elements_per_row = 8,
                            ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false)
{
    static_assert(mfemu::is_same<P, T>::value,
                  "simdgroup_store: the destination element type must be the matrix element type");
    uint l = mfemu::current_lane();
    int r = mfemu::sgm_row(l), c0 = mfemu::sgm_col(l);
    for (int i = 0; i < 2; i++) {
        ulong c = (ulong)(c0 + i);
        ulong idx = transpose_matrix ? (matrix_origin.x + c) * elements_per_row + matrix_origin.y + (ulong)r
                                     : (matrix_origin.y + (ulong)r) * elements_per_row + matrix_origin.x + c;
        dst[(intptr_t)idx] = mfemu::el(a.e, i);
    }
}

} /* namespace metal */

/* ------------------------------------------------------------------ constants ---- */

#define INFINITY __builtin_inff()
#define HUGE_VALF __builtin_huge_valf()
#define NAN __builtin_nanf("")
#define MAXFLOAT 3.40282347e+38f
#define FLT_MAX 3.40282347e+38f
#define FLT_MIN 1.17549435e-38f
#define HALF_MAX ((half)65504.0f)
#define M_LOG2E_F 1.44269504f
#define M_LN2_F 0.693147181f
#define M_LN10_F 2.30258509f
#define M_PI_F 3.14159265f
#define M_SQRT2_F 1.41421356f
#define METAL_FUNC inline

/* ------------------------------------------------------------------ address spaces ---- */
/* Defined last, after every system header (the runtime includes this file without them). */
#ifndef MFEMU_RUNTIME
#define device
#define constant const
#define threadgroup
#define thread
#endif

#endif /* MFEMU_H */
