/*
 * GF(2^8) with the AES polynomial x^8 + x^4 + x^3 + x + 1 (0x11b).
 *
 * Constant time: no branches and no memory accesses that depend on the
 * operands. Shamir evaluates polynomials over secret bytes, and log/exp
 * tables indexed by secrets would leak them through the cache.
 */
#include "kms_crypto.h"

uint8_t kms_gf256_mul(uint8_t a, uint8_t b)
{
    unsigned r = 0;
    unsigned x = a;
    unsigned y = b;

    for (int i = 0; i < 8; i++) {
        /* mask = 0xff when the low bit of y is set, else 0. */
        unsigned mask = 0u - (y & 1u);
        r ^= x & mask;
        y >>= 1;
        /* Multiply x by the generator: shift, reduce by 0x1b when the bit
         * shifted out was set. */
        unsigned hi = 0u - ((x >> 7) & 1u);
        x = ((x << 1) ^ (hi & 0x1bu)) & 0xffu;
    }
    return (uint8_t)(r & 0xffu);
}

uint8_t kms_gf256_inv(uint8_t a)
{
    /* a^254 = a^-1 for a != 0 (the multiplicative group has order 255), and
     * 0^254 = 0. 254 = 2 + 4 + 8 + 16 + 32 + 64 + 128: a fixed chain of 7
     * squarings and 6 multiplications. */
    uint8_t sq = kms_gf256_mul(a, a); /* a^2 */
    uint8_t r = sq;

    for (int i = 0; i < 6; i++) {
        sq = kms_gf256_mul(sq, sq); /* a^4, a^8, ..., a^128 */
        r = kms_gf256_mul(r, sq);
    }
    return r;
}
