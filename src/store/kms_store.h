/*
 * kms_store: the RocksDB state machine that raft log entries are applied to.
 *
 * Layout (one column family, one-byte key prefixes; see docs/architecture.md
 * "State machine and durability"):
 *   'R' key_id[16]                 -> packed kmsd.v1.SealedRecord
 *   'U' node_uuid '\0' key_id[16]  -> empty (index to list/revoke by UUID)
 *   'M' u64be(member id)           -> packed kmsd.v1.Member
 *   "Kkeyring"                     -> packed kmsd.v1.EncryptedKeyring
 *   "Kpeer_unseal_gate"            -> packed kmsd.v1.PeerUnsealGate (absent:
 *                                     never closed; docs/security.md)
 *   "Xapplied"                     -> u64be applied raft index
 *   "Xcount"                       -> u64be number of records
 *   "Xrestoring"                   -> u64be, present only while a snapshot
 *                                     restore is half-way (crash marker)
 *   "Xentryver"                    -> u64be highest Entry.version this data
 *                                     dir has applied (absent: only 1); an
 *                                     older kmsd that finds it above its own
 *                                     KMS_ENTRY_VERSION refuses to open
 *
 * Threads. Exactly one thread writes: the raft thread, through
 * kms_store_apply(), kms_store_restore() and the raft_fsm callbacks. Every
 * read function (record_get, records_list, keyring_get, members_list,
 * applied_index, count, digest, snapshot) may be called from any number of
 * threads concurrently with that writer. kms_store_close() must not race with
 * anything.
 *
 * Memory. Objects returned through `**out` parameters are protobuf-c messages
 * unpacked with the default allocator: the caller owns them and releases them
 * with the matching kmsd__v1__*__free_unpacked(p, NULL). Pointers handed to
 * callbacks are owned by the store and valid only during the callback.
 *
 * Errors. Functions return 0 or a negative KMS_E* code and fill `err` (may be
 * NULL). RocksDB failures are KMS_ESTORE with a message naming the DB path.
 */
#ifndef KMS_STORE_H
#define KMS_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct raft_buffer; /* <raft.h>: framing and snapshots are raft_malloc()ed buffers */

#include "kms_err.h"
#include "kmsd/v1/entry.pb-c.h"
#include "kmsd/v1/record.pb-c.h"

/* ---- raft log entry framing (proto/README.md) ----------------------- */

#define KMS_ENTRY_VERSION 2          /* highest Entry.version understood */
#define KMS_ENTRY_FRAME_VERSION 1    /* framing header version */
#define KMS_ENTRY_HEADER_LEN 8
#define KMS_ENTRY_MAX_PAYLOAD (16u * 1024u * 1024u)

/* Frames e: "KE", 1, 0, u32le payload length, packed Entry, zero padding to
 * a multiple of 8 bytes. out->base is allocated with raft_malloc() so it can
 * be handed straight to raft_apply() (which takes ownership); if the caller
 * does not hand it to raft, it releases it with raft_free(). On error out is
 * left {NULL, 0}. Refuses (KMS_EINVAL) an entry without an op or with a
 * version other than 1..KMS_ENTRY_VERSION, so such entries never reach the log. */
int kms_entry_encode(const Kmsd__V1__Entry *e, struct raft_buffer *out, struct kms_err *err);

/* Lowest Entry.version that may carry op c: 2 for the ops added after the
 * first release (a v0.1.0 member would stop on them), 1 otherwise. The
 * raft node refuses to propose an op above the version it emits, so such
 * an op is written only once every member advertises version 2
 * (docs/operations.md "Upgrades"). Pure; any thread. */
uint32_t kms_entry_op_min_version(Kmsd__V1__Entry__OpCase c);

/* Parses a framed entry. Bad magic/framing version/reserved byte/length/
 * non-zero padding or an unparsable payload: KMS_ECORRUPT. Entry.version
 * above KMS_ENTRY_VERSION (or 0): KMS_EVERSION. Known version but no known op:
 * KMS_ECORRUPT. On success *out is owned by the caller
 * (kmsd__v1__entry__free_unpacked(*out, NULL)); buf is not retained. */
int kms_entry_decode(const void *buf, size_t len, Kmsd__V1__Entry **out, struct kms_err *err);

/* ---- open / close ---------------------------------------------------- */

struct kms_store;

/* Opens (creating if missing) the RocksDB database in directory `dir` (its
 * parent must exist). *out is owned by the caller until kms_store_close(). */
int kms_store_open(const char *dir, struct kms_store **out, struct kms_err *err);

/* Opening a data dir whose "Xentryver" marker is above KMS_ENTRY_VERSION
 * (it applied entries of a newer kmsd: a downgrade past an entry version)
 * fails with KMS_EVERSION and a message saying so; nothing is changed. */

/* Highest Entry.version this store has applied (1 when no entry above 1
 * was ever applied). Any thread. */
uint32_t kms_store_entry_version(struct kms_store *s);

/* Flushes the memtable (so the next open has no WAL to replay) and closes.
 * NULL is accepted. No other call on s may be running or follow. */
void kms_store_close(struct kms_store *s);

/* ---- applying entries -------------------------------------------------- */

/* Per-op outcome of one applied entry. Op errors (duplicate key, unknown key,
 * not initialised...) are results, identical on every node, not failures. */
struct kms_store_result {
    int code;       /* 0 or KMS_E*: KMS_EEXIST, KMS_ENOTFOUND, KMS_EUNINIT, ... */
    uint64_t count; /* records written/revoked/touched by the op */
    char msg[128];  /* human-readable outcome, may be empty */
    bool skipped;   /* index was already applied (replay): nothing done */
    bool shred;     /* a revocation removed ciphertext (or, when skipped, the
                     * replayed entry is a revocation): old copies of it are
                     * still in the RocksDB files and the raft log until
                     * kms_store_shred_compact() and new raft snapshots */
};

/* Releases a result returned by kms_store_apply(). NULL is accepted. */
void kms_store_result_free(struct kms_store_result *r);

/* Applies the framed entry buf/len at raft index `index`. Deterministic and
 * idempotent: when index <= kms_store_applied_index(s) nothing is done and
 * the result has skipped = true. Otherwise the entry's state changes and the
 * new applied index are written in ONE RocksDB WriteBatch (WAL, no fsync).
 *
 * Returns 0 with *result (heap, caller frees with kms_store_result_free())
 * whenever the entry was applied or skipped, whatever the op's outcome.
 * Returns a negative code, *result = NULL, on a fatal error: KMS_EVERSION
 * (entry from newer software), KMS_ECORRUPT (bad frame, unknown op, corrupt
 * stored value), KMS_ESTORE (RocksDB), KMS_ENOMEM. The message names the
 * index. A fatal error is sticky: every later apply/restore fails with it, so
 * the node stops instead of skipping an entry. buf is not retained. */
int kms_store_apply(struct kms_store *s, uint64_t index, const void *buf, size_t len,
                    struct kms_store_result **result, struct kms_err *err);

/* Rekey (entry RekeyKeyring, docs/security.md "Rekey"): applying it replaces
 * the keyring (same cluster id and active term, new share count and
 * threshold) and sets result->shred, like a revocation, so the entry, which
 * carries the new root key wrapped under the old one, leaves the raft log
 * and snapshots within seconds; a replayed one sets result->shred too. The
 * wrapped root key is kept only in memory, for this process's daemon to
 * switch root keys while unsealed: kms_store_rekey_wrap_take copies out the
 * latest one (*len = 0 when there is none) and wipes it; *index receives the
 * raft index it came with. Any thread. */
void kms_store_rekey_wrap_take(struct kms_store *s, uint8_t *out, size_t cap, size_t *len,
                               uint64_t *index);

/* Revocation shreds (docs/security.md "Revocation"): applying RevokeKey or
 * RevokeNode rewrites each record without its nonce and ciphertext (key id,
 * node uuid, term, timestamps and revoked_at stay for audit) and sets
 * result->shred. The old value still sits in the memtable/WAL and SST files
 * until this is called: it flushes the memtable (the WAL becomes obsolete
 * and is deleted) and force-compacts the whole record key range, bottommost
 * level included, so the superseded values are dropped and their files
 * deleted. A RocksDB snapshot older than the revocation (a raft snapshot
 * being serialised) keeps the old version alive: call it when none is
 * pinned. Any thread, concurrently with applies; takes milliseconds to
 * seconds depending on the size of the store. */
int kms_store_shred_compact(struct kms_store *s, struct kms_err *err);

/* The sticky fatal error, if any: returns 0 when none, else its code and
 * copies its message into err. */
int kms_store_fatal(struct kms_store *s, struct kms_err *err);

/* ---- reads (any thread) -------------------------------------------------- */

/* The record stored under key_id (16 bytes). KMS_ENOTFOUND if none. */
int kms_store_record_get(struct kms_store *s, const uint8_t key_id[16],
                         Kmsd__V1__SealedRecord **out, struct kms_err *err);

/* Calls cb for every record (node_uuid NULL), or every record of that node
 * UUID, in key order, from one consistent RocksDB snapshot. cb returns 0 to
 * go on; a non-zero return stops the walk and is returned. */
int kms_store_records_list(struct kms_store *s, const char *node_uuid,
                           int (*cb)(void *arg, const Kmsd__V1__SealedRecord *r), void *arg,
                           struct kms_err *err);

/* Counts the live (not revoked) records of node_uuid, stopping at max (the
 * walk is bounded: one index entry and one point read per record, at most
 * max live ones). From one consistent RocksDB snapshot. */
int kms_store_records_count_live(struct kms_store *s, const char *node_uuid, uint64_t max,
                                 uint64_t *live, struct kms_err *err);

/* Same, starting strictly after key id `after` (16 bytes; NULL = from the
 * first): the walk seeks there, so paging costs O(page). */
int kms_store_records_list_after(struct kms_store *s, const char *node_uuid,
                                 const uint8_t *after,
                                 int (*cb)(void *arg, const Kmsd__V1__SealedRecord *r),
                                 void *arg, struct kms_err *err);

/* Live records (not revoked, holding ciphertext) whose term is `term`: a
 * full walk of the records (retire-term's check; O(records)). Any thread. */
int kms_store_records_on_term(struct kms_store *s, uint32_t term, uint64_t *n,
                              struct kms_err *err);

/* The replicated (encrypted) keyring. KMS_EUNINIT if the cluster has none. */
int kms_store_keyring_get(struct kms_store *s, Kmsd__V1__EncryptedKeyring **out,
                          struct kms_err *err);

/* The peer unseal gate (SetPeerUnsealGate entries). KMS_ENOTFOUND when it
 * was never closed. */
int kms_store_peer_gate_get(struct kms_store *s, Kmsd__V1__PeerUnsealGate **out,
                            struct kms_err *err);

/* Calls cb for every member (by id), same contract as records_list. */
int kms_store_members_list(struct kms_store *s,
                           int (*cb)(void *arg, const Kmsd__V1__Member *m), void *arg,
                           struct kms_err *err);

/* Raft index of the last applied entry (0: nothing). While a snapshot restore
 * is half-way it is 0 and kms_store_restoring() is true: the contents are
 * then incomplete and must not be served. */
uint64_t kms_store_applied_index(struct kms_store *s);
bool kms_store_restoring(struct kms_store *s);

/* Number of sealed records (revoked ones included). */
uint64_t kms_store_count(struct kms_store *s);

/* SHA-256 over every stored key/value except the applied index, from one
 * consistent snapshot: equal on two nodes iff their states are equal. */
int kms_store_digest(struct kms_store *s, uint8_t out[32], struct kms_err *err);

/* ---- snapshots (used by the fsm glue; public for tests and tools) ------- */

/* Serialises a consistent RocksDB snapshot of the whole state into raft
 * buffers: a 72-byte header (magic "KS", version 1, raft_index, the store's
 * applied index, entry count, body length, SHA-256 of the body) then entries
 * {u32le klen, u32le vlen, key, value, zero pad to 8}. Every buffer length is
 * a multiple of 8. *bufs and every bufs[i].base are raft_malloc()ed and owned
 * by the caller: release with kms_store_snapshot_free(). raft_index is the
 * raft index the snapshot is taken at (>= the store's applied index; 0 means
 * "use the applied index"). */
int kms_store_snapshot(struct kms_store *s, uint64_t raft_index, struct raft_buffer **bufs,
                       unsigned *n_bufs, struct kms_err *err);
void kms_store_snapshot_free(struct raft_buffer *bufs, unsigned n_bufs);

/* Replaces the whole state with a snapshot (the concatenation of the
 * buffers kms_store_snapshot produced). If the snapshot's applied index is <=
 * the store's applied index the DB already holds that state (or a later one)
 * and nothing is done (*skipped = true). Otherwise the snapshot is verified
 * in full first, then the old state is deleted (range deletes) and the new
 * written in batches with a "restoring" marker; the final batch writes the
 * applied index and drops the marker. buf is not retained nor freed.
 * skipped may be NULL. Sticky fatal errors apply as for kms_store_apply. */
int kms_store_restore(struct kms_store *s, const void *buf, size_t len, bool *skipped,
                      struct kms_err *err);

/* ---- the raft fsm's store side ------------------------------------------
 * The raft_fsm is implemented once, in src/raft/node.c; these are the store
 * operations it calls. Raft thread only, except kms_store_snapshot_pinned. */

/* kms_store_apply() with the result owned by the store: valid until the
 * next call, never freed by the caller (the raft apply callback copies it
 * right after apply returns). */
int kms_store_apply_borrowed(struct kms_store *s, uint64_t index, const void *buf, size_t len,
                             const struct kms_store_result **result, struct kms_err *err);

/* Pins a RocksDB snapshot of the current state, recorded as raft index
 * `index` (the state is at that index: apply is synchronous). One at a
 * time: KMS_EBUSY while one is pinned. */
int kms_store_snapshot_pin(struct kms_store *s, uint64_t index, struct kms_err *err);

/* Any thread (raft's io worker): serialises the pinned snapshot
 * (kms_store_snapshot format). Reads only, concurrent with applies. */
int kms_store_snapshot_pinned(struct kms_store *s, struct raft_buffer **bufs, unsigned *n_bufs,
                              struct kms_err *err);

/* Releases the pinned snapshot, if any. */
void kms_store_snapshot_unpin(struct kms_store *s);

/* ---- streaming export (online backups; export.c) -------------------------
 * A consistent point-in-time copy read in bounded chunks: open pins a
 * RocksDB snapshot (applies go on meanwhile), next fills buf with the
 * following entries in key order, in the snapshot body encoding above
 * ({u32le klen, u32le vlen, key, value, zero pad to 8}, 'X' meta keys left
 * out), close releases it. Any thread, but one thread at a time per export;
 * the store must outlive the export. */
struct kms_store_export;

/* KMS_EBUSY while a snapshot restore is half-way. *out owned by the caller
 * until kms_store_export_close(). */
int kms_store_export_open(struct kms_store *s, struct kms_store_export **out,
                          struct kms_err *err);

/* The applied raft index of the pinned state. */
uint64_t kms_store_export_applied(const struct kms_store_export *x);

/* Appends whole entries to buf (cap bytes, >= 8 + the largest entry) and
 * sets *used, *entries, and *done once no entry follows (then the chunk may
 * still hold entries). KMS_ERANGE for an entry larger than cap. */
int kms_store_export_next(struct kms_store_export *x, uint8_t *buf, size_t cap, size_t *used,
                          uint64_t *entries, bool *done, struct kms_err *err);

/* NULL is a no-op. */
void kms_store_export_close(struct kms_store_export *x);

/* ---- backup files (backup.c; format in docs/operations.md) ------------- */

#define KMS_BACKUP_MAX_TERMS 256

struct kms_backup_info {
    char cluster_id[64];   /* hex, from the header */
    char created[64];
    uint64_t index, node;  /* applied raft index of the copy, replica that took it */
    uint32_t active_term, share_count, threshold;
    uint64_t entries, records, revoked, members;
    uint64_t per_term[KMS_BACKUP_MAX_TERMS]; /* records per keyring term */
    bool has_keyring;
    size_t body_offset, body_len;
};

/* Checks the whole file at path: header, end marker (truncation), SHA-256
 * (alteration), every entry, entry count; fills info. cb (may be NULL) is
 * called for every entry in order after the checksum matched; a non-zero
 * return stops and is returned. KMS_EIO, KMS_EFORMAT (not a snapshot file),
 * KMS_ECORRUPT (truncated, altered, damaged), each naming the file. */
int kms_backup_verify(const char *path, struct kms_backup_info *info,
                      int (*entry_cb)(void *arg, const uint8_t *k, size_t klen, const uint8_t *v,
                                      size_t vlen),
                      void *arg, struct kms_err *err);

/* Offline restore (kmsd restore): verifies the file, then writes every
 * entry except member metadata into the EMPTY store s (else KMS_EEXIST)
 * and the record count. The applied index stays 0: a new cluster whose
 * members all load the same file starts its raft log on top of it. A
 * verification error found half-way leaves a partial store: the caller
 * discards the directory. */
int kms_backup_load(struct kms_store *s, const char *path, struct kms_backup_info *info,
                    struct kms_err *err);

/* The 8-byte trailer magic writers put before the entry count. */
const uint8_t *kms_backup_trailer_magic(void);

#endif /* KMS_STORE_H */
