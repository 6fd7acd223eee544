/*
 * Private to src/store: the store struct and helpers shared by store.c
 * (open, apply, reads) and snapshot.c (snapshot, restore, the raft fsm's store side).
 */
#ifndef KMS_STORE_INTERNAL_H
#define KMS_STORE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>

#include <raft.h> /* raft_buffer, raft_malloc: buffers handed to or from raft */
#include <rocksdb/c.h>

#include "kms_bytes.h"
#include "kms_store.h"
#include "store_keys.h"

#define KS_REKEY_WRAP_MAX 64 /* RekeyKeyring.wrapped_root: 60 bytes today */


struct kms_store {
    rocksdb_t *db;
    rocksdb_options_t *opts;
    rocksdb_block_based_table_options_t *bbopts;
    rocksdb_cache_t *cache;
    rocksdb_writeoptions_t *wopts;
    rocksdb_readoptions_t *ropts; /* shared, never modified after open */
    char *path;

    _Atomic uint64_t applied;
    _Atomic uint64_t count;
    atomic_bool restoring;

    /* Raft thread only. */
    struct kms_store_result fsm_result;
    /* The RocksDB snapshot behind raft's one pending snapshot (fsm v3:
     * taken on the raft thread, serialised on a worker, released by
     * snapshot_finalize), and the raft index it was taken at. */
    const rocksdb_snapshot_t *snap_pending;
    uint64_t snap_pending_index;

    /* The wrapped root key of the latest applied RekeyKeyring (memory only,
     * never written to RocksDB; kms_store_rekey_wrap_take). */
    pthread_mutex_t rekey_mu;
    uint8_t rekey_wrap[KS_REKEY_WRAP_MAX];
    size_t rekey_wrap_len;
    uint64_t rekey_index;

    /* Sticky fatal error; written by the raft thread, read by anyone. */
    pthread_mutex_t fatal_mu;
    struct kms_err fatal;
};

/* Records a sticky fatal error (code, message from err) and logs it. */
int ks_set_fatal(struct kms_store *s, int code, struct kms_err *err);

/* Writes a batch with the store's write options; KMS_ESTORE naming the path. */
int ks_write(struct kms_store *s, rocksdb_writebatch_t *wb, const char *what, struct kms_err *err);

#endif /* KMS_STORE_INTERNAL_H */
