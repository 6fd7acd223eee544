/*
 * Private to src/store: the store struct and the helpers shared by its files:
 * store.c (open, close, point reads, shred compaction), store_apply.c
 * (applying entries: records, members), store_keyring.c (the keyring and
 * peer unseal gate ops and reads), store_scan.c (the one key-range walk),
 * store_read.c (lists, counts, digest) and snapshot.c (snapshot, restore,
 * the raft fsm's store side).
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
#define KS_UUID_MAX 128      /* node uuid bytes in the 'U' index keys */


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
    _Atomic uint32_t entry_version; /* highest Entry.version applied (0: none recorded) */

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

/* ---- store.c: small shared helpers (any thread) -------------------------- */

/* Lower-case hex of a 16-byte key id into out (NUL-terminated). */
void ks_hex16(const uint8_t *id, char out[33]);

/* Takes ownership of a RocksDB error string (frees it) and turns it into
 * KMS_ESTORE "rocksdb <what> at <path>: ...". */
int ks_rdb_err(struct kms_store *s, char *rerr, const char *what, struct kms_err *err);

/* Point read through ro (the store's shared read options when NULL). 0 with
 * *val (the caller free()s it), KMS_ENOTFOUND (err untouched), KMS_ESTORE. */
int ks_get(struct kms_store *s, const rocksdb_readoptions_t *ro, const void *key, size_t klen,
           char **val, size_t *vlen, struct kms_err *err);

/* 'R' key_id: the record key. */
void ks_record_key(uint8_t k[17], const uint8_t *id);

/* 'U' uuid '\0' [key_id]: returns the length (prefix only when id NULL). */
size_t ks_uuid_key(uint8_t *k, const char *uuid, size_t ulen, const uint8_t *id);

/* Nonzero when uuid is 1..KS_UUID_MAX bytes; its length into *ulen. */
int ks_uuid_valid(const char *uuid, size_t *ulen);

/* Reads and unpacks the record key_id through ro (NULL: shared options);
 * *out is the caller's. KMS_ENOTFOUND (err untouched), KMS_ECORRUPT, KMS_ESTORE. */
int ks_record_read(struct kms_store *s, const rocksdb_readoptions_t *ro, const uint8_t *id,
                   Kmsd__V1__SealedRecord **out, struct kms_err *err);

/* ---- store_scan.c: the key-range walk (any thread) ------------------------ */

/* One key of a walk: k and v point into the iterator and are valid during
 * the callback only; ro is what the walk reads through (for point reads
 * that must see the same state). */
struct ks_item {
    const rocksdb_readoptions_t *ro;
    const char *k;
    size_t klen;
    const char *v;
    size_t vlen;
};

typedef int (*ks_scan_cb)(void *arg, const struct ks_item *item, struct kms_err *err);

/* A scan callback's "stop here" for walks that end early without an error;
 * the walker that returns it maps it to 0 (ks_scan returns it as any other
 * nonzero result). */
#define KS_SCAN_STOP 1

/* Walks, in key order, the keys that start with prefix[0..plen) (every key
 * when plen is 0), from start[0..slen) (the prefix itself when start is
 * NULL), through ro (the store's shared read options when NULL), calling cb
 * for each. The first nonzero cb result ends the walk and is returned as is.
 * Otherwise 0, KMS_ENOMEM, or KMS_ESTORE for an iterator error. */
int ks_scan(struct kms_store *s, const rocksdb_readoptions_t *ro, const void *prefix,
            size_t plen, const void *start, size_t slen, ks_scan_cb cb, void *arg,
            struct kms_err *err);

/* ks_scan over a fresh RocksDB snapshot (released before it returns), so the
 * walk never sees half of an entry: the readers' walk. */
int ks_scan_view(struct kms_store *s, const void *prefix, size_t plen, const void *start,
                 size_t slen, ks_scan_cb cb, void *arg, struct kms_err *err);

/* The value of a walked 'R' key unpacked into *r (the caller's);
 * KMS_ECORRUPT when it does not parse. */
int ks_item_record(struct kms_store *s, const struct ks_item *item, Kmsd__V1__SealedRecord **r,
                   struct kms_err *err);

/* The record a walked node index key ('U' uuid '\0' key_id, prefix plen
 * bytes) names, read through the walk's ro into *r (the caller's).
 * KMS_ECORRUPT for a key of the wrong length, or for a missing record unless
 * skip_missing (then 0 with *r NULL). */
int ks_item_indexed(struct kms_store *s, const struct ks_item *item, size_t plen,
                    bool skip_missing, Kmsd__V1__SealedRecord **r, struct kms_err *err);

/* ---- store_apply.c: one entry being applied (raft thread only) ------------ */

struct ks_apply {
    struct kms_store *s;
    rocksdb_writebatch_t *wb;
    struct kms_store_result *res;
    uint64_t index;
    int64_t count_delta;
    struct kms_err *err;
    const ProtobufCBinaryData *rekey_wrap; /* published once the batch is written */
};

/* Sets the entry's result (code, count, message): a refused op is a result,
 * not an error. */
void ks_result(struct ks_apply *c, int code, uint64_t count, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Packs a protobuf message into a malloc()ed buffer (the caller's). */
int ks_pack(const ProtobufCMessage *m, uint8_t **buf, size_t *len, struct kms_err *err);

/* Applies one entry into a caller-provided result (snapshot.c's fsm apply
 * uses the store's own). Fatal errors are made sticky. */
int ks_apply_into(struct kms_store *s, uint64_t index, const void *buf, size_t len,
                  struct kms_store_result *res, struct kms_err *err);

/* Live records (not revoked, holding ciphertext) on term (store_read.c). */
int ks_records_on_term(struct kms_store *s, uint32_t term, uint64_t *n, struct kms_err *err);

/* ---- store_keyring.c: the keyring and peer unseal gate ops ---------------- */

int ks_op_put_keyring(struct ks_apply *c, const Kmsd__V1__PutKeyring *op);
int ks_op_rekey_keyring(struct ks_apply *c, const Kmsd__V1__RekeyKeyring *op);
int ks_op_retire_term(struct ks_apply *c, const Kmsd__V1__RetireTerm *op);
int ks_op_set_peer_gate(struct ks_apply *c, const Kmsd__V1__SetPeerUnsealGate *op);

#endif /* KMS_STORE_INTERNAL_H */
