/*
 * kms_raft: the raft node (cowsql/raft 0.22 on libuv).
 *
 * This header does not include <raft.h>: the library's types and internals
 * stay inside src/raft (raft_glue.c is the only file that reads struct raft).
 *
 * One dedicated thread (the "raft thread") runs a libuv loop that owns the
 * struct raft, its disk I/O (raft_uv), the transport (mutual TLS, or plain
 * TCP for tests) and the state machine callbacks (the store). No other thread
 * ever touches struct raft: callers hand requests to the raft thread through a
 * mutex-protected queue plus a uv_async_t and wait on a per-request condition
 * variable with a timeout.
 *
 * Read lease (docs/architecture.md "Read leases"): computed on the raft thread (after every received
 * message and on a 25 ms timer) and published as a monotonic deadline in an
 * atomic, so kms_raft_lease_valid() is lock-free.
 *
 * All functions are thread-safe. Return values are 0 or a negative KMS_E*.
 */
#ifndef KMS_RAFT_H
#define KMS_RAFT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kmsd/v1/entry.pb-c.h"
#include "kms_err.h"

struct kms_store;
struct kms_raft;

/* Node roles (kms_raft_status.role). */
enum kms_raft_role {
    KMS_RAFT_UNAVAILABLE = 0,
    KMS_RAFT_FOLLOWER = 1,
    KMS_RAFT_CANDIDATE = 2,
    KMS_RAFT_LEADER = 3,
};

/* Member roles (kms_raft_status.members[].role). */
enum kms_raft_member_role {
    KMS_RAFT_STANDBY = 0,
    KMS_RAFT_VOTER = 1,
    KMS_RAFT_SPARE = 2,
};

struct kms_raft_peer {
    uint64_t id;
    char address[256];
};

struct kms_raft_config {
    uint64_t id;                  /* > 0 */
    const char *data_dir;         /* raft log and snapshots in <data_dir>/raft */
    const char *raft_address;     /* advertised host:port */
    const char *bind_address;     /* NULL = raft_address */
    /* Identical on each first node. A node listed here bootstraps the
     * configuration when <data_dir>/raft holds no raft state yet. Empty (or
     * not listing this node) = start empty and wait to be added. */
    const struct kms_raft_peer *initial_cluster;
    size_t n_initial;
    unsigned election_timeout_ms;  /* 0 = 1000 */
    unsigned heartbeat_timeout_ms; /* 0 = 100 */
    uint64_t snapshot_threshold;   /* 0 = 8192 */
    uint64_t snapshot_trailing;    /* 0 = 2048 */
    /* Mutual-TLS transport (kms_transport_tls_init). All NULL = plain TCP
     * (raft_uv_tcp), for tests only. */
    const char *cert_file, *key_file, *ca_file;
    /* Optional: lease_cb(lease_arg) runs on the raft thread right after
     * each publication of a valid read lease (after every received message
     * and every 25 ms tick while the node holds one), so that threads
     * waiting for kms_raft_lease_deadline_ms() != 0 can be woken instead of
     * polling. Called often: it must not block (a short mutex at most) and
     * must not call kms_raft_*. Runs until kms_raft_shutdown() returns. */
    void (*lease_cb)(void *arg);
    void *lease_arg;
};

/* Validates cfg, opens the raft log, bootstraps when appropriate and spawns
 * the raft thread. The store must stay open until kms_raft_stop() returns.
 * Ignores SIGPIPE process-wide (a dying peer must not kill this process). */
int kms_raft_start(const struct kms_raft_config *cfg, struct kms_store *store,
                   struct kms_raft **out, struct kms_err *err);

/* If leader with other voters: releases the read leases and transfers
 * leadership first (about one election timeout for the release plus raft's
 * transfer), then closes raft and joins the thread. Pending requests fail
 * with KMS_ESHUTDOWN / KMS_EUNAVAIL. r stays allocated: every kms_raft_*
 * call made afterwards (from threads still running) fails fast with
 * KMS_ESHUTDOWN or reports the last published status, so callers' threads
 * may outlive it; free r with kms_raft_free() once they are gone. If raft's
 * close does not complete within election timeout + 10 s the error is
 * logged and r is left allocated for good (the thread may still run). The
 * store may be closed only after kms_raft_free(). NULL is a no-op. */
void kms_raft_shutdown(struct kms_raft *r);

/* Frees r after kms_raft_shutdown() (no-op, logged, if it did not finish).
 * No other thread may be inside or enter a kms_raft_* call. NULL is a
 * no-op. */
void kms_raft_free(struct kms_raft *r);

/* True once a raft log write failed (disk error): the node then holds no
 * lease, refuses requests, and has sent SIGTERM to its own process so that
 * it stops; the caller should exit non-zero. Any thread. */
bool kms_raft_failed(struct kms_raft *r);

/* kms_raft_shutdown() then kms_raft_free(): for single-threaded callers. */
void kms_raft_stop(struct kms_raft *r);

struct kms_raft_result {
    uint64_t index;              /* log index of the entry (0 if never appended) */
    int code;                    /* store apply result (0 or KMS_E*) */
    uint64_t count;              /* store-defined counter from the apply result */
    char msg[128];               /* store apply message */
    uint64_t leader_id;          /* on KMS_ENOTLEADER: known leader, 0 if none */
    char leader_address[256];
};

/* Blocking proposal. The entry's version (and, from version 2, its
 * proposer_id) are set here, whatever e says: the highest version every
 * member of the configuration advertises, and never lower than the highest
 * version the store already applied (once emitted, a version stays).
 * Returns:
 *   0               committed and applied on this (leader) node; res->code is
 *                   the store's apply result, res->index the log index;
 *   KMS_ENOTLEADER  this node is not leader; res->leader_id/leader_address
 *                   name the known leader (0/"" while unknown);
 *   KMS_ETIMEDOUT   no answer within timeout_ms: the entry may or may not
 *                   commit later;
 *   KMS_EUNAVAIL    leadership lost while in flight: the entry may or may not
 *                   commit later (never reported as committed);
 *   KMS_ESHUTDOWN, KMS_EINVAL, KMS_ENOMEM, KMS_ERAFT. */
int kms_raft_propose(struct kms_raft *r, const Kmsd__V1__Entry *e, unsigned timeout_ms,
                     struct kms_raft_result *res, struct kms_err *err);

/* Waits until this node has applied `index` (read-your-writes after a
 * forwarded proposal). 0 or KMS_ETIMEDOUT (KMS_ESHUTDOWN when stopping). */
int kms_raft_wait_applied(struct kms_raft *r, uint64_t index, unsigned timeout_ms);

/* Read index. Blocks (never call it on the raft thread) until this node
 * knows a commit index that a leader holding its lease had reached at or
 * after `since_us` (kms_mono_us() of this host) and stores it in *index:
 * every write acknowledged anywhere before since_us has an index <= *index.
 * On the leader that is its own commit index at its next lease computation;
 * on a follower, the commit index of a leader stamp that echoes a frame
 * this node sent at or after since_us (one heartbeat round trip). Then
 * kms_raft_wait_applied(*index) makes a local read as fresh as since_us.
 * 0, KMS_ETIMEDOUT or KMS_ESHUTDOWN. */
int kms_raft_read_index(struct kms_raft *r, uint64_t since_us, unsigned timeout_ms,
                        uint64_t *index);

/* Lock-free. True when this node may serve a local read now:
 *  - leader: heard (AppendEntries result in the current term) from a majority
 *    of voters, itself included, within the election timeout, and no
 *    leadership transfer is in progress;
 *  - follower: heard (AppendEntries/InstallSnapshot in the current term) from
 *    the current leader within the election timeout, and applied through the
 *    highest commit index that leader announced. */
bool kms_raft_lease_valid(struct kms_raft *r);

/* Lock-free. The end of the current read lease on CLOCK_MONOTONIC in
 * milliseconds (kms_mono_ms()), 0 when there is none. A local read is
 * fresh only if it *finished* before this deadline: take the deadline,
 * check kms_mono_ms() < deadline, do the read, then check again against
 * the same deadline; a lease renewed meanwhile does not count (the read
 * may have used state from before the renewal). */
uint64_t kms_raft_lease_deadline_ms(struct kms_raft *r);

struct kms_raft_status {
    uint64_t id, leader_id, term, commit_index, applied_index;
    int role;                    /* enum kms_raft_role */
    char leader_address[256];
    size_t n_members;
    struct {
        uint64_t id;
        char address[256];
        int role;                /* enum kms_raft_member_role */
    } members[16];
    bool lease;
    uint64_t last_leader_contact_ms; /* ms since last leader contact (0 on the leader) */
    /* extras */
    uint64_t last_index;             /* last log index */
    uint64_t snapshot_index;         /* index of the last snapshot taken/installed */
    uint64_t snapshots_restored;     /* snapshots installed from the leader since start */
    uint64_t elections_won;          /* times this node became leader since start */
    /* Entry versions (docs/operations.md "Upgrades"): the one this node
     * stamps on the entries it proposes as leader now, and per member the
     * highest one it advertised in its raft transport stamps (0 = not heard
     * from yet: counted as 1; a kmsd without the advertisement counts 1). */
    uint32_t entry_version;
    uint32_t member_entry_version[16]; /* parallel to members[] */
    uint64_t elections_started;      /* times this node stood for election since start */
    uint64_t leader_changes;         /* times the known leader changed (to another
                                        node or to none) since start */
};

/* Status computed on the raft thread now (waits up to 500 ms for it); when
 * the raft thread is busy or stopped, the copy it published at its last
 * 25 ms tick. The lease flag is evaluated at return. Always 0. */
int kms_raft_status(struct kms_raft *r, struct kms_raft_status *st);

/* Lower-case names for status output: KMS_RAFT_LEADER/FOLLOWER/CANDIDATE
 * ("unavailable" otherwise) and KMS_RAFT_VOTER/STANDBY/SPARE ("unknown"
 * otherwise). Static strings. */
const char *kms_raft_role_name(int role);
const char *kms_raft_member_role_name(int role);

/* Leader only (else KMS_ENOTLEADER, the message naming the leader). Adds the
 * server as a spare, then assigns it the voter role: canonical raft catches it
 * up before the promotion commits. Idempotent: an existing spare/standby is
 * promoted, an existing voter at the same id succeeds. Blocking. */
int kms_raft_add(struct kms_raft *r, uint64_t id, const char *address, unsigned timeout_ms,
                 struct kms_err *err);

/* Leader only. Removes the server from the configuration (KMS_ENOTFOUND if
 * it is not a member). Blocking until the change commits. */
int kms_raft_remove(struct kms_raft *r, uint64_t id, unsigned timeout_ms, struct kms_err *err);

/* Leader only. Transfers leadership to `id` (0 = a caught-up voter chosen by
 * raft) and waits until another node leads: 0 when it does (the new leader
 * is in kms_raft_status), KMS_ETIMEDOUT otherwise. */
int kms_raft_transfer(struct kms_raft *r, uint64_t id, unsigned timeout_ms,
                      struct kms_err *err);

/* Re-reads the certificate, key and CA files given at start into the raft
 * transport (SIGHUP): new connections use them, open ones keep theirs. On
 * failure the old material stays. KMS_ETLS for unreadable/invalid files. */
int kms_raft_reload_tls(struct kms_raft *r, struct kms_err *err);

/* Lost-quorum recovery (offline: kmsd must not be running on data_dir).
 * Appends to the raft log in <data_dir>/raft a configuration entry holding
 * exactly `members` (all voters; it must include self_id), with
 * libraft's raft_recover(). The next kms_raft_start() on data_dir uses it:
 * entries this node never received are lost, and every member not listed
 * must be wiped before it talks to this node again. Run it once, on one
 * node. KMS_ENOTFOUND when data_dir holds no raft state, KMS_EINVAL,
 * KMS_ERAFT. Single-threaded callers (main). */
int kms_raft_recover(const char *data_dir, uint64_t self_id, const struct kms_raft_peer *members,
                     size_t n_members, struct kms_err *err);

#endif /* KMS_RAFT_H */
