/*
 * The PKCS#11 seal in the daemon (seal_pkcs11.c; crypto in kms_pkcs11.h).
 *
 * With seal.type pkcs11 the replicated EncryptedKeyring carries R wrapped
 * by a non-extractable AES-256 key in the token (HsmWrap). A thread owned
 * by this module ("kmsd-hsm") unseals the node by itself: at start, and
 * again whenever the node is sealed but not administratively (`operator
 * seal` stops it until k recovery shares are given or the process
 * restarts). While the HSM is unreachable it retries with exponential
 * backoff (250 ms doubling to seal.retryMax) and says why in kmsctl
 * status (seal_error), the log and /metrics. A wrong PIN is not retried
 * (HSMs lock a PIN after a few failures): fix it and restart.
 *
 * The Shamir shares handed out by `operator init` in this mode are
 * recovery shares: shares of the same R, needed for seal migration and as
 * the break-glass path when the HSM is lost (operator unseal still takes
 * them).
 *
 * Threads: every function may be called from any thread; they take the
 * module's own lock (never d->mu while calling into the token).
 */
#ifndef KMSD_SEAL_H
#define KMSD_SEAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kms_err.h"

struct kmsd;
struct kms_config;
struct Kmsd__V1__HsmWrap;

/* From kmsd_start, before the cluster API opens (its handlers read d->hsm
 * unlocked: set once here, cleared only by kmsd_hsm_stop): with seal.type pkcs11 loads the
 * module, reads the PIN (seal.pin / KMSD_PKCS11_PIN, else seal.pinFile)
 * and starts the auto-unseal thread. Nothing with the Shamir seal.
 * KMS_EIO / KMS_EFORMAT / KMS_EVERSION for a module or PIN file that is
 * unusable (start-up fails: a configuration error). */
int kmsd_hsm_start(struct kmsd *d, struct kms_err *err);
/* Joins the thread, closes the module. From kmsd_stop after the cluster
 * API and HTTP servers are gone and d->stopping is set. Safe when never
 * started. */
void kmsd_hsm_stop(struct kmsd *d);

/* True when this node is configured with seal.type pkcs11. */
bool kmsd_hsm_enabled(struct kmsd *d);

/* init: wraps root for cluster_id in the token, creating the key when it
 * is missing. *out malloc-owned (kmsd__v1__hsm_wrap__free_unpacked). */
int kmsd_hsm_wrap(struct kmsd *d, const uint8_t cluster_id[16], const uint8_t root[32],
                  struct Kmsd__V1__HsmWrap **out, struct kms_err *err);

/* operator seal sets it (no auto-unseal); a successful unseal with shares
 * clears it. */
void kmsd_hsm_admin_sealed(struct kmsd *d, bool sealed);

/* For kmsctl status: the reason the auto-unseal fails now ("" when none),
 * copied into buf. */
void kmsd_hsm_status(struct kmsd *d, char *buf, size_t buflen);

/* What /metrics shows of the PKCS#11 seal (http.c's metric table). */
struct kmsd_hsm_metrics {
    bool enabled;       /* seal.type is pkcs11 */
    bool failing;       /* the auto-unseal fails now */
    uint64_t attempts;  /* unwrap attempts */
    uint64_t failures;  /* failed attempts */
};
void kmsd_hsm_metric_values(struct kmsd *d, struct kmsd_hsm_metrics *m);

/* kmsctl operator seal-migrate: `to` is "pkcs11" or "shamir"; `shares`
 * are k unseal (to pkcs11) or recovery (to shamir) shares of R, checked by
 * decrypting the replicated keyring. Commits a rotated keyring with the
 * HSM wrap added or removed (leader only, like rotate). *active_term gets
 * the new term. KMS_EEXIST when the cluster already uses that seal,
 * KMS_EINVAL when migrating to pkcs11 on a node without seal.type pkcs11. */
int kmsd_seal_migrate(struct kmsd *d, const char *to, char *const *shares, size_t n_shares,
                      uint32_t *active_term, struct kms_err *err);

/* kmsd --check-config with seal.type pkcs11: loads the module, logs in,
 * looks the key up (a missing key is fine before init: it is created
 * then). Findings on f. 0, or the error (message on f too). */
int kmsd_hsm_check_config(const struct kms_config *o, FILE *f);

#endif /* KMSD_SEAL_H */
