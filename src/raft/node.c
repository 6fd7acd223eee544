/*
 * The raft node: cowsql/raft 0.22 on a dedicated libuv thread. This file:
 * the node's life (kms_raft_start, the loop, its tick, the stop sequence,
 * kms_raft_shutdown) and the status it publishes. The rest of the node:
 * node_ops.c (requests from other threads: proposals, membership,
 * leadership transfer), node_fsm.c (the raft fsm over the store, snapshots,
 * shredding after a revocation), node_lease.c (read leases, the vote
 * promise rule, transport stamps, entry versions); node_internal.h holds
 * the node struct and says which thread owns which field.
 *
 * Threads:
 *  - the raft thread runs `loop`; it alone touches struct raft, raft_io, the
 *    transport and the store's fsm callbacks;
 *  - any other thread calls kms_raft_*: a request (struct op) is queued under
 *    `mu`, the raft thread is woken with uv_async_send (also under `mu`, so the
 *    handle cannot be closed concurrently), and the caller waits on the op's
 *    own condition variable (CLOCK_MONOTONIC) with its timeout. An op is
 *    reference counted (caller + raft thread) so a caller that times out can
 *    leave while raft still holds the embedded raft_apply/raft_change.
 *
 * Hooks into raft (all on the raft thread; the library's internals are
 * touched only through raft_glue.c):
 *  - the fsm is a wrapper around the store's: apply publishes the applied
 *    index (wakes kms_raft_wait_applied), restore counts snapshot installs;
 *  - the transport stamps every frame and reports every stamp it receives
 *    (kms_transport.h); lease.c turns them into vote promises and read
 *    leases. The lease is recomputed after each stamp and on a 25 ms timer
 *    and published as a monotonic deadline in an atomic;
 *  - RequestVote messages in and out pass the promise rule (lease.h): a
 *    node that promised a leader not to help elect anyone else drops them;
 *  - on becoming leader the node appends a barrier; the leader lease is only
 *    granted once that barrier (hence every earlier entry) is applied;
 *  - a leadership transfer first releases the leases (stamps lose their
 *    LEADER flag) and waits until every promise made on their strength has
 *    ended, so the new leader can only be elected after no old lease runs.
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

/* ------------------------------------------------------------------ helpers */

void kr_cond_init_mono(pthread_cond_t *cv)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(cv, &a);
    pthread_condattr_destroy(&a);
}

struct timespec kr_deadline_ts(unsigned timeout_ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += timeout_ms / 1000u;
    ts.tv_nsec += (long)(timeout_ms % 1000u) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

static int mkdir_p(const char *path)
{
    char tmp[4096];
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof(tmp)) {
        return -1;
    }
    memcpy(tmp, path, len + 1);
    for (char *p = tmp + 1; *p != '\0'; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(tmp, 0700) != 0 && errno != EEXIST) {
                return -1;
            }
            *p = '/';
        }
    }
    if (mkdir(tmp, 0700) != 0 && errno != EEXIST) {
        return -1;
    }
    return 0;
}

void kr_leader_info(struct kms_raft *r, uint64_t *id, char *addr, size_t n)
{
    raft_id lid = 0;
    const char *la = NULL;
    raft_leader(&r->raft, &lid, &la);
    *id = lid;
    snprintf(addr, n, "%s", la != NULL ? la : "");
}

bool kr_config_has(struct kms_raft *r, uint64_t id)
{
    return kms_glue_member_find(&r->raft, id, NULL, NULL);
}

/* ------------------------------------------------------------------ status */

void kr_status_publish(struct kms_raft *r)
{
    struct kms_raft_status st;
    uint64_t now_us = kms_mono_us();
    raft_index applied = raft_last_applied(&r->raft);

    memset(&st, 0, sizeof(st));
    st.id = r->id;
    st.role = kms_glue_role(&r->raft);
    st.term = kms_glue_term(&r->raft);
    st.commit_index = kms_glue_commit(&r->raft);
    st.applied_index = applied;
    kr_leader_info(r, &st.leader_id, st.leader_address, sizeof(st.leader_address));
    if (st.leader_id != r->last_leader_seen) {
        if (r->last_leader_seen != 0 || st.leader_id != 0) {
            r->leader_changes++;
        }
        r->last_leader_seen = st.leader_id;
    }
    for (size_t i = 0; i < kms_glue_n_members(&r->raft) && st.n_members < 16; i++) {
        const char *addr;
        if (!kms_glue_member_at(&r->raft, i, &st.members[st.n_members].id, &addr,
                                &st.members[st.n_members].role)) {
            break;
        }
        snprintf(st.members[st.n_members].address, sizeof(st.members[0].address), "%s", addr);
        st.member_entry_version[st.n_members] = st.members[st.n_members].id == r->id
                                                    ? KMS_ENTRY_VERSION
                                                    : kr_ev_of_peer(r, st.members[st.n_members].id);
        st.n_members++;
    }
    if (st.role == KMS_RAFT_LEADER) {
        st.last_leader_contact_ms = 0;
    } else if (r->contact_us != 0) {
        st.last_leader_contact_ms = (now_us - r->contact_us) / 1000u;
    } else {
        st.last_leader_contact_ms = UINT64_MAX;
    }
    st.last_index = raft_last_index(&r->raft);
    st.snapshot_index = r->snapshot_index;
    st.snapshots_restored = r->snapshots_restored;
    st.elections_won = r->elections_won;
    st.entry_version = atomic_load(&r->emit_ev);
    st.elections_started = r->elections_started;
    st.leader_changes = r->leader_changes;

    if (applied > atomic_load(&r->applied_index)) {
        atomic_store(&r->applied_index, applied); /* e.g. after a snapshot install */
    }
    if (atomic_load(&r->waiters) > 0) {
        pthread_mutex_lock(&r->applied_mu);
        pthread_cond_broadcast(&r->applied_cv);
        pthread_mutex_unlock(&r->applied_mu);
    }
    pthread_mutex_lock(&r->status_mu);
    r->status = st;
    pthread_mutex_unlock(&r->status_mu);
}

/* ------------------------------------------------------------------ loop callbacks */

static void handle_closed_cb(uv_handle_t *h)
{
    (void)h;
}

static void on_raft_closed(struct raft *raft)
{
    struct kms_raft *r = raft->data;
    raft_uv_close(&r->glue.io);
    kms_transport_tls_close(&r->transport);
    kms_glue_io_close(&r->glue);
    if (r->handles_inited) {
        uv_close((uv_handle_t *)&r->release_timer, handle_closed_cb);
        uv_close((uv_handle_t *)&r->timer, handle_closed_cb);
        uv_close((uv_handle_t *)&r->async, handle_closed_cb);
        uv_close((uv_handle_t *)&r->applied_check, handle_closed_cb);
        uv_close((uv_handle_t *)&r->applied_prepare, handle_closed_cb);
    }
}

void kr_begin_close(struct kms_raft *r)
{
    struct op *q;
    if (r->closing) {
        return;
    }
    r->closing = true;
    atomic_store(&r->lease_until_us, 0);
    uv_timer_stop(&r->release_timer);
    kr_transfer_op_shutdown(r);
    pthread_mutex_lock(&r->mu);
    r->closed = true;
    q = r->q_head;
    r->q_head = r->q_tail = NULL;
    pthread_mutex_unlock(&r->mu);
    while (q != NULL) {
        struct op *next = q->next;
        kr_op_complete(q, KMS_ESHUTDOWN, "raft node is shutting down");
        q = next;
    }
    uv_timer_stop(&r->timer);
    kms_logf(KMS_LOG_INFO, MOD, "closing raft node %" PRIu64, r->id);
    raft_close(&r->raft, on_raft_closed);
}

void kr_stop_transfer_cb(struct raft_transfer *req)
{
    struct kms_raft *r = req->data;
    uint64_t lid;
    char addr[256];
    kr_leader_info(r, &lid, addr, sizeof(addr));
    kms_logf(KMS_LOG_INFO, MOD, "shutdown leadership transfer finished; leader %" PRIu64, lid);
    kr_begin_close(r);
}

static void raft_thread_stop_step(struct kms_raft *r)
{
    unsigned others = 0;

    if (r->stopping) {
        return;
    }
    r->stopping = true;
    if (kms_glue_role(&r->raft) == KMS_RAFT_LEADER && !kms_glue_transfer_pending(&r->raft) &&
        !atomic_load(&r->failed)) {
        uint64_t voters[MAX_PEERS];
        size_t nv = kms_glue_voters(&r->raft, voters, MAX_PEERS);
        for (size_t i = 0; i < nv; i++) {
            if (voters[i] != r->id) {
                others++;
            }
        }
    }
    if (others > 0) {
        kr_transfer_op_shutdown(r);
        kr_release_start(r, true);
        r->stop_deadline_ms = kms_mono_ms() +
                              kms_lease_release_wait_us(&r->lease, kms_mono_us()) / 1000u +
                              r->election_ms + 500u;
        kms_logf(KMS_LOG_INFO, MOD, "shutting down: releasing leases before transferring leadership");
        return; /* release_timer_cb, kr_stop_transfer_cb or the timer closes */
    }
    kr_begin_close(r);
}

static void async_cb(uv_async_t *h)
{
    struct kms_raft *r = h->data;
    struct op *q;
    bool stop;

    pthread_mutex_lock(&r->mu);
    q = r->q_head;
    r->q_head = r->q_tail = NULL;
    stop = r->stop_requested;
    pthread_mutex_unlock(&r->mu);

    while (q != NULL) {
        struct op *next = q->next;
        bool abandoned;
        pthread_mutex_lock(&r->mu);
        abandoned = q->refs == 1; /* the caller timed out before we got to it */
        pthread_mutex_unlock(&r->mu);
        if (abandoned) {
            kr_op_complete(q, KMS_ETIMEDOUT, NULL);
        } else if (r->closing) {
            kr_op_complete(q, KMS_ESHUTDOWN, "raft node is shutting down");
        } else {
            kr_dispatch(r, q);
        }
        q = next;
    }
    if (stop && !r->closing) {
        raft_thread_stop_step(r);
    }
}

static void timer_cb(uv_timer_t *h)
{
    struct kms_raft *r = h->data;
    if (r->closing) {
        return;
    }
    kr_lease_update(r);
    kr_ev_update(r);
    kr_status_publish(r);
    kr_shred_tick(r);
    if (r->stopping && r->stop_deadline_ms != 0 && kms_mono_ms() >= r->stop_deadline_ms) {
        kms_logf(KMS_LOG_WARN, MOD, "shutdown leadership transfer timed out");
        kr_begin_close(r);
    }
}

static void *raft_thread_main(void *arg)
{
    struct kms_raft *r = arg;
    uv_run(&r->loop, UV_RUN_DEFAULT);
    return NULL;
}

/* ------------------------------------------------------------------ public */

static void raft_free_all(struct kms_raft *r)
{
    pthread_mutex_destroy(&r->mu);
    pthread_mutex_destroy(&r->applied_mu);
    pthread_cond_destroy(&r->applied_cv);
    pthread_mutex_destroy(&r->status_mu);
    free(r);
}

static int transport_init(struct kms_raft *r, const struct kms_raft_config *cfg,
                          struct kms_err *err)
{
    struct kms_transport_tls_config tc;
    struct kms_transport_hooks hooks;
    int rv;

    if (cfg->cert_file == NULL || cfg->key_file == NULL || cfg->ca_file == NULL) {
        /* Leases need the transport's stamps: there is no plain-TCP mode. */
        return kms_err_set(err, KMS_ECONFIG,
                           "raft needs cert_file, key_file and ca_file (mutual TLS)");
    }
    memset(&tc, 0, sizeof(tc));
    tc.cert_file = cfg->cert_file;
    tc.key_file = cfg->key_file;
    tc.ca_file = cfg->ca_file;
    tc.bind_address = r->bind_address;
    rv = kms_transport_tls_init(&r->transport, &r->loop, &tc, err);
    if (rv != 0) {
        return kms_err_wrap(err, rv, "raft TLS transport");
    }
    memset(&hooks, 0, sizeof(hooks));
    hooks.data = r;
    hooks.stamp_out = kr_stamp_out_cb;
    hooks.stamp_in = kr_stamp_in_cb;
    hooks.peer_allowed = kr_peer_allowed_cb;
    kms_transport_tls_set_hooks(&r->transport, &hooks);
    snprintf(r->cert_file, sizeof(r->cert_file), "%s", cfg->cert_file);
    snprintf(r->key_file, sizeof(r->key_file), "%s", cfg->key_file);
    snprintf(r->ca_file, sizeof(r->ca_file), "%s", cfg->ca_file);
    return 0;
}

/* Runs the loop until nothing is pending; used to release the transport and
 * io after a failed start. */
static void drain_loop(struct kms_raft *r)
{
    uv_run(&r->loop, UV_RUN_DEFAULT);
    uv_loop_close(&r->loop);
}

int kms_raft_start(const struct kms_raft_config *cfg, struct kms_store *store,
                   struct kms_raft **out, struct kms_err *err)
{
    struct kms_raft *r;
    char raft_dir[4096];
    int rv, rc;
    bool self_listed = false;

    *out = NULL;
    signal(SIGPIPE, SIG_IGN);
    if (cfg == NULL || store == NULL || cfg->id == 0 || cfg->data_dir == NULL ||
        cfg->raft_address == NULL || cfg->raft_address[0] == '\0') {
        return kms_err_set(err, KMS_EINVAL, "raft: id, data_dir and raft_address are required");
    }
    if (strlen(cfg->raft_address) >= 256 ||
        (cfg->bind_address != NULL && strlen(cfg->bind_address) >= 256)) {
        return kms_err_set(err, KMS_EINVAL, "raft address too long");
    }
    if (snprintf(raft_dir, sizeof(raft_dir), "%s/raft", cfg->data_dir) >= (int)sizeof(raft_dir)) {
        return kms_err_set(err, KMS_EINVAL, "raft: data_dir too long");
    }
    if (cfg->n_initial > MAX_PEERS) {
        return kms_err_set(err, KMS_EINVAL, "raft: at most %d initial members", MAX_PEERS);
    }
    for (size_t i = 0; i < cfg->n_initial; i++) {
        if (cfg->initial_cluster[i].id == 0) {
            return kms_err_set(err, KMS_EINVAL, "raft: initial member id 0");
        }
        for (size_t j = 0; j < i; j++) {
            if (cfg->initial_cluster[j].id == cfg->initial_cluster[i].id) {
                return kms_err_set(err, KMS_EINVAL, "raft: initial member %" PRIu64 " twice",
                                   cfg->initial_cluster[i].id);
            }
        }
        if (cfg->initial_cluster[i].id == cfg->id) {
            self_listed = true;
            if (strcmp(cfg->initial_cluster[i].address, cfg->raft_address) != 0) {
                return kms_err_set(err, KMS_ECONFIG,
                                   "raft: initial_cluster lists node %" PRIu64
                                   " at %s but raft_address is %s",
                                   cfg->id, cfg->initial_cluster[i].address, cfg->raft_address);
            }
        }
    }
    if (mkdir_p(raft_dir) != 0) {
        return kms_err_set(err, KMS_EIO, "raft: cannot create %s: %s", raft_dir, strerror(errno));
    }

    r = calloc(1, sizeof(*r));
    if (r == NULL) {
        return kms_err_set(err, KMS_ENOMEM, NULL);
    }
    r->id = cfg->id;
    r->lease_cb = cfg->lease_cb;
    r->lease_arg = cfg->lease_arg;
    snprintf(r->address, sizeof(r->address), "%s", cfg->raft_address);
    snprintf(r->bind_address, sizeof(r->bind_address), "%s",
             cfg->bind_address != NULL && cfg->bind_address[0] != '\0' ? cfg->bind_address
                                                                       : cfg->raft_address);
    snprintf(r->dir, sizeof(r->dir), "%s", raft_dir);
    r->election_ms = cfg->election_timeout_ms != 0 ? cfg->election_timeout_ms : 1000;
    r->heartbeat_ms = cfg->heartbeat_timeout_ms != 0 ? cfg->heartbeat_timeout_ms : 100;
    r->store = store;
    r->last_state = RAFT_UNAVAILABLE;
    pthread_mutex_init(&r->mu, NULL);
    pthread_mutex_init(&r->applied_mu, NULL);
    kr_cond_init_mono(&r->applied_cv);
    pthread_mutex_init(&r->status_mu, NULL);

    if (uv_loop_init(&r->loop) != 0) {
        raft_free_all(r);
        return kms_err_set(err, KMS_ERAFT, "raft: uv_loop_init failed");
    }
    if ((rc = transport_init(r, cfg, err)) != 0) {
        drain_loop(r);
        raft_free_all(r);
        return rc;
    }
    rv = raft_uv_init(&r->glue.io, &r->loop, r->dir, &r->transport);
    if (rv != 0) {
        rc = kms_err_set(err, KMS_ERAFT, "raft: raft_uv_init(%s): %s", r->dir,
                         r->glue.io.errmsg[0] != '\0' ? r->glue.io.errmsg : raft_strerror(rv));
        goto fail_transport;
    }
    raft_uv_set_connect_retry_delay(&r->glue.io, 250);
    kms_glue_io_wrap(&r->glue, &r->loop, r, kr_recv_filter_cb, kr_send_filter_cb, kr_after_recv_cb,
                     kr_io_error_cb);
    {
        struct kms_lease_config lc;
        memset(&lc, 0, sizeof(lc));
        lc.self_id = r->id;
        lc.election_us = (uint64_t)r->election_ms * 1000u;
        kms_lease_init(&r->lease, &lc, kms_mono_us());
    }

    kr_fsm_init(r);

    rv = raft_init(&r->raft, &r->glue.io, &r->fsm, r->id, r->address);
    if (rv != 0) {
        rc = kms_err_set(err, KMS_ERAFT, "raft_init: %s", raft_errmsg(&r->raft));
        goto fail_io;
    }
    r->raft.data = r;
    r->glue.raft = &r->raft;
    raft_set_election_timeout(&r->raft, r->election_ms);
    raft_set_heartbeat_timeout(&r->raft, r->heartbeat_ms);
    r->snap_threshold =
        (unsigned)(cfg->snapshot_threshold != 0 ? cfg->snapshot_threshold : 8192);
    r->snap_trailing = (unsigned)(cfg->snapshot_trailing != 0 ? cfg->snapshot_trailing : 2048);
    raft_set_snapshot_threshold(&r->raft, r->snap_threshold);
    raft_set_snapshot_trailing(&r->raft, r->snap_trailing);
    raft_set_pre_vote(&r->raft, true);

    if (cfg->n_initial > 0 && self_listed) {
        struct raft_configuration conf;
        raft_configuration_init(&conf);
        for (size_t i = 0; i < cfg->n_initial; i++) {
            rv = raft_configuration_add(&conf, cfg->initial_cluster[i].id,
                                        cfg->initial_cluster[i].address, RAFT_VOTER);
            if (rv != 0) {
                raft_configuration_close(&conf);
                rc = kms_err_set(err, KMS_EINVAL, "raft: initial member %" PRIu64 ": %s",
                                 cfg->initial_cluster[i].id, raft_strerror(rv));
                goto fail_raft;
            }
        }
        rv = raft_bootstrap(&r->raft, &conf);
        raft_configuration_close(&conf);
        if (rv == 0) {
            kms_logf(KMS_LOG_INFO, MOD, "bootstrapped a %zu-member cluster in %s", cfg->n_initial,
                     r->dir);
        } else if (rv != RAFT_CANTBOOTSTRAP) {
            rc = kms_err_set(err, KMS_ERAFT, "raft_bootstrap: %s (%s)", raft_strerror(rv),
                             raft_errmsg(&r->raft));
            goto fail_raft;
        }
    } else if (cfg->n_initial > 0) {
        kms_logf(KMS_LOG_INFO, MOD, "node %" PRIu64 " not in initial_cluster: waiting to be added",
                 r->id);
    }

    rv = raft_start(&r->raft);
    if (rv != 0) {
        rc = kms_err_set(err, KMS_ERAFT, "raft_start: %s (%s)", raft_strerror(rv),
                         raft_errmsg(&r->raft));
        goto fail_raft;
    }
    r->started = true;
    atomic_store(&r->applied_index, raft_last_applied(&r->raft));

    uv_async_init(&r->loop, &r->async, async_cb);
    r->async.data = r;
    uv_timer_init(&r->loop, &r->timer);
    r->timer.data = r;
    uv_timer_init(&r->loop, &r->release_timer);
    r->release_timer.data = r;
    uv_timer_start(&r->timer, timer_cb, TICK_MS, TICK_MS);
    uv_check_init(&r->loop, &r->applied_check);
    r->applied_check.data = r;
    uv_check_start(&r->applied_check, kr_applied_check_cb);
    uv_prepare_init(&r->loop, &r->applied_prepare);
    r->applied_prepare.data = r;
    uv_prepare_start(&r->applied_prepare, kr_applied_prepare_cb);
    r->handles_inited = true;
    kr_status_publish(r);

    if (pthread_create(&r->thread, NULL, raft_thread_main, r) != 0) {
        /* Close everything on this thread instead. */
        r->stopping = true;
        kr_begin_close(r);
        drain_loop(r);
        raft_free_all(r);
        return kms_err_set(err, KMS_ENOMEM, "raft: cannot create thread");
    }
    r->thread_started = true;
    kms_logf(KMS_LOG_INFO, MOD, "raft node %" PRIu64 " started on %s (mutual TLS transport)", r->id,
             r->address);
    *out = r;
    return 0;

fail_raft:
    r->closing = true;
    raft_close(&r->raft, on_raft_closed);
    drain_loop(r);
    raft_free_all(r);
    return rc;
fail_io:
    raft_uv_close(&r->glue.io);
    kms_glue_io_close(&r->glue);
fail_transport:
    kms_transport_tls_close(&r->transport);
    drain_loop(r);
    raft_free_all(r);
    return rc;
}

void kms_raft_shutdown(struct kms_raft *r)
{
    if (r == NULL || atomic_load(&r->shut_down)) {
        return;
    }
    pthread_mutex_lock(&r->mu);
    r->stop_requested = true;
    if (!r->closed) {
        uv_async_send(&r->async);
    }
    pthread_mutex_unlock(&r->mu);
    if (r->thread_started) {
        /* Bounded: a transport that never reports its close would otherwise
         * hang the daemon's shutdown forever. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        /* A node whose disk failed may never finish raft's close (an
         * append that never completes): do not wait long for it. */
        ts.tv_sec += atomic_load(&r->failed) ? 2 : (time_t)(r->election_ms / 1000u) + 10;
        if (pthread_timedjoin_np(r->thread, NULL, &ts) != 0) {
            kms_logf(KMS_LOG_ERROR, MOD,
                     "raft thread of node %" PRIu64 " did not stop in time (raft close never "
                     "completed); leaving it behind",
                     r->id);
            return; /* r stays allocated for good: the thread may still use it */
        }
    }
    if (uv_loop_close(&r->loop) != 0) {
        kms_logf(KMS_LOG_WARN, MOD, "raft loop closed with handles still open");
    }
    /* Wake wait_applied callers: they see shut_down and return. */
    pthread_mutex_lock(&r->applied_mu);
    atomic_store(&r->shut_down, true);
    pthread_cond_broadcast(&r->applied_cv);
    pthread_mutex_unlock(&r->applied_mu);
    kms_logf(KMS_LOG_INFO, MOD, "raft node %" PRIu64 " stopped", r->id);
}

bool kms_raft_failed(struct kms_raft *r)
{
    return r != NULL && atomic_load(&r->failed);
}

void kms_raft_free(struct kms_raft *r)
{
    if (r == NULL) {
        return;
    }
    if (!atomic_load(&r->shut_down)) {
        kms_logf(KMS_LOG_ERROR, MOD, "raft node %" PRIu64 " not stopped: not freed", r->id);
        return;
    }
    raft_free_all(r);
}

void kms_raft_stop(struct kms_raft *r)
{
    kms_raft_shutdown(r);
    kms_raft_free(r);
}

const char *kms_raft_role_name(int role)
{
    switch (role) {
    case KMS_RAFT_LEADER:
        return "leader";
    case KMS_RAFT_FOLLOWER:
        return "follower";
    case KMS_RAFT_CANDIDATE:
        return "candidate";
    default:
        return "unavailable";
    }
}

const char *kms_raft_member_role_name(int role)
{
    switch (role) {
    case KMS_RAFT_VOTER:
        return "voter";
    case KMS_RAFT_STANDBY:
        return "standby";
    case KMS_RAFT_SPARE:
        return "spare";
    default:
        return "unknown";
    }
}
