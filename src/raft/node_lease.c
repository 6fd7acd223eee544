/*
 * The raft node's leases (see node.c, lease.h): the lease view and its
 * published deadline, the term-start barrier, the read index, the io hooks
 * (the vote promise filter, disk errors) and the transport's stamp hooks,
 * which also carry each peer's entry version. Raft thread, except the
 * kms_raft_read_index / kms_raft_lease_* readers (any thread).
 */
#include "kms_raft.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <raft.h>
#include <raft/uv.h>
#include <uv.h>

#include "kms_log.h"
#include "kms_tsan.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kms_transport.h"
#include "lease.h"
#include "node_internal.h"
#include "raft_glue.h"

/* ------------------------------------------------------------------ lease */

static void start_barrier(struct kms_raft *r);

/* raft's state as lease.c sees it. `voters` must hold MAX_PEERS ids. */
static void lease_view(struct kms_raft *r, struct kms_lease_view *v, uint64_t *voters)
{
    memset(v, 0, sizeof(*v));
    v->role = kms_glue_role(&r->raft);
    v->term = kms_glue_term(&r->raft);
    v->leader_id = v->role == KMS_RAFT_LEADER ? r->id : kms_glue_follower_leader(&r->raft);
    v->applied = raft_last_applied(&r->raft);
    v->commit = kms_glue_commit(&r->raft);
    v->barrier_applied = r->barrier_term == v->term;
    v->releasing = r->releasing || r->stopping || kms_glue_transfer_pending(&r->raft);
    v->voters = voters;
    v->n_voters = kms_glue_voters(&r->raft, voters, MAX_PEERS);
}

/* Recomputes the lease from view v and publishes its deadline (none while
 * closing or after a disk failure). */
/* Raft thread: a leader holding its lease had committed `commit` at
 * `at_us` (this node's clock). Wakes kms_raft_read_index callers. */
static void read_index_note(struct kms_raft *r, uint64_t at_us, uint64_t commit)
{
    pthread_mutex_lock(&r->applied_mu);
    if (at_us > r->ri_at_us) {
        r->ri_at_us = at_us;
    }
    if (commit > r->ri_commit) {
        r->ri_commit = commit;
    }
    if (atomic_load(&r->waiters) > 0) {
        pthread_cond_broadcast(&r->applied_cv);
    }
    pthread_mutex_unlock(&r->applied_mu);
}

static void lease_publish(struct kms_raft *r, const struct kms_lease_view *v)
{
    uint64_t until = 0, now = kms_mono_us();
    if (!r->closing && !atomic_load(&r->failed)) {
        until = kms_lease_compute(&r->lease, now, v);
    }
    atomic_store_explicit(&r->lease_until_us, until, memory_order_release);
    if (until > now && r->lease_cb != NULL) {
        r->lease_cb(r->lease_arg);
    }
    if (v->role == KMS_RAFT_LEADER && until > now) {
        /* Commit only advances on this thread and every write is
         * acknowledged after its commit: v->commit covers every write
         * acknowledged before now, and no later leader exists yet. */
        read_index_note(r, now, v->commit);
    }
}

/* Raft thread: notice role changes, recompute the lease and publish it. */
void kr_lease_update(struct kms_raft *r)
{
    uint64_t voters[MAX_PEERS];
    struct kms_lease_view v;
    int state = kms_glue_role(&r->raft);

    if (state != r->last_state) {
        if (state == KMS_RAFT_LEADER) {
            r->elections_won++;
            if (r->last_state != KMS_RAFT_CANDIDATE) {
                r->elections_started++; /* its candidacy fell between two looks */
            }
            kms_logf(KMS_LOG_INFO, MOD, "node %" PRIu64 " is leader for term %" PRIu64, r->id,
                     kms_glue_term(&r->raft));
            start_barrier(r);
        } else if (r->last_state == KMS_RAFT_LEADER) {
            kms_logf(KMS_LOG_INFO, MOD, "node %" PRIu64 " is no longer leader (term %" PRIu64 ")",
                     r->id, kms_glue_term(&r->raft));
        }
        if (state == KMS_RAFT_CANDIDATE) {
            r->elections_started++;
            kms_logf(KMS_LOG_INFO, MOD, "node %" PRIu64 " stands for election (term %" PRIu64 ")",
                     r->id, kms_glue_term(&r->raft));
        }
        r->last_state = state;
    }
    lease_view(r, &v, voters);
    lease_publish(r, &v);
}

static void barrier_cb(struct raft_barrier *req, int status)
{
    struct kms_raft *r = req->data;
    if (status == 0 && kms_glue_role(&r->raft) == KMS_RAFT_LEADER) {
        r->barrier_term = kms_glue_term(&r->raft);
        kr_lease_update(r);
    }
    r->barrier_pending = false;
    free(req);
}

static void start_barrier(struct kms_raft *r)
{
    struct raft_barrier *req;
    int rv;
    if (r->barrier_pending || r->closing) {
        /* A barrier of an older term is failed by raft on step-down before
         * we can be leader again; if one is still pending it is ours. */
        return;
    }
    req = calloc(1, sizeof(*req));
    if (req == NULL) {
        return;
    }
    req->data = r;
    rv = raft_barrier(&r->raft, req, barrier_cb);
    if (rv != 0) {
        kms_logf(KMS_LOG_WARN, MOD, "term-start barrier: %s", raft_strerror(rv));
        free(req);
        return;
    }
    r->barrier_pending = true;
}

/* ------------------------------------------------------------------ io hooks */

/* Every vote message, in or out, passes the promise rule (lease.h). A
 * RequestVote that may pass reaches raft, whose own rule rejects votes
 * while a leader is known; once our promise has ended (no LEADER stamp for
 * a full election timeout) and no AppendEntries has arrived for as long,
 * we forget the leader (raft thesis 4.2.3: refuse votes only "within the
 * minimum election timeout of hearing from a current leader"). */
static bool vote_filter(struct kms_raft *r, const struct raft_message *m, bool incoming)
{
    uint64_t term, now = kms_mono_us();
    bool pre_vote, disrupt;

    if (kms_glue_msg_from_leader(m, &term)) {
        if (incoming && term >= kms_glue_term(&r->raft)) {
            r->heard_us = now;
        }
        return true;
    }
    if (!kms_glue_msg_vote(m, &term, &pre_vote, &disrupt)) {
        return true;
    }
    if (!kms_lease_vote_allowed(&r->lease, term, now)) {
        uint64_t left = r->lease.promise_end_us - now;
        bool held = false;
        if (incoming && left <= (uint64_t)r->election_ms * 500u) {
            /* Ends soon: look at it again then rather than losing a round. */
            kms_glue_hold_vote(&r->glue, m, (unsigned)(left / 1000u) + 2u);
            held = true;
        }
        /* The first drop of each term is logged (an election episode),
         * then every 64th. */
        if (r->vote_drops++ % 64 == 0 || term != r->vote_drop_log_term) {
            r->vote_drop_log_term = term;
            kms_logf(KMS_LOG_INFO, MOD,
                     "%s for term %" PRIu64 " %s node %llu %s: promised no votes above term "
                     "%" PRIu64 " for %" PRIu64 " ms more (%" PRIu64 " so far)",
                     pre_vote ? "pre-vote" : "vote request", term, incoming ? "from" : "to",
                     (unsigned long long)m->server_id, held ? "held" : "dropped",
                     r->lease.promise_term, left / 1000u, r->vote_drops);
        }
        return false;
    }
    /* Also silent at the raft level for a full election timeout: a leader
     * that sends no stamps (an older kmsd during a rolling upgrade) relies
     * on raft's own "no votes while a leader is heard" rule. */
    if (incoming && !disrupt && kms_glue_follower_leader(&r->raft) != 0 &&
        now - r->heard_us >= (uint64_t)r->election_ms * 1000u) {
        kms_logf(KMS_LOG_INFO, MOD,
                 "leader %" PRIu64 " silent past its promise: considering %s from %llu",
                 kms_glue_follower_leader(&r->raft), pre_vote ? "pre-vote" : "vote request",
                 (unsigned long long)m->server_id);
        kms_glue_forget_leader(&r->raft);
    }
    return true;
}

bool kr_recv_filter_cb(void *data, const struct raft_message *m)
{
    return vote_filter(data, m, true);
}

bool kr_send_filter_cb(void *data, const struct raft_message *m)
{
    return vote_filter(data, m, false);
}

/* The raft log could not be written (EIO, ENOSPC): this node must not go
 * on as if it had. It keeps no lease, refuses every request, and asks the
 * process to stop (SIGTERM to itself: kmsd's main thread handles it and
 * exits non-zero, see kms_raft_failed). */
void kr_io_error_cb(void *data, int status, const char *errmsg)
{
    struct kms_raft *r = data;
    kms_logf(KMS_LOG_ERROR, MOD,
             "raft log write failed: %s (%s); node %" PRIu64 " stops: it cannot keep its log",
             raft_strerror(status), errmsg != NULL && errmsg[0] != '\0' ? errmsg : "no detail",
             r->id);
    atomic_store(&r->failed, true);
    atomic_store(&r->lease_until_us, 0);
    kill(getpid(), SIGTERM);
}

/* Role changes (and the term-start barrier) are noticed right after raft
 * processed the message that caused them. */
void kr_after_recv_cb(void *data)
{
    kr_lease_update(data);
}

/* ------------------------------------------------------------- entry version
 *
 * Every stamp carries the highest Entry.version its sender applies
 * (KMS_STAMP_EV_SHIFT; a kmsd without it sends 0, counted as 1). Each node
 * keeps the newest value per peer; the version proposals get is the lowest
 * over the members of the current configuration (itself: KMS_ENTRY_VERSION;
 * a member not heard from yet: 1), raised to the highest version the store
 * already applied: once a version is in the log it is emitted from then on,
 * so a replica downgraded later meets it and stops instead of the cluster
 * silently going back. Computed on the raft thread at every tick. */

uint32_t kr_ev_of_peer(const struct kms_raft *r, uint64_t id)
{
    for (size_t i = 0; i < MAX_PEERS; i++) {
        if (r->ev_peer_id[i] == id) {
            return r->ev_peer[i];
        }
    }
    return 0;
}

static void ev_note(struct kms_raft *r, uint64_t id, uint32_t ev)
{
    size_t free_slot = MAX_PEERS;
    for (size_t i = 0; i < MAX_PEERS; i++) {
        if (r->ev_peer_id[i] == id) {
            r->ev_peer[i] = ev;
            return;
        }
        if (r->ev_peer_id[i] == 0 && free_slot == MAX_PEERS) {
            free_slot = i;
        }
    }
    if (free_slot == MAX_PEERS) {
        /* Full of peers no longer in the configuration: reuse one. */
        for (size_t i = 0; i < MAX_PEERS; i++) {
            if (!kr_config_has(r, r->ev_peer_id[i])) {
                free_slot = i;
                break;
            }
        }
    }
    if (free_slot < MAX_PEERS) {
        r->ev_peer_id[free_slot] = id;
        r->ev_peer[free_slot] = ev;
    }
}

void kr_ev_update(struct kms_raft *r)
{
    uint32_t ev = KMS_ENTRY_VERSION, applied = kms_store_entry_version(r->store);
    uint64_t low_id = 0;

    for (size_t i = 0; i < kms_glue_n_members(&r->raft); i++) {
        uint64_t id;
        const char *addr;
        int role;
        uint32_t pv;
        if (!kms_glue_member_at(&r->raft, i, &id, &addr, &role) || id == r->id) {
            continue;
        }
        pv = kr_ev_of_peer(r, id);
        pv = pv == 0 ? 1 : pv;
        if (pv < ev) {
            ev = pv;
            low_id = id;
        }
    }
    bool held = false;
    if (applied > ev) {
        ev = applied > KMS_ENTRY_VERSION ? KMS_ENTRY_VERSION : applied;
        held = true;
    }
    atomic_store(&r->emit_ev, ev);
    if (kms_glue_role(&r->raft) == KMS_RAFT_LEADER && ev != r->ev_logged) {
        if (held && low_id != 0) {
            kms_logf(KMS_LOG_WARN, MOD,
                     "emitting raft entry version %u: the log already holds it, though member "
                     "%llu advertises less (it will stop at the first such entry: upgrade it)",
                     (unsigned)ev, (unsigned long long)low_id);
        } else if (low_id != 0) {
            kms_logf(KMS_LOG_INFO, MOD,
                     "emitting raft entry version %u: member %llu advertises no higher "
                     "(this kmsd supports %u)",
                     (unsigned)ev, (unsigned long long)low_id, (unsigned)KMS_ENTRY_VERSION);
        } else {
            kms_logf(KMS_LOG_INFO, MOD, "emitting raft entry version %u%s", (unsigned)ev,
                     held ? ": the log already holds it" : ": every member advertises it");
        }
        r->ev_logged = ev;
    }
}

/* Sets e's version (and proposer) to what this node emits now. */
void kr_ev_stamp_entry(struct kms_raft *r, Kmsd__V1__Entry *e)
{
    uint32_t ev = atomic_load(&r->emit_ev);
    e->version = ev == 0 ? 1 : ev;
    e->proposer_id = e->version >= 2 ? r->id : 0;
}

bool kr_stamp_out_cb(void *data, uint64_t peer_id, struct kms_transport_stamp *s)
{
    struct kms_raft *r = data;
    uint64_t voters[MAX_PEERS];
    struct kms_lease_view v;
    if (r->closing) {
        return false;
    }
    lease_view(r, &v, voters);
    if (!kms_lease_stamp_out(&r->lease, peer_id, kms_mono_us(), &v, s)) {
        return false;
    }
    if (r->shred_index != 0 && kms_mono_ms() - r->shred_begin_ms < SHRED_ASK_MS) {
        s->flags |= KMS_STAMP_SHRED;
    }
    s->flags |= (uint64_t)(KMS_ENTRY_VERSION & KMS_STAMP_EV_MASK) << KMS_STAMP_EV_SHIFT;
    return true;
}

void kr_stamp_in_cb(void *data, uint64_t peer_id, const struct kms_transport_stamp *s,
                    uint64_t arrival_us)
{
    struct kms_raft *r = data;
    uint64_t voters[MAX_PEERS];
    struct kms_lease_view v;
    if (r->closing) {
        return;
    }
    lease_view(r, &v, voters);
    ev_note(r, peer_id, (uint32_t)((s->flags >> KMS_STAMP_EV_SHIFT) & KMS_STAMP_EV_MASK));
    kms_lease_on_stamp(&r->lease, peer_id, s, arrival_us, &v);
    if ((s->flags & KMS_STAMP_LEADER) != 0 && s->term >= v.term) {
        r->contact_us = arrival_us;
        if (s->lease_rem_us > 0 && s->echo_us != 0 && s->echo_us <= arrival_us) {
            /* The leader sent this after receiving our frame sent at
             * echo_us, while it held its lease (rem > 0 needs its
             * term-start barrier applied): its commit then covers every
             * write acknowledged before echo_us on our clock. */
            read_index_note(r, s->echo_us, s->commit);
        }
    }
    if ((s->flags & KMS_STAMP_SHRED) != 0) {
        /* A follower (restarted, or lagging) still shreds: keep proposing
         * NOOPs for a little while (kr_shred_tick, leader only). */
        uint64_t until = kms_mono_ms() + 3u * SHRED_NOOP_MS;
        if (until > r->shred_drive_until_ms) {
            r->shred_drive_until_ms = until;
        }
    }
    /* Inside the transport's read callback: only recompute and publish
     * (kr_lease_update may start a barrier, which must not happen here). */
    lease_publish(r, &v);
}

/* Incoming raft connections only from members, or from anyone while this
 * node has no configuration yet (it waits to be added). */
bool kr_peer_allowed_cb(void *data, uint64_t peer_id)
{
    struct kms_raft *r = data;
    return kms_glue_n_members(&r->raft) == 0 || kr_config_has(r, peer_id);
}

int kms_raft_read_index(struct kms_raft *r, uint64_t since_us, unsigned timeout_ms,
                        uint64_t *index)
{
    struct timespec ts;
    int rc = 0;

    *index = 0;
    ts = kr_deadline_ts(timeout_ms);
    atomic_fetch_add(&r->waiters, 1);
    pthread_mutex_lock(&r->applied_mu);
    while (r->ri_at_us < since_us) {
        if (atomic_load(&r->shut_down)) {
            rc = KMS_ESHUTDOWN;
            goto out;
        }
        if (pthread_cond_timedwait(&r->applied_cv, &r->applied_mu, &ts) == ETIMEDOUT &&
            r->ri_at_us < since_us) {
            rc = KMS_ETIMEDOUT;
            goto out;
        }
    }
    *index = r->ri_commit;
out:
    pthread_mutex_unlock(&r->applied_mu);
    atomic_fetch_sub(&r->waiters, 1);
    return rc;
}

bool kms_raft_lease_valid(struct kms_raft *r)
{
    if (r == NULL) {
        return false;
    }
    return kms_mono_us() < atomic_load_explicit(&r->lease_until_us, memory_order_acquire);
}

uint64_t kms_raft_lease_deadline_ms(struct kms_raft *r)
{
    uint64_t until;
    if (r == NULL) {
        return 0;
    }
    /* Rounded down to whole milliseconds: never later than the lease. */
    until = atomic_load_explicit(&r->lease_until_us, memory_order_acquire) / 1000u;
    return kms_mono_ms() < until ? until : 0;
}
