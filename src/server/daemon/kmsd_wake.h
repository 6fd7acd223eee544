/*
 * kmsd_wake: an event count, for a daemon thread that sleeps until "the
 * node's state changed" or a deadline instead of sleeping and re-checking.
 *
 * One per struct kmsd (d->wake). Waiters: the supervisor thread, the
 * PKCS#11 auto-unseal thread, the peer unseal requester thread. Signallers:
 * kmsd_stop (after setting d->stopping), kmsd_reload_tls (after
 * reload_requested), the key state changes in node_keys.c (unseal, seal,
 * share progress) and the peer unseal / operator seal flags, each after
 * writing the state it changes. Any thread may signal (not from a signal
 * handler: it takes a mutex).
 *
 * No lost wake-up: `mu` guards `count`. A waiter takes a ticket (the count)
 * FIRST, then reads the state it waits on, then waits with that ticket; a
 * signaller writes the state FIRST, then bumps the count under mu and
 * broadcasts. A signal that lands after the ticket leaves the count past it,
 * so the wait returns at once; one that landed before it was preceded by its
 * state write, which the waiter's read (after the ticket, ordered by mu)
 * sees. Wakes are shared by every waiter, so a wake may be for another
 * thread's state: each waiter re-reads its own and waits again.
 */
#ifndef KMSD_WAKE_H
#define KMSD_WAKE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "kms_err.h"

#define KMSD_WAKE_NEVER UINT64_MAX /* a wait with no deadline */

struct kmsd_wake {
    pthread_mutex_t mu; /* guards count */
    pthread_cond_t cv;  /* CLOCK_MONOTONIC; broadcast on every signal */
    uint64_t count;     /* signals so far */
};

/* 0 or KMS_ENOMEM. */
int kmsd_wake_init(struct kmsd_wake *w, struct kms_err *err);
/* No thread may wait on w any more. */
void kmsd_wake_destroy(struct kmsd_wake *w);

/* The ticket to pass to kmsd_wake_wait_until: take it before reading the
 * state the wait is about. Any thread. */
uint64_t kmsd_wake_ticket(struct kmsd_wake *w);

/* Wakes every thread waiting on w (after the caller changed the state they
 * wait on). Any thread. */
void kmsd_wake_signal(struct kmsd_wake *w);

/* Waits until a signal came after `ticket` or kms_mono_ms() reaches
 * until_ms (KMSD_WAKE_NEVER: no deadline). True when signalled (at once if
 * that already happened), false at the deadline. */
bool kmsd_wake_wait_until(struct kmsd_wake *w, uint64_t ticket, uint64_t until_ms);

#endif /* KMSD_WAKE_H */
