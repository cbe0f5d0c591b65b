/* philox.h - the dropout mask: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
 * 1, 2, 3", SC 2011), a counter-based generator, so every element's draw depends only on where it
 * is, never on which thread computes it or in which order.
 *
 * Element (sequence b, query head h, row i of the sequence, key j of the sequence):
 *   key     = (seed & 0xffffffff, seed >> 32)
 *   counter = (j, i, b + (offset >> 32), h + (offset & 0xffffffff))   (32-bit wrap-around)
 *   draw    = word 0 of philox4x32_10(counter, key)
 * kept iff draw >= threshold (= floor(p * 2^32)); a kept probability is scaled by 1 / (1 - p).
 * mtlflash/reference.py implements the same function in torch (the oracle). */
#ifndef MF_PHILOX_H
#define MF_PHILOX_H

#include <stdint.h>

#include "problem.h"

static inline uint32_t mf_philox_word0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                       uint32_t k1) {
    for (int r = 0; r < 10; r++) {
        if (r > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    return c0;
}

/* Multiplies a tile stored transposed, x[r * ld + c] (key j0 + r, column c), by the dropout mask
 * (0 where dropped, `kept` where kept); column c is query head h0 + c / m, row i0 + c % m of
 * sequence b. Columns >= cols are left alone. */
static inline void mf_dropout_tile(const mf_dropout *d, float *x, int n, int ld, int cols, int64_t j0, int b,
                                   int h0, int m, int64_t i0, float kept) {
    const uint32_t k0 = (uint32_t)d->seed, k1 = (uint32_t)(d->seed >> 32);
    const uint32_t cb = (uint32_t)b + (uint32_t)(d->offset >> 32), ch = (uint32_t)d->offset;
    for (int c = 0; c < cols; c++) {
        const uint32_t h = (uint32_t)(h0 + c / m) + ch, i = (uint32_t)(i0 + c % m);
        for (int r = 0; r < n; r++) {
            float *e = x + (int64_t)r * ld + c;
            const uint32_t u = mf_philox_word0((uint32_t)(j0 + r), i, cb, h, k0, k1);
            *e = (!d->drop_all && u >= d->threshold) ? *e * kept : 0.0f;
        }
    }
}

#endif /* MF_PHILOX_H */
