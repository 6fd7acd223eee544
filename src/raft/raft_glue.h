/*
 * raft_glue: the only place that reads or writes libraft's internals
 * (struct raft fields, raft_io hooks, the vote rule). Written against
 * cowsql/raft 0.22.1 (Debian libraft-dev 0.22.1-1~bpo12+1); every function
 * says which field it touches. Re-read each of them on a library upgrade:
 * CMake refuses raft < 0.22, but a newer 0.x may move a field.
 *
 * Only node.c includes this header. Everything here runs on the raft
 * thread (the thread running the loop that owns the struct raft).
 */
#ifndef KMS_RAFT_GLUE_H
#define KMS_RAFT_GLUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <raft.h>
#include <uv.h>

#define KMS_GLUE_DEFER_MAX 64
#define KMS_GLUE_HOLD_MAX 8

/* Decides whether a message passes: false drops it. For a dropped send the
 * glue reports success to raft on the next loop iteration, as if the
 * network had lost it. */
typedef bool (*kms_glue_filter_cb)(void *data, const struct raft_message *m);

/* Owns the raft_io (raft_uv_init fills it, the glue wraps start and send).
 * Embedded in struct kms_raft; must not move once wrapped. */
struct kms_glue {
    struct raft_io io;
    void *data;
    kms_glue_filter_cb recv_filter_cb; /* NULL = pass all */
    kms_glue_filter_cb send_filter_cb;
    void (*after_recv_cb)(void *data);  /* after raft processed a message */
    /* A log append failed (disk error). raft 0.22.1 cannot recover from
     * that (legacyPersistEntriesCb asserts the failure is a cancel at
     * close, and the node crashes later inside raft_apply): the glue does
     * not hand the failure to raft but reports it here, once. */
    void (*io_error_cb)(void *data, int status, const char *errmsg);
    int (*append_orig)(struct raft_io *, struct raft_io_append *, const struct raft_entry[],
                       unsigned, raft_io_append_cb);
    bool io_failed;
    struct raft *raft;           /* set by node.c after raft_init */
    uint64_t installs_dropped;   /* InstallSnapshot racing our own snapshot */
    int (*start_orig)(struct raft_io *, unsigned, raft_io_tick_cb, raft_io_recv_cb);
    raft_io_recv_cb recv_orig;
    int (*send_orig)(struct raft_io *, struct raft_io_send *, const struct raft_message *,
                     raft_io_send_cb);
    uv_timer_t defer_timer;      /* fires dropped sends' callbacks */
    bool defer_init;
    struct {
        struct raft_io_send *req;
        raft_io_send_cb cb;
    } defer[KMS_GLUE_DEFER_MAX];
    size_t n_defer;
    uv_timer_t hold_timer;       /* re-delivers held vote requests */
    struct {
        struct raft_message m;   /* a RequestVote: no buffers */
        char address[256];       /* m.server_address points here */
        uint64_t due_ms;         /* uv_now() to re-deliver at */
    } hold[KMS_GLUE_HOLD_MAX];
    size_t n_hold;
};

/* Wraps g->io.start and g->io.send (call after raft_uv_init, before
 * raft_init) and initialises the defer timer on `loop`. */
void kms_glue_io_wrap(struct kms_glue *g, uv_loop_t *loop, void *data,
                      kms_glue_filter_cb recv_filter, kms_glue_filter_cb send_filter,
                      void (*after_recv)(void *data),
                      void (*io_error)(void *data, int status, const char *errmsg));
/* Keeps a copy of an incoming RequestVote the recv filter just refused and
 * passes it through the filter (and to raft) again `delay_ms` from now:
 * a vote request that arrives a few milliseconds before this node's
 * promise ends is not lost for a whole election round. Full = forgotten. */
void kms_glue_hold_vote(struct kms_glue *g, const struct raft_message *m, unsigned delay_ms);

/* Closes the defer timer (after raft closed the io); fires pending
 * callbacks with RAFT_CANCELED first. */
void kms_glue_io_close(struct kms_glue *g);

/* enum kms_raft_role of raft_state(). */
int kms_glue_role(struct raft *raft);
/* raft->current_term, raft->commit_index. */
uint64_t kms_glue_term(const struct raft *raft);
uint64_t kms_glue_commit(const struct raft *raft);
/* Follower: raft->follower_state.current_leader.id (0 otherwise). */
uint64_t kms_glue_follower_leader(const struct raft *raft);
/* Follower: forget the leader (current_leader.id = 0; raft keeps and
 * later frees the address), so raft's vote rule ("reject while a leader is
 * known", recv_request_vote.c) considers a vote. kmsd's own promise rule
 * (lease.h) decides when that is allowed. */
void kms_glue_forget_leader(struct raft *raft);
/* raft->transfer != NULL (legacy layer: a leadership transfer pending). */
bool kms_glue_transfer_pending(const struct raft *raft);

/* raft->configuration: voter ids (up to max), returns how many. */
size_t kms_glue_voters(const struct raft *raft, uint64_t *ids, size_t max);
/* raft->configuration: number of servers. */
size_t kms_glue_n_members(const struct raft *raft);
/* raft->configuration.servers[i]: id, address, kms member role. */
bool kms_glue_member_at(const struct raft *raft, size_t i, uint64_t *id, const char **address,
                        int *role);
/* raft->configuration lookup by id; address/role may be NULL. */
bool kms_glue_member_find(const struct raft *raft, uint64_t id, const char **address, int *role);

/* RequestVote fields of a message: false if it is not one. */
bool kms_glue_msg_vote(const struct raft_message *m, uint64_t *term, bool *pre_vote,
                       bool *disrupt);

/* An incoming InstallSnapshot while this node takes its own snapshot:
 * raft 0.22.1 parks the install until the snapshot completes and then
 * crashes (NULL dereference; reproduced with raft's own TCP transport,
 * tests/unit/test_raft_transport.c KMS_TEST_SNAP3). True when `m` is such
 * a message; the caller drops it (the leader sends it again) after
 * kms_glue_msg_release() frees what raft would have taken over. */
bool kms_glue_install_races_snapshot(struct raft *raft, const struct raft_message *m);
void kms_glue_msg_release(struct raft_message *m);

/* AppendEntries / InstallSnapshot (a leader's message): its term. */
bool kms_glue_msg_from_leader(const struct raft_message *m, uint64_t *term);

#endif /* KMS_RAFT_GLUE_H */
