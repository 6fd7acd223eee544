/*
 * Shamir secret sharing over GF(2^8), byte-wise: secret byte i is the
 * constant term of a random polynomial f_i of degree k-1, and share x holds
 * f_i(x) for every i. Any k shares give f_i(0) by Lagrange interpolation;
 * k-1 shares say nothing about it.
 *
 * Secret bytes and coefficients only ever meet kms_gf256_mul/xor, which are
 * constant time. Share indices are public and may drive branches.
 */
#include "kms_crypto.h"

#include <string.h>

#include <openssl/crypto.h>

int kms_shamir_split(const uint8_t *secret, size_t len, unsigned n, unsigned k,
                     bool allow_dev_1of1, struct kms_share *out, struct kms_err *err)
{
    uint8_t *coef = NULL; /* (k-1) * len random bytes, secure memory, owned here */
    size_t coeflen = 0;
    int rc;

    if (secret == NULL || out == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "shamir split: invalid argument");
        goto out;
    }
    if (len < KMS_SHAMIR_MIN_SECRET || len > KMS_SHAMIR_MAX_SECRET) {
        rc = kms_err_set(err, KMS_EINVAL, "shamir split: secret must be %d..%d bytes, not %zu",
                         KMS_SHAMIR_MIN_SECRET, KMS_SHAMIR_MAX_SECRET, len);
        goto out;
    }
    if (k == 1 && n == 1) {
        if (!allow_dev_1of1) {
            rc = kms_err_set(err, KMS_EINVAL,
                             "shamir split: 1-of-1 is for development only");
            goto out;
        }
    } else if (k < 2 || n < k || n > KMS_SHAMIR_MAX_SHARES) {
        rc = kms_err_set(err, KMS_EINVAL,
                         "shamir split: need 2 <= threshold <= shares <= %d (got %u of %u)",
                         KMS_SHAMIR_MAX_SHARES, k, n);
        goto out;
    }
    coeflen = (size_t)(k - 1) * len;
    if (coeflen > 0) {
        coef = kms_secmem_alloc(coeflen);
        if (coef == NULL) {
            rc = kms_err_set(err, KMS_ENOMEM, "shamir split: out of secure memory");
            goto out;
        }
        if ((rc = kms_rand_bytes(coef, coeflen, err)) != 0) {
            kms_err_wrap(err, rc, "shamir split");
            goto out;
        }
    }
    for (unsigned s = 0; s < n; s++) {
        uint8_t x = (uint8_t)(s + 1);
        out[s].index = x;
        out[s].len = (uint8_t)len;
        memset(out[s].y, 0, sizeof(out[s].y));
        for (size_t i = 0; i < len; i++) {
            /* Horner: f(x) = (((c_{k-1} x + c_{k-2}) x + ...) x + secret). */
            uint8_t y = 0;
            for (unsigned j = k - 1; j >= 1; j--) {
                y = kms_gf256_mul(y, x) ^ coef[(size_t)(j - 1) * len + i];
            }
            out[s].y[i] = kms_gf256_mul(y, x) ^ secret[i];
        }
    }
    rc = 0;
out:
    kms_secmem_free(coef, coeflen);
    return rc;
}

int kms_shamir_combine(const struct kms_share *shares, size_t count, unsigned k,
                       uint8_t *secret, size_t *len, struct kms_err *err)
{
    uint8_t basis[KMS_SHAMIR_MAX_SHARES]; /* Lagrange basis at 0; public */
    uint8_t acc[KMS_SHAMIR_MAX_SECRET];   /* secret being rebuilt; wiped */
    size_t slen;
    int rc;

    memset(acc, 0, sizeof(acc));
    if (shares == NULL || secret == NULL || len == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "shamir combine: invalid argument");
        goto out;
    }
    if (k == 0 || k > KMS_SHAMIR_MAX_SHARES) {
        rc = kms_err_set(err, KMS_EINVAL, "shamir combine: invalid threshold %u", k);
        goto out;
    }
    for (size_t i = 0; i < count; i++) {
        if (shares[i].index == 0) {
            rc = kms_err_set(err, KMS_EFORMAT, "share %zu: index 0 is not a valid share", i + 1);
            goto out;
        }
        if (shares[i].len < KMS_SHAMIR_MIN_SECRET || shares[i].len > KMS_SHAMIR_MAX_SECRET) {
            rc = kms_err_set(err, KMS_EFORMAT, "share %zu: invalid length %u", i + 1,
                             shares[i].len);
            goto out;
        }
        if (shares[i].len != shares[0].len) {
            rc = kms_err_set(err, KMS_EFORMAT,
                             "share %zu: %u-byte share mixed with %u-byte shares", i + 1,
                             shares[i].len, shares[0].len);
            goto out;
        }
        for (size_t j = 0; j < i; j++) {
            if (shares[j].index == shares[i].index) {
                rc = kms_err_set(err, KMS_EDUP, "share %zu: duplicate index %u (as share %zu)",
                                 i + 1, shares[i].index, j + 1);
                goto out;
            }
        }
    }
    if (count < k) {
        rc = kms_err_set(err, KMS_ETOOFEW, "need %u shares, got %zu", k, count);
        goto out;
    }
    slen = shares[0].len;
    /* l_i(0) = prod_{j != i} x_j / (x_j - x_i); subtraction is xor. Indices
     * are distinct, so no denominator is zero. */
    for (unsigned i = 0; i < k; i++) {
        uint8_t num = 1, den = 1;
        for (unsigned j = 0; j < k; j++) {
            if (j != i) {
                num = kms_gf256_mul(num, shares[j].index);
                den = kms_gf256_mul(den, shares[j].index ^ shares[i].index);
            }
        }
        basis[i] = kms_gf256_mul(num, kms_gf256_inv(den));
    }
    for (unsigned i = 0; i < k; i++) {
        for (size_t b = 0; b < slen; b++) {
            acc[b] ^= kms_gf256_mul(basis[i], shares[i].y[b]);
        }
    }
    memcpy(secret, acc, slen);
    *len = slen;
    rc = 0;
out:
    OPENSSL_cleanse(acc, sizeof(acc));
    return rc;
}
