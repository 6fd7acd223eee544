/*
 * Last access (touch.c): every replica notes the key ids of its successful
 * unseals in a bounded table (one slot per key, coalesced to the latest
 * time) and a flusher thread replicates them as ONE TouchBatch entry per
 * lastAccess.interval (at most lastAccess.maxBatch keys; the rest wait for
 * the next interval), so an unseal burst costs each replica at most one
 * replicated write per interval, whatever the number of unseals. A
 * follower forwards the batch to the leader (the Forward policy admits
 * TouchBatch, validated by kmsd_authz_touch_check).
 *
 * Last access is advisory: a batch that cannot be written (no leader) is
 * kept and retried at the next interval as long as the table has room;
 * keys that find the table full are counted in touch_dropped and recorded
 * at their next unseal.
 *
 * Threads: kmsd_touch_note from any thread (a mutex held for a hash
 * insert); start/stop from main (kmsd_start / kmsd_stop).
 */
#ifndef KMSD_TOUCH_H
#define KMSD_TOUCH_H

#include <stdbool.h>
#include <stdint.h>

#include "kms_err.h"

struct kmsd;

/* Hard cap on keys per TouchBatch a leader accepts from a follower (and on
 * lastAccess.maxBatch). */
#define KMSD_TOUCH_MAX 65536u

/* Starts the flusher when d->opt.last_access_interval_ms > 0 (else a
 * no-op: notes are ignored). */
int kmsd_touch_start(struct kmsd *d, struct kms_err *err);
/* Stops the flusher (one last flush is NOT attempted: raft is stopping)
 * and frees the table. Safe when never started. */
void kmsd_touch_stop(struct kmsd *d);
/* Notes a successful unseal of key_id (16 bytes) now. Any thread. */
void kmsd_touch_note(struct kmsd *d, const uint8_t key_id[16]);

#endif /* KMSD_TOUCH_H */
