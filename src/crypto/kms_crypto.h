/*
 * kms_crypto: kmsd's crypto core (docs/security.md "Key hierarchy", proto/README.md).
 *
 *  - secure memory (OpenSSL secure heap: mlocked, MADV_DONTDUMP) and process
 *    hardening;
 *  - thin wrappers over OpenSSL 3 EVP: RAND_bytes, AES-256-GCM, HKDF-SHA256;
 *  - Shamir secret sharing over GF(2^8), constant time, and its share text;
 *  - the keyring (data keys by term), encrypted under the root key R;
 *  - sealing and unsealing of Talos passphrases (records + blobs).
 *
 * Conventions: every fallible function returns 0 or a negative KMS_E* code
 * and fills `err` (may be NULL). Outputs are only written on success unless
 * stated otherwise; secret outputs are wiped on failure. Nothing here logs a
 * secret. All functions are thread-safe; a keyring is immutable once built
 * and may be read from many threads while each holds a reference.
 */
#ifndef KMS_CRYPTO_H
#define KMS_CRYPTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kms_err.h"
#include "kmsd/v1/record.pb-c.h"

/* ---- process-wide setup ------------------------------------------------ */

/* Default size of the OpenSSL secure heap set up by kms_crypto_init. */
#define KMS_SECURE_HEAP_SIZE (1u << 20)

/* Sets up the OpenSSL secure heap (CRYPTO_secure_malloc_init: mlock +
 * MADV_DONTDUMP). Idempotent and thread-safe: the first call does the work,
 * later calls return its result. If the heap was created but could not be
 * locked (RLIMIT_MEMLOCK too small) the call still succeeds, logs a warning
 * and kms_crypto_secure_heap_locked() returns false. */
int kms_crypto_init(struct kms_err *err);

/* True once kms_crypto_init created a secure heap that is mlocked and
 * excluded from core dumps. */
bool kms_crypto_secure_heap_locked(void);

/* prctl(PR_SET_DUMPABLE, 0) and RLIMIT_CORE = 0: no core dumps, no ptrace
 * attach by same-uid processes. KMS_EIO if either fails. */
int kms_process_harden(struct kms_err *err);

/* Zeroed secure memory (n == 0 is treated as 1), or NULL. Before
 * kms_crypto_init it falls back to the ordinary heap (tests, tools). */
void *kms_secmem_alloc(size_t n);
/* Wipes and frees memory from kms_secmem_alloc; NULL is fine. `n` must be the
 * size given to kms_secmem_alloc. */
void kms_secmem_free(void *p, size_t n);

/* ---- primitives (OpenSSL 3 EVP) ----------------------------------------- */

int kms_rand_bytes(void *buf, size_t n, struct kms_err *err);

#define KMS_AEAD_KEY_LEN 32
#define KMS_AEAD_NONCE_LEN 12
#define KMS_AEAD_TAG_LEN 16

/* AES-256-GCM. ct receives ptlen + 16 bytes (tag appended). In place
 * (ct == pt) is allowed. */
int kms_aead_seal(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                  size_t aadlen, const uint8_t *pt, size_t ptlen, uint8_t *ct,
                  struct kms_err *err);
/* ctlen >= 16; pt receives ctlen - 16 bytes. KMS_EAUTH on tag mismatch, in
 * which case pt is wiped. In place (pt == ct) is allowed. */
int kms_aead_open(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                  size_t aadlen, const uint8_t *ct, size_t ctlen, uint8_t *pt,
                  struct kms_err *err);

/* The framed form several formats share (rekey wrap, rewrap, k8s wrap): a
 * fresh random nonce in front of the sealed bytes. out receives
 * KMS_AEAD_NONCE_LEN + ptlen + KMS_AEAD_TAG_LEN bytes, nonce || ct || tag.
 * Errors of kms_rand_bytes and kms_aead_seal. */
int kms_aead_seal_framed(const uint8_t key[32], const uint8_t *aad, size_t aadlen,
                         const uint8_t *pt, size_t ptlen, uint8_t *out, struct kms_err *err);
/* Opens nonce || ct || tag (inlen >= KMS_AEAD_NONCE_LEN + KMS_AEAD_TAG_LEN);
 * pt receives inlen - KMS_AEAD_NONCE_LEN - KMS_AEAD_TAG_LEN bytes. As
 * kms_aead_open: KMS_EAUTH with pt wiped on tag mismatch. */
int kms_aead_open_framed(const uint8_t key[32], const uint8_t *aad, size_t aadlen,
                         const uint8_t *in, size_t inlen, uint8_t *pt, struct kms_err *err);

/* HKDF-SHA256 (RFC 5869), extract + expand. ikmlen >= 1; salt and info may be
 * empty (NULL with length 0); 1 <= outlen <= 255*32. */
int kms_hkdf_sha256(const uint8_t *ikm, size_t ikmlen, const uint8_t *salt, size_t saltlen,
                    const uint8_t *info, size_t infolen, uint8_t *out, size_t outlen,
                    struct kms_err *err);

/* ---- GF(2^8) and Shamir -------------------------------------------------- */

/* Constant time, AES polynomial x^8+x^4+x^3+x+1 (0x11b), no tables. */
uint8_t kms_gf256_mul(uint8_t a, uint8_t b);
/* Constant time a^254; inv(0) = 0. */
uint8_t kms_gf256_inv(uint8_t a);

#define KMS_SHAMIR_MIN_SECRET 16
#define KMS_SHAMIR_MAX_SECRET 64
#define KMS_SHAMIR_MAX_SHARES 255

/* One share: y[i] = f_i(index) for each secret byte i < len. Callers keep
 * shares in secure memory. */
struct kms_share {
    uint8_t index; /* x coordinate, 1..255 */
    uint8_t len;   /* secret length, 16..64 */
    uint8_t y[KMS_SHAMIR_MAX_SECRET];
};

/* Splits `secret` (16..64 bytes) into n shares with threshold k,
 * 2 <= k <= n <= 255; k = n = 1 only when allow_dev_1of1. out[i].index = i+1.
 * KMS_EINVAL for bad parameters. */
int kms_shamir_split(const uint8_t *secret, size_t len, unsigned n, unsigned k,
                     bool allow_dev_1of1, struct kms_share *out, struct kms_err *err);

/* Recovers the secret from `count` shares (the first k are used). Errors:
 * index 0 or a bad length KMS_EFORMAT, mixed lengths KMS_EFORMAT, duplicate
 * index KMS_EDUP, count < k KMS_ETOOFEW, k == 0 KMS_EINVAL. Shares that are
 * well-formed but wrong give a wrong secret: callers authenticate it (the
 * keyring's GCM tag does). `secret` needs room for the shares' length
 * (KMS_SHAMIR_MAX_SECRET always suffices); *len receives it. */
int kms_shamir_combine(const struct kms_share *shares, size_t count, unsigned k,
                       uint8_t *secret, size_t *len, struct kms_err *err);

/* Share text, version 1:
 *   kms1-<index: 3 decimal digits>-<payload: 2*len hex>-<checksum: 8 hex>
 * checksum = first 4 bytes of SHA-256(0x01 || index || payload).
 * Formatting writes lowercase; parsing ignores surrounding whitespace and
 * case. KMS_SHARE_TEXT_MAX includes the NUL. */
#define KMS_SHARE_TEXT_MAX 160
int kms_share_format(const struct kms_share *s, char *out, size_t outlen, struct kms_err *err);
/* KMS_ECHECKSUM ("checksum mismatch") for a typo that keeps the shape,
 * KMS_EVERSION for another version prefix, KMS_EFORMAT otherwise. `out` is
 * wiped on failure. */
int kms_share_parse(const char *text, struct kms_share *out, struct kms_err *err);
/* Parses the next share of a collection (an unseal's or a rekey's) that
 * holds n given shares into out: kms_share_parse's errors, then KMS_EDUP
 * when a given share has its index, KMS_EFORMAT when one has another
 * length; messages name it "<what> <n + 1>". out is the caller's to wipe. */
int kms_share_parse_next(const char *text, const struct kms_share *given, size_t n,
                         const char *what, struct kms_share *out, struct kms_err *err);

/* Constant-time hex (no secret-dependent branches or table lookups).
 * encode: writes 2*len lowercase digits and a NUL; outlen >= 2*len+1.
 * decode: hexlen even, either case, outlen >= hexlen/2; *outlen_written
 * (may be NULL) receives hexlen/2. KMS_EFORMAT for a non-hex digit (out is
 * wiped). */
int kms_hex_encode_ct(const uint8_t *in, size_t len, char *out, size_t outlen,
                      struct kms_err *err);
int kms_hex_decode_ct(const char *hex, size_t hexlen, uint8_t *out, size_t outlen,
                      size_t *outlen_written, struct kms_err *err);

/* ---- keyring ------------------------------------------------------------- */

#define KMS_CLUSTER_ID_LEN 16
#define KMS_TERM_KEY_LEN 32
#define KMS_ROOT_KEY_LEN 32
#define KMS_KEYRING_VERSION 1
#define KMS_KEYRING_MAX_TERMS 1024

/* Opaque, immutable once built, atomically refcounted. Lives entirely in
 * secure memory. */
struct kms_keyring;

/* New keyring with term 1 (random key), active term 1. */
int kms_keyring_create(const uint8_t cluster_id[16], int64_t now_ms, struct kms_keyring **out,
                       struct kms_err *err);
/* NEW keyring = old terms + one new term (random key), active = new term.
 * `old` is untouched. KMS_ERANGE past KMS_KEYRING_MAX_TERMS. */
int kms_keyring_rotate(const struct kms_keyring *old, int64_t now_ms, struct kms_keyring **out,
                       struct kms_err *err);
/* Encrypts the keyring under root: AES-256-GCM, AAD = "kmsd/keyring" ||
 * u32be(1) || cluster_id. `shares`/`threshold` are recorded (1 <= threshold
 * <= shares <= 255). *out is malloc-owned: free with
 * kmsd__v1__encrypted_keyring__free_unpacked(*out, NULL). */
int kms_keyring_encrypt(const struct kms_keyring *kr, const uint8_t root[32], unsigned shares,
                        unsigned threshold, Kmsd__V1__EncryptedKeyring **out,
                        struct kms_err *err);
/* KMS_EAUTH for a wrong root key (or a tampered keyring / cluster id),
 * KMS_EVERSION, KMS_EFORMAT / KMS_ECORRUPT for malformed content. */
int kms_keyring_decrypt(const Kmsd__V1__EncryptedKeyring *ek, const uint8_t root[32],
                        struct kms_keyring **out, struct kms_err *err);
/* Builds a keyring from a plaintext Keyring message (validated like the
 * output of decrypt). For tests, fuzzing and tooling; keys are copied. */
int kms_keyring_import(const uint8_t cluster_id[16], const Kmsd__V1__Keyring *plain,
                       struct kms_keyring **out, struct kms_err *err);

uint32_t kms_keyring_active_term(const struct kms_keyring *kr);
size_t kms_keyring_term_count(const struct kms_keyring *kr);
const uint8_t *kms_keyring_cluster_id(const struct kms_keyring *kr);
/* +1 reference; returns kr (NULL passes through). */
struct kms_keyring *kms_keyring_ref(struct kms_keyring *kr);
/* -1 reference; wipes and frees on the last one. NULL is fine. */
void kms_keyring_unref(struct kms_keyring *kr);

int kms_root_key_generate(uint8_t root[32], struct kms_err *err);

/* NEW keyring = old without `term`, same active term (rewrap.c). `old` is
 * untouched. KMS_EINVAL for the active term, KMS_ENOTFOUND for a term the
 * keyring does not hold. */
int kms_keyring_retire(const struct kms_keyring *old, uint32_t term, struct kms_keyring **out,
                       struct kms_err *err);
/* Copies up to max term numbers (increasing) into terms; returns how many. */
size_t kms_keyring_terms(const struct kms_keyring *kr, uint32_t *terms, size_t max);

/* ---- rewrap (rewrap.c; format in proto/kmsd/v1/record.proto) ------------ */

/* The new wrapping of one record: term (the active term), origin_term, and
 * wrapped (malloc-owned, wrapped_len bytes; not secret: ciphertext). */
struct kms_rewrap_out {
    uint32_t term;
    uint32_t origin_term;
    uint8_t *wrapped;
    size_t wrapped_len;
};

/* True when rec is live (not revoked, not shredded) and on a term other than
 * kr's active one. Pure: any thread. */
bool kms_rewrap_needed(const struct kms_keyring *kr, const Kmsd__V1__SealedRecord *rec);
/* Rewraps rec under kr's active term without the blob (the passphrase is
 * never decrypted). rec is not modified. KMS_EINVAL when no rewrap is
 * needed, KMS_ENOTFOUND when the record's term is not held, KMS_EAUTH for
 * a rewrapped record that does not open. On success *out is filled; release
 * with kms_rewrap_out_free(). */
int kms_rewrap(const struct kms_keyring *kr, const Kmsd__V1__SealedRecord *rec,
               struct kms_rewrap_out *out, struct kms_err *err);
void kms_rewrap_out_free(struct kms_rewrap_out *o);
/* Length bounds of SealedRecord.wrapped. */
size_t kms_rewrap_len_min(void);
size_t kms_rewrap_len_max(void);

/* ---- seal / unseal ------------------------------------------------------- */

#define KMS_BLOB_VERSION 1
#define KMS_BLOB_V1_LEN 49
#define KMS_BLOB_MAX 64
#define KMS_KEY_ID_LEN 16
#define KMS_CLIENT_HALF_LEN 32
#define KMS_SEAL_MIN_DATA 16
#define KMS_SEAL_MAX_DATA 64
#define KMS_NODE_UUID_MAX 128

/* True when uuid is 1..KMS_NODE_UUID_MAX printable ASCII characters
 * (0x20..0x7e): what Seal binds into a record. Talos sends SMBIOS UUIDs in
 * the canonical 36-character form, in either case. Pure: any thread. */
bool kms_node_uuid_valid(const char *uuid);
#define KMS_RECORD_VERSION 1

/* Seals `data` (16..64 bytes) for node_uuid (1..128 printable ASCII bytes)
 * under the keyring's active term. source_ip: iplen 0, 4 or 16. On success
 * *rec_out is malloc-owned (free with
 * kmsd__v1__sealed_record__free_unpacked(*rec_out, NULL)) and blob holds
 * *bloblen = 49 bytes (0x01 || key_id || client_half), which the caller
 * should wipe after sending. KMS_EINVAL for bad arguments. */
int kms_seal(const struct kms_keyring *kr, const char *node_uuid, const uint8_t *data,
             size_t datalen, int64_t now_ms, const uint8_t *source_ip, size_t iplen,
             Kmsd__V1__SealedRecord **rec_out, uint8_t blob[KMS_BLOB_MAX], size_t *bloblen,
             struct kms_err *err);

/* KMS_EFORMAT for any length other than 49 or a version other than 1.
 * key_id and client_half are written only on success. */
int kms_blob_parse(const uint8_t *blob, size_t len, uint8_t key_id[16], uint8_t client_half[32],
                   struct kms_err *err);

/* Unseals into out (>= 64 bytes), *outlen = data length. Errors, in order of
 * checking: KMS_EFORMAT bad blob or malformed record, KMS_EDENIED blob of
 * another record or node_uuid mismatch, KMS_EREVOKED revoked record,
 * KMS_ENOTFOUND term missing from the keyring, KMS_EAUTH decrypt failure.
 * Never returns 0 with bytes other than the sealed ones; `out` is wiped and
 * *outlen = 0 on failure. */
int kms_unseal(const struct kms_keyring *kr, const Kmsd__V1__SealedRecord *rec,
               const char *node_uuid, const uint8_t *blob, size_t bloblen, uint8_t *out,
               size_t *outlen, struct kms_err *err);

/* Checks every field of a record (version, lengths, node_uuid charset,
 * term >= 1, timestamps >= 0). KMS_EFORMAT. A revoked record (revoked_at > 0)
 * may have neither nonce nor ciphertext: the store shreds both on revoke. */
int kms_record_validate(const Kmsd__V1__SealedRecord *rec, struct kms_err *err);
/* Validates, then packs into a malloc'd buffer (*out, free with free()). */
int kms_record_pack(const Kmsd__V1__SealedRecord *rec, uint8_t **out, size_t *len,
                    struct kms_err *err);
/* Unpacks and validates; *out is malloc-owned (free_unpacked(*out, NULL)).
 * KMS_EFORMAT. */
int kms_record_unpack(const uint8_t *buf, size_t len, Kmsd__V1__SealedRecord **out,
                      struct kms_err *err);

#endif /* KMS_CRYPTO_H */
