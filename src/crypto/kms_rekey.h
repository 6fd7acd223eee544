/*
 * kms_rekey: the pure parts of a rekey (kmsctl operator rekey): wrapping the
 * new root key R' under the current root key R for the replicated entry,
 * and the gathering of current shares against a nonce.
 *
 * Conventions as in kms_crypto.h: 0 or a negative KMS_E* code with `err`
 * filled; secret outputs are wiped on failure; nothing here logs.
 * Thread-safety: the wrap functions are pure (any thread); a session is not
 * locked: its owner (the daemon's rekey.c) serialises calls on it.
 */
#ifndef KMS_REKEY_H
#define KMS_REKEY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kms_crypto.h"
#include "kms_err.h"

/* nonce(12) || AES-256-GCM(HKDF(R, "kmsd/rekey-wrap/v1"), R') || tag(16);
 * AAD = "kmsd/rekey-root" || cluster id. */
#define KMS_REKEY_WRAP_LEN (KMS_AEAD_NONCE_LEN + KMS_ROOT_KEY_LEN + KMS_AEAD_TAG_LEN)

int kms_rekey_root_wrap(const uint8_t old_root[32], const uint8_t cluster_id[16],
                        const uint8_t new_root[32], uint8_t out[KMS_REKEY_WRAP_LEN],
                        struct kms_err *err);
/* KMS_EFORMAT for a wrap of the wrong length, KMS_EAUTH when old_root (or
 * the cluster id) is not the one it was wrapped under; new_root is wiped on
 * failure. */
int kms_rekey_root_unwrap(const uint8_t old_root[32], const uint8_t cluster_id[16],
                          const uint8_t *wrap, size_t len, uint8_t new_root[32],
                          struct kms_err *err);

/* Checks a rekey's new share count and threshold: 2 <= k <= n <= 255
 * (KMS_EINVAL with the reason). */
int kms_rekey_params_check(unsigned n, unsigned k, struct kms_err *err);

#define KMS_REKEY_NONCE_HEX 33 /* 32 hex digits and a NUL */

/* One rekey in progress. Lives in secure memory (kms_secmem_alloc), owned by
 * whoever created it; all-zero is "no rekey". */
struct kms_rekey_session {
    bool active;
    char nonce[KMS_REKEY_NONCE_HEX];
    unsigned new_shares, new_threshold;
    int64_t started_at;             /* unix ms */
    uint64_t tag;                   /* owner's context (the daemon: raft term) */
    size_t n_given;
    struct kms_share given[KMS_SHAMIR_MAX_SHARES];
};

/* Starts a rekey: checks (n, k), draws a fresh random nonce. KMS_EEXIST when
 * one is active already (the message gives its nonce). */
int kms_rekey_session_begin(struct kms_rekey_session *s, unsigned n, unsigned k,
                            int64_t now_ms, uint64_t tag, struct kms_err *err);
/* Adds one current share against nonce. Errors: KMS_ENOTFOUND no rekey in
 * progress, KMS_EINVAL wrong nonce, share text errors of kms_share_parse,
 * KMS_EDUP an index given already, KMS_EFORMAT a length that differs,
 * KMS_ERANGE already `threshold` shares (combine them). On error the
 * session is unchanged. *progress receives the shares given. */
int kms_rekey_session_add(struct kms_rekey_session *s, const char *nonce, const char *share,
                          unsigned threshold, unsigned *progress, struct kms_err *err);
/* Combines the shares given (>= threshold) into root (32 bytes). KMS_ETOOFEW
 * when fewer, KMS_EFORMAT when they do not hold a 32-byte secret. The
 * caller authenticates the result (the keyring's GCM tag). */
int kms_rekey_session_combine(const struct kms_rekey_session *s, unsigned threshold,
                              uint8_t root[32], struct kms_err *err);
/* Forgets the shares given (progress back to 0), keeps the rekey. */
void kms_rekey_session_reset_shares(struct kms_rekey_session *s);
/* Ends the rekey: wipes everything. */
void kms_rekey_session_clear(struct kms_rekey_session *s);

#endif /* KMS_REKEY_H */
