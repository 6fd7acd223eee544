/*
 * systemd notifications: READY, STATUS, WATCHDOG, STOPPING (kmsd_notify.h).
 * The protocol itself is libsystemd's sd_notify.
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include <systemd/sd-daemon.h>

#include "kms_log.h"
#include "kmsd.h"
#include "kmsd_notify.h"

#define NOTIFY_STATUS_MAX 256

static pthread_mutex_t notify_mu = PTHREAD_MUTEX_INITIALIZER;
static char notify_status[NOTIFY_STATUS_MAX] = "starting"; /* guarded by notify_mu */
static uint64_t watchdog_every_ms;                       /* 0 = no watchdog; set by init */
static uint64_t watchdog_last_ms;                        /* supervisor thread only */

/* Sends one notification; the caller holds notify_mu when it sends STATUS. */
static void notify_send(const char *msg)
{
    int rc = sd_notify(0, msg);
    if (rc < 0) {
        char code[16];
        snprintf(code, sizeof(code), "%d", rc);
        kms_log(KMS_LOG_DEBUG, "kmsd", "sd_notify failed", "errno", code, NULL);
    }
}

void kmsd_notify_init(void)
{
    uint64_t usec = 0;
    if (sd_watchdog_enabled(0, &usec) > 0 && usec > 0) {
        /* Ping at half the interval, as sd_watchdog_enabled(3) advises. */
        watchdog_every_ms = usec / 2000;
        if (watchdog_every_ms == 0) {
            watchdog_every_ms = 1;
        }
    }
}

/* The node's state in one line, as `systemctl status kmsd` shows it.
 * talos_open: the supervisor's own view of its Talos server. */
static void status_format(struct kmsd *d, bool talos_open, char *buf, size_t len)
{
    if (kmsd_is_unsealed(d)) {
        if (talos_open) {
            snprintf(buf, len, "serving: unsealed, Talos API open on %s",
                     d->opt.talos_listen);
        } else {
            snprintf(buf, len, "unsealed: Talos API closed until this node holds a read "
                               "lease (no quorum or leader yet)");
        }
    } else if (!kmsd_is_initialized(d)) {
        snprintf(buf, len, "uninitialised: waiting for kmsctl operator init");
    } else {
        unsigned progress = 0, threshold = 0;
        kmsd_unseal_progress(d, &progress, &threshold);
        snprintf(buf, len, "sealed: waiting for unseal key shares (%u of %u)", progress,
                 threshold);
    }
}

/* Sends STATUS= when st differs from the last one sent (or always with
 * prefix, e.g. "READY=1\n"). */
static void status_publish(const char *prefix, const char *st)
{
    pthread_mutex_lock(&notify_mu);
    if (prefix != NULL || strcmp(st, notify_status) != 0) {
        char msg[NOTIFY_STATUS_MAX + 32];
        snprintf(notify_status, sizeof(notify_status), "%s", st);
        snprintf(msg, sizeof(msg), "%sSTATUS=%s", prefix != NULL ? prefix : "", st);
        notify_send(msg);
    }
    pthread_mutex_unlock(&notify_mu);
}

void kmsd_notify_ready(struct kmsd *d)
{
    char st[NOTIFY_STATUS_MAX];
    /* A node always starts sealed (the root key is only ever in memory), so
     * the Talos server is not open yet: no need to read the supervisor's
     * talos_srv from this thread. */
    status_format(d, false, st, sizeof(st));
    status_publish("READY=1\n", st);
}

void kmsd_notify_stopping(void)
{
    pthread_mutex_lock(&notify_mu);
    snprintf(notify_status, sizeof(notify_status), "stopping");
    notify_send("STOPPING=1\nSTATUS=stopping");
    pthread_mutex_unlock(&notify_mu);
}

void kmsd_notify_tick(struct kmsd *d, uint64_t now_ms)
{
    char st[NOTIFY_STATUS_MAX];

    status_format(d, d->talos_srv != NULL, st, sizeof(st));
    status_publish(NULL, st);
    if (watchdog_every_ms != 0 && now_ms - watchdog_last_ms >= watchdog_every_ms) {
        watchdog_last_ms = now_ms;
        notify_send("WATCHDOG=1");
    }
}

uint64_t kmsd_notify_due_ms(void)
{
    return watchdog_every_ms != 0 ? watchdog_last_ms + watchdog_every_ms : UINT64_MAX;
}
