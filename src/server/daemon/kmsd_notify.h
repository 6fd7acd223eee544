/*
 * systemd service notifications (sd_notify, kmsd.service is Type=notify).
 *
 * Every call is a no-op when NOTIFY_SOCKET is unset (not started by systemd),
 * and none of them can fail the daemon: a lost notification is logged at
 * debug level and otherwise ignored.
 *
 *   READY=1     once, from main, when kmsd_start and the HTTP endpoints are up:
 *               the node serves, or waits for init / unseal shares.
 *   STATUS=...  "uninitialised: ...", "sealed: ...", "unsealed: ..." or
 *               "serving: ..."; sent again whenever it changes (supervisor).
 *   WATCHDOG=1  from the supervisor thread every WatchdogSec/2, so a stuck
 *               supervisor (the thread that opens and closes the Talos API)
 *               gets the service restarted.
 *   STOPPING=1  from main when a stop begins.
 *
 * Threads: kmsd_notify_init, _ready and _stopping from the main thread;
 * kmsd_notify_tick from the supervisor thread only. The module keeps its own
 * state (the last STATUS, guarded by a mutex; the watchdog clock, supervisor
 * only); it holds no pointer into struct kmsd.
 */
#ifndef KMSD_NOTIFY_H
#define KMSD_NOTIFY_H

#include <stdint.h>

struct kmsd;

/* Reads the watchdog interval (WATCHDOG_USEC/WATCHDOG_PID). Call once, before
 * the supervisor thread starts. */
void kmsd_notify_init(void);

/* READY=1 with the current STATUS (d started: kmsd_start succeeded). */
void kmsd_notify_ready(struct kmsd *d);

/* STOPPING=1 and STATUS=stopping. */
void kmsd_notify_stopping(void);

/* One supervisor iteration: recomputes the status of d (the supervisor's
 * view: talos_srv is read without a lock, it is the supervisor's own field)
 * and sends STATUS= when it changed, WATCHDOG=1 when a ping is due. */
void kmsd_notify_tick(struct kmsd *d, uint64_t now_ms);

/* When the next WATCHDOG=1 is due (kms_mono_ms()), UINT64_MAX without a
 * watchdog: the supervisor sleeps no longer than that. Supervisor only. */
uint64_t kmsd_notify_due_ms(void);

#endif /* KMSD_NOTIFY_H */
