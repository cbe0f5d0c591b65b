/* convert.h - scalar fp16/bf16 <-> fp32 conversions (round to nearest even, NaN kept). */
#ifndef MF_CONVERT_H
#define MF_CONVERT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float mf_f32_from_bits(uint32_t b) {
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint32_t mf_bits_from_f32(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}

static inline float mf_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        float f = (float)m * 5.9604644775390625e-8f; /* subnormal: m * 2^-24 */
        return sign ? -f : f;
    }
    if (e == 31) return mf_f32_from_bits(sign | 0x7f800000u | (m << 13));
    return mf_f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

static inline uint16_t mf_float_to_half(float f) {
    uint32_t x = mf_bits_from_f32(f);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to infinity */
    if (ax < 0x38800000u) {                                    /* below 2^-14: subnormal */
        float a = mf_f32_from_bits(ax) * 16777216.0f;          /* exact: units of 2^-24 */
        return (uint16_t)(sign | (uint32_t)lrintf(a));          /* 1024 encodes 2^-14 */
    }
    uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

static inline float mf_bf16_to_float(uint16_t h) { return mf_f32_from_bits((uint32_t)h << 16); }

static inline uint16_t mf_float_to_bf16(float f) {
    uint32_t x = mf_bits_from_f32(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

#endif /* MF_CONVERT_H */
