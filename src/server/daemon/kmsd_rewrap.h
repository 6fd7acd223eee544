/*
 * Rewrap and retire-term (rewrap.c): kmsd.v1.Operator/Rewrap and
 * RetireTerm, used by `kmsctl operator rewrap` and `retire-term`.
 *
 * Rewrap is driven by kmsctl, one bounded step per call: the leader walks
 * at most KMSD_REWRAP_SCAN records after the caller's cursor, rewraps the
 * live ones on an older term under the active term (kms_rewrap: the
 * passphrase is never decrypted) and replicates them in ONE RewrapBatch
 * entry of at most `batch` items, then returns the cursor. Every step is
 * atomic and idempotent, so a leader change or a crash between steps loses
 * nothing: rerunning from any cursor (or from the start) finishes the job.
 *
 * Handlers run on operator pool threads, leader only (KMSD_RUN_LEADER).
 */
#ifndef KMSD_REWRAP_H
#define KMSD_REWRAP_H

#include <stddef.h>
#include <stdint.h>

struct kms_rpc_call;

#define KMSD_REWRAP_BATCH 256u   /* default items per replicated write */
#define KMSD_REWRAP_BATCH_MAX 1024u
#define KMSD_REWRAP_SCAN 4096u   /* records looked at per call */

/* Operator handlers (kmsd_cluster.h). */
struct kmsd_call;
int kmsd_rewrap_cb(struct kmsd_call *c);
int kmsd_retire_term_cb(struct kmsd_call *c);

#endif /* KMSD_REWRAP_H */
