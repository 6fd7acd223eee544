/*
 * Rekey (rekey.c): kmsd.v1.Operator/Rekey* on the leader, and the switch of
 * an unsealed replica to the new root key when a RekeyKeyring entry is
 * applied. See kms_rekey.h for the pure parts, docs/security.md "Rekey".
 */
#ifndef KMSD_REKEY_H
#define KMSD_REKEY_H

#include <stddef.h>
#include <stdint.h>

#include "kms_err.h"

struct kmsd;
struct kms_rpc_call;
struct kms_keyring;
struct Kmsd__V1__EncryptedKeyring;

/* Operator handlers (kmsd_cluster.h; policy rows in authz.c: operator,
 * parked, leader). Operator pool threads. */
struct kmsd_call;
int kmsd_rekey_init_cb(struct kmsd_call *c);
int kmsd_rekey_status_cb(struct kmsd_call *c);
int kmsd_rekey_update_cb(struct kmsd_call *c);
int kmsd_rekey_cancel_cb(struct kmsd_call *c);

/* Serialises keyring writes on this node (rotate, rekey), so a rotation
 * built under the old root key is never committed after a rekey. Any pool
 * thread; never held while d->mu is taken first. */
void kmsd_keyring_write_lock(void);
void kmsd_keyring_write_unlock(void);

/* Called with d->mu held, d unsealed, when the replicated keyring `ek` does
 * not decrypt under d->root: if the store holds the wrapped root key of an
 * applied rekey that d->root opens and that decrypts ek, replaces d->root
 * with it and returns 0 with *out the decrypted keyring (caller owns one
 * reference). KMS_ENOTFOUND when there is no such wrap. Supervisor thread. */
int kmsd_rekey_follow_locked(struct kmsd *d, const struct Kmsd__V1__EncryptedKeyring *ek,
                             struct kms_keyring **out, struct kms_err *err);

/* Wipes a rekey in progress (kmsd_stop). Any thread. */
void kmsd_rekey_stop(void);

#endif /* KMSD_REKEY_H */
