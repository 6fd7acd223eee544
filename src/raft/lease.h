/*
 * lease: the read-lease and vote-promise rules of kmsd, as a pure state
 * machine over recorded events. No clock is read and no raft type is used
 * here: every function takes the time ("now", CLOCK_MONOTONIC microseconds
 * of this host) and a view of raft's state from its caller, so the unit
 * tests replay event sequences exactly (tests/unit/test_raft_lease.c).
 *
 * The protocol (the safety argument is in docs/architecture.md, "Read
 * leases"):
 *
 *  - Every raft frame a node sends is preceded by a stamp (kms_transport.h):
 *    its send time on its own clock, the newest send time it has received
 *    from the destination (echo), its term, whether it leads that term and
 *    seeks a lease, and for a leader its lease remaining and commit index.
 *
 *  - Promise. A node that receives a stamp flagged LEADER for a term T not
 *    older than its own promises not to vote, nor to ask for votes, in any
 *    term > T until arrival + election timeout on its clock. It echoes that
 *    stamp back with ECHO_PROMISED. A leader makes the same promise itself
 *    while it flags its stamps. A node that (re)starts refuses every vote
 *    for one election timeout, since it may have promised before it died.
 *
 *  - Leader lease. The echo of a promised stamp sent at s (leader clock)
 *    proves that peer cannot help elect another leader before s + ET on
 *    the leader's clock, up to the clock-rate bound. With its term-start
 *    barrier applied and no transfer under way, the leader's lease ends at
 *    the quorum-th newest such s (itself counting as "now") plus
 *    ET * (1 - drift) - margin. No leader of a later term can exist before
 *    then, so the leader's applied state holds every acknowledged write.
 *
 *  - Follower lease. A leader stamp carries the leader's lease remaining
 *    (rem) at its send time and echoes q, a send time of the follower's own
 *    clock that the leader had received before sending; so q precedes the
 *    stamp. Once the follower has applied the stamp's commit index (which
 *    covers the leader's term-start barrier, since rem > 0 needs it), its
 *    lease ends at q + rem * (1 - drift) - margin: before the leader's own
 *    lease, hence before any later leader exists. A read under it misses
 *    only writes acknowledged after the stamp was sent, i.e. less than one
 *    election timeout before the read.
 *
 * Ownership: struct kms_lease is caller-allocated and holds no pointers.
 * Threads: not thread-safe; node.c calls it on the raft thread only.
 */
#ifndef KMS_LEASE_H
#define KMS_LEASE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kms_transport.h"

#define KMS_LEASE_MAX_PEERS 16
#define KMS_LEASE_SAMPLES 64
#define KMS_LEASE_DRIFT_PPM 50000u  /* clocks' rates agree within 5 % */
#define KMS_LEASE_MARGIN_US 2000u   /* fixed margin on every lease end */

/* Stamp flag (kms_transport_stamp.flags) beside KMS_STAMP_LEADER: echo_us
 * names a LEADER stamp that extended the sender's promise. */
#define KMS_STAMP_ECHO_PROMISED 0x2u

struct kms_lease_config {
    uint64_t self_id;
    uint64_t election_us;     /* raft election timeout */
    uint32_t drift_ppm;       /* 0 = KMS_LEASE_DRIFT_PPM */
    uint64_t margin_us;       /* 0 = KMS_LEASE_MARGIN_US */
};

/* raft's state at the moment of an event (from raft_glue). */
struct kms_lease_view {
    int role;                 /* enum kms_raft_role */
    uint64_t term;            /* current term */
    uint64_t leader_id;       /* known leader (self when leading), 0 = none */
    uint64_t applied;         /* last applied index */
    uint64_t commit;          /* commit index */
    bool barrier_applied;     /* leader: its term-start barrier is applied */
    bool releasing;           /* leader: giving up leases (transfer, stop) */
    const uint64_t *voters;   /* voters of the current configuration */
    size_t n_voters;
};

struct kms_lease_peer {
    uint64_t id;
    uint64_t rx_sent_us;      /* newest sent_us received from it (its clock) */
    bool rx_promised;         /* ... and that stamp extended our promise */
    uint64_t acked_us;        /* newest own promised stamp it echoed (our clock) */
};

struct kms_lease_sample {
    uint64_t leader_id, term, commit;
    uint64_t end_us;          /* follower lease end on our clock */
};

struct kms_lease {
    struct kms_lease_config cfg;
    uint64_t promise_term;    /* no votes for terms above this ... */
    uint64_t promise_end_us;  /* ... before this time */
    uint64_t last_flagged_us; /* last LEADER stamp we sent */
    struct kms_lease_peer peers[KMS_LEASE_MAX_PEERS];
    size_t n_peers;
    struct kms_lease_sample pending[KMS_LEASE_SAMPLES]; /* commit not applied yet */
    size_t n_pending;
    struct kms_lease_sample best; /* newest usable sample (commit applied) */
    uint64_t until_us;        /* last lease end computed (0 = none) */
};

/* Starts with a promise to nobody for one election timeout: a restarted
 * node may have promised before it stopped. */
void kms_lease_init(struct kms_lease *l, const struct kms_lease_config *cfg, uint64_t now_us);

/* A stamp from `peer` arrived at arrival_us. */
void kms_lease_on_stamp(struct kms_lease *l, uint64_t peer, const struct kms_transport_stamp *s,
                        uint64_t arrival_us, const struct kms_lease_view *v);

/* Fills the stamp for a frame to `peer` sent at now_us. Always true. */
bool kms_lease_stamp_out(struct kms_lease *l, uint64_t peer, uint64_t now_us,
                         const struct kms_lease_view *v, struct kms_transport_stamp *s);

/* Recomputes the lease: its end on our clock (> now_us), or 0. */
uint64_t kms_lease_compute(struct kms_lease *l, uint64_t now_us, const struct kms_lease_view *v);

/* Whether this node may grant a vote, or ask for votes, in term `term`
 * now (pre-votes included: they carry the term they would start). */
bool kms_lease_vote_allowed(const struct kms_lease *l, uint64_t term, uint64_t now_us);

/* While releasing: microseconds until every promise made on the strength
 * of our LEADER stamps, and our own, has ended; 0 = already. */
uint64_t kms_lease_release_wait_us(const struct kms_lease *l, uint64_t now_us);

#endif /* KMS_LEASE_H */
