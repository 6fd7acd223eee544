/*
 * Online snapshot API (snapshot_api.c): kmsd.v1.Operator/SnapshotBegin,
 * SnapshotChunk and SnapshotEnd, used by `kmsctl operator snapshot save`.
 *
 * Begin pins a consistent copy of this replica's applied state
 * (kms_store_export_open) under a random handle; Chunk returns its entries
 * in order; End releases it. At most KMSD_SNAP_SESSIONS handles are open; a
 * handle not used for KMSD_SNAP_IDLE_MS is released by a reaper thread.
 * The handlers run on operator pool threads (they read RocksDB).
 */
#ifndef KMSD_SNAPSHOT_H
#define KMSD_SNAPSHOT_H

#include <stddef.h>
#include <stdint.h>

struct kmsd;
struct kms_rpc_call;

#define KMSD_SNAP_SESSIONS 2
#define KMSD_SNAP_IDLE_MS 60000u
#define KMSD_SNAP_CHUNK (1u << 20) /* bytes of entries per SnapshotChunk */

/* Operator handlers (kmsd_cluster.h). */
struct kmsd_call;
int kmsd_snapshot_begin_cb(struct kmsd_call *c);
int kmsd_snapshot_chunk_cb(struct kmsd_call *c);
int kmsd_snapshot_end_cb(struct kmsd_call *c);

/* Releases every open handle and stops the reaper. kmsd_stop() calls it
 * after the operator pool stopped and before the store closes. */
void kmsd_snapshot_shutdown(void);

#endif /* KMSD_SNAPSHOT_H */
