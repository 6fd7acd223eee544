/*
 * Share text and constant-time hex.
 *
 *   kms1-002-<2*len hex digits>-<8 hex digits>
 *
 * The index is 3 decimal digits (operators read "share 002"), the checksum is
 * the first 4 bytes of SHA-256(0x01 || index || payload) so that a mistyped
 * share is refused before it is combined (a wrong share would otherwise only
 * show up as "wrong root key" after k shares were entered). The payload is
 * secret: it is hex encoded and decoded without branches or table lookups
 * on its value.
 */
#include "kms_crypto.h"

#include <stdio.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define SHARE_VERSION 1
#define SHARE_PREFIX "kms1-"
#define SHARE_PREFIX_LEN 5
#define SHARE_INDEX_DIGITS 3
#define SHARE_CHECKSUM_LEN 4

int kms_hex_encode_ct(const uint8_t *in, size_t len, char *out, size_t outlen,
                      struct kms_err *err)
{
    if ((in == NULL && len > 0) || out == NULL || len > (SIZE_MAX - 1) / 2 ||
        outlen < 2 * len + 1) {
        return kms_err_set(err, KMS_EINVAL, "hex encode: output buffer too small");
    }
    for (size_t i = 0; i < len; i++) {
        for (int h = 0; h < 2; h++) {
            unsigned n = h == 0 ? (unsigned)in[i] >> 4 : (unsigned)in[i] & 0xfu;
            /* n < 10: '0' + n; else 'a' + n - 10 = '0' + n + 39. The mask is
             * all ones exactly when 9 - n wraps (n >= 10). */
            unsigned ge10 = (9u - n) >> 8 & 0xffu;
            out[2 * i + (size_t)h] = (char)('0' + n + (ge10 & 39u));
        }
    }
    out[2 * len] = '\0';
    return 0;
}

/* Decodes one hex digit without branching on it; *bad |= 0xff when c is not
 * a hex digit. */
static unsigned hex_digit_ct(unsigned char ch, unsigned *bad)
{
    unsigned c = ch;
    unsigned num = c ^ 0x30u;                          /* '0'..'9' -> 0..9 */
    unsigned num_ok = ((num - 10u) >> 8) & 0xffu;      /* 0xff if num < 10 */
    unsigned alpha = (c & ~0x20u) - 55u;               /* 'A'..'F'/'a'..'f' -> 10..15 */
    unsigned alpha_ok = (((alpha - 10u) ^ (alpha - 16u)) >> 8) & 0xffu; /* 10 <= alpha < 16 */

    *bad |= ~(num_ok | alpha_ok) & 0xffu;
    return ((num_ok & num) | (alpha_ok & alpha)) & 0xfu;
}

int kms_hex_decode_ct(const char *hex, size_t hexlen, uint8_t *out, size_t outlen,
                      size_t *outlen_written, struct kms_err *err)
{
    unsigned bad = 0;

    if ((hex == NULL && hexlen > 0) || (out == NULL && hexlen > 0)) {
        return kms_err_set(err, KMS_EINVAL, "hex decode: invalid argument");
    }
    if (hexlen % 2 != 0) {
        return kms_err_set(err, KMS_EFORMAT, "odd number of hex digits");
    }
    if (outlen < hexlen / 2) {
        return kms_err_set(err, KMS_EINVAL, "hex decode: output buffer too small");
    }
    for (size_t i = 0; i < hexlen / 2; i++) {
        unsigned hi = hex_digit_ct((unsigned char)hex[2 * i], &bad);
        unsigned lo = hex_digit_ct((unsigned char)hex[2 * i + 1], &bad);
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    /* Only whether the whole string was valid is revealed, never where. */
    if (bad != 0) {
        OPENSSL_cleanse(out, hexlen / 2);
        return kms_err_set(err, KMS_EFORMAT, "invalid hex digit");
    }
    if (outlen_written != NULL) {
        *outlen_written = hexlen / 2;
    }
    return 0;
}

/* First 4 bytes of SHA-256(version || index || payload). */
static int share_checksum(uint8_t index, const uint8_t *payload, size_t len,
                          uint8_t sum[SHARE_CHECKSUM_LEN], struct kms_err *err)
{
    EVP_MD_CTX *md = NULL;
    uint8_t head[2] = {SHARE_VERSION, index};
    uint8_t digest[EVP_MAX_MD_SIZE];
    unsigned dlen = 0;
    int rc;

    md = EVP_MD_CTX_new();
    if (md == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "share checksum: out of memory");
        goto out;
    }
    if (EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1 ||
        EVP_DigestUpdate(md, head, sizeof(head)) != 1 ||
        EVP_DigestUpdate(md, payload, len) != 1 || EVP_DigestFinal_ex(md, digest, &dlen) != 1 ||
        dlen < SHARE_CHECKSUM_LEN) {
        rc = kms_err_set(err, KMS_ECRYPTO, "share checksum: SHA-256 failed");
        goto out;
    }
    memcpy(sum, digest, SHARE_CHECKSUM_LEN);
    rc = 0;
out:
    /* The digest of a secret is itself sensitive-ish: wipe it. */
    OPENSSL_cleanse(digest, sizeof(digest));
    EVP_MD_CTX_free(md);
    return rc;
}

int kms_share_format(const struct kms_share *s, char *out, size_t outlen, struct kms_err *err)
{
    uint8_t sum[SHARE_CHECKSUM_LEN];
    size_t need, pos;
    int rc;

    if (s == NULL || out == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "share format: invalid argument");
        goto out;
    }
    if (s->index == 0 || s->len < KMS_SHAMIR_MIN_SECRET || s->len > KMS_SHAMIR_MAX_SECRET) {
        rc = kms_err_set(err, KMS_EINVAL, "share format: invalid share (index %u, length %u)",
                         s->index, s->len);
        goto out;
    }
    need = SHARE_PREFIX_LEN + SHARE_INDEX_DIGITS + 1 + 2 * (size_t)s->len + 1 +
           2 * SHARE_CHECKSUM_LEN + 1;
    if (outlen < need) {
        rc = kms_err_set(err, KMS_EINVAL, "share format: buffer of %zu bytes, need %zu", outlen,
                         need);
        goto out;
    }
    if ((rc = share_checksum(s->index, s->y, s->len, sum, err)) != 0) {
        goto out;
    }
    /* The index is public: snprintf is fine for it. */
    pos = (size_t)snprintf(out, outlen, SHARE_PREFIX "%03u-", (unsigned)s->index);
    if ((rc = kms_hex_encode_ct(s->y, s->len, out + pos, outlen - pos, err)) != 0) {
        goto out;
    }
    pos += 2 * (size_t)s->len;
    out[pos++] = '-';
    if ((rc = kms_hex_encode_ct(sum, sizeof(sum), out + pos, outlen - pos, err)) != 0) {
        goto out;
    }
    rc = 0;
out:
    if (rc != 0 && out != NULL && outlen > 0) {
        OPENSSL_cleanse(out, outlen);
        out[0] = '\0';
    }
    return rc;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static char lower(char c)
{
    return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

int kms_share_parse(const char *text, struct kms_share *out, struct kms_err *err)
{
    const char *p, *end, *payload, *dash;
    uint8_t sum[SHARE_CHECKSUM_LEN], want[SHARE_CHECKSUM_LEN];
    size_t plen, n = 0;
    unsigned index = 0;
    int rc;

    if (text == NULL || out == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "share parse: invalid argument");
        goto out;
    }
    memset(out, 0, sizeof(*out));
    p = text;
    end = text + strlen(text);
    while (p < end && is_space(*p)) {
        p++;
    }
    while (end > p && is_space(end[-1])) {
        end--;
    }
    /* "kms" + version digit + '-'. */
    if (end - p < SHARE_PREFIX_LEN || lower(p[0]) != 'k' || lower(p[1]) != 'm' ||
        lower(p[2]) != 's' || p[4] != '-') {
        rc = kms_err_set(err, KMS_EFORMAT, "not a kmsd key share (expected kms1-...)");
        goto out;
    }
    if (p[3] != '0' + SHARE_VERSION) {
        if (p[3] >= '0' && p[3] <= '9') {
            rc = kms_err_set(err, KMS_EVERSION, "unsupported share version %c", p[3]);
        } else {
            rc = kms_err_set(err, KMS_EFORMAT, "not a kmsd key share (expected kms1-...)");
        }
        goto out;
    }
    p += SHARE_PREFIX_LEN;
    /* Index: exactly 3 decimal digits, 001..255. */
    if (end - p < SHARE_INDEX_DIGITS + 1) {
        rc = kms_err_set(err, KMS_EFORMAT, "share is truncated");
        goto out;
    }
    for (int i = 0; i < SHARE_INDEX_DIGITS; i++) {
        if (p[i] < '0' || p[i] > '9') {
            rc = kms_err_set(err, KMS_EFORMAT, "share index is not a 3-digit number");
            goto out;
        }
        index = index * 10 + (unsigned)(p[i] - '0');
    }
    if (p[SHARE_INDEX_DIGITS] != '-' || index == 0 || index > KMS_SHAMIR_MAX_SHARES) {
        rc = kms_err_set(err, KMS_EFORMAT, "share index must be 001..255");
        goto out;
    }
    payload = p + SHARE_INDEX_DIGITS + 1;
    /* The checksum is the last field: 8 digits after the last '-'. */
    if (end - payload < 2 * SHARE_CHECKSUM_LEN + 1) {
        rc = kms_err_set(err, KMS_EFORMAT, "share is truncated");
        goto out;
    }
    dash = end - 2 * SHARE_CHECKSUM_LEN - 1;
    if (*dash != '-') {
        rc = kms_err_set(err, KMS_EFORMAT, "share checksum field is missing");
        goto out;
    }
    plen = (size_t)(dash - payload);
    if (plen % 2 != 0 || plen < 2 * KMS_SHAMIR_MIN_SECRET || plen > 2 * KMS_SHAMIR_MAX_SECRET) {
        rc = kms_err_set(err, KMS_EFORMAT, "share payload has %zu digits, expected an even "
                         "number between %d and %d", plen, 2 * KMS_SHAMIR_MIN_SECRET,
                         2 * KMS_SHAMIR_MAX_SECRET);
        goto out;
    }
    if ((rc = kms_hex_decode_ct(payload, plen, out->y, sizeof(out->y), &n, err)) != 0) {
        kms_err_wrap(err, rc, "share payload");
        goto out;
    }
    if ((rc = kms_hex_decode_ct(dash + 1, 2 * SHARE_CHECKSUM_LEN, want, sizeof(want), NULL,
                                err)) != 0) {
        kms_err_wrap(err, rc, "share checksum");
        goto out;
    }
    if ((rc = share_checksum((uint8_t)index, out->y, n, sum, err)) != 0) {
        goto out;
    }
    if (CRYPTO_memcmp(sum, want, sizeof(sum)) != 0) {
        rc = kms_err_set(err, KMS_ECHECKSUM, "checksum mismatch");
        goto out;
    }
    out->index = (uint8_t)index;
    out->len = (uint8_t)n;
    rc = 0;
out:
    if (rc != 0 && out != NULL) {
        OPENSSL_cleanse(out, sizeof(*out));
    }
    return rc;
}

int kms_share_parse_next(const char *text, const struct kms_share *given, size_t n,
                         const char *what, struct kms_share *out, struct kms_err *err)
{
    int rc;

    if ((rc = kms_share_parse(text, out, err)) != 0) {
        kms_err_wrap(err, rc, "%s %zu", what, n + 1);
        return rc;
    }
    for (size_t i = 0; i < n; i++) {
        if (given[i].index == out->index) {
            return kms_err_set(err, KMS_EDUP, "%s %zu: a share with index %u was already given",
                               what, n + 1, out->index);
        }
        if (given[i].len != out->len) {
            return kms_err_set(err, KMS_EFORMAT,
                               "%s %zu: length differs from the shares already given", what,
                               n + 1);
        }
    }
    return 0;
}
