/*
 * A small pool of threads for the handlers that must wait (for a leader, a
 * lease, a commit or an apply; up to requestWait), so that they never hold a
 * gRPC completion-queue worker. A handler "parks" its call: it packs what it
 * needs into a job, submits it here and returns; a pool thread runs the job
 * and completes the call with kms_rpc_call_finish() when the wait is over
 * (gRPC 1.51 lets a server call be completed from any thread).
 *
 * The daemon keeps two pools (kmsd.h): one for writes (Seal, forwarded
 * proposals) and one for unseals that wait, so a write blocked without
 * quorum never delays an unseal.
 */
#ifndef KMSD_POOL_H
#define KMSD_POOL_H

#include <stdbool.h>
#include <stddef.h>

#include "kms_err.h"

struct kmsd_pool;

/* Runs on a pool thread. Owns arg. */
typedef void (*kmsd_pool_fn)(void *arg);

/* Starts `threads` threads; at most `max_queue` jobs wait for a thread.
 * `name` appears in logs and thread names (<= 15 bytes is best). */
int kmsd_pool_create(const char *name, unsigned threads, size_t max_queue,
                     struct kmsd_pool **out, struct kms_err *err);

/* Queues fn(arg). 0, or KMS_EBUSY when max_queue jobs already wait, or
 * KMS_ESHUTDOWN after kmsd_pool_destroy() began; on error the caller keeps
 * arg (and must answer its call). Any thread. */
int kmsd_pool_submit(struct kmsd_pool *p, kmsd_pool_fn fn, void *arg);

/* Jobs queued or running now. Any thread. */
size_t kmsd_pool_load(struct kmsd_pool *p);

/* Waits until nothing is queued or running, at most timeout_ms. True when
 * idle. Any thread but a pool thread. NULL is idle. */
bool kmsd_pool_wait_idle(struct kmsd_pool *p, unsigned timeout_ms);

/* Refuses new jobs (kmsd_pool_submit then returns KMS_ESHUTDOWN), runs
 * every queued job to the end and joins the threads; the pool stays
 * allocated so submitters racing the stop stay safe. Jobs are expected to
 * notice the daemon stopping and return quickly. One thread, not a pool
 * thread. Idempotent; NULL is accepted. */
void kmsd_pool_stop(struct kmsd_pool *p);

/* kmsd_pool_stop(), then frees the pool: only when nothing can submit any
 * more (the servers that submit are stopped). NULL is accepted. */
void kmsd_pool_destroy(struct kmsd_pool *p);

#endif /* KMSD_POOL_H */
