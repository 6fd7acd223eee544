/*
 * libraft internals, in one place (see raft_glue.h). cowsql/raft 0.22.1.
 */
#include "raft_glue.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms_raft.h"

static struct kms_glue *glue_of_io(struct raft_io *io)
{
    return (struct kms_glue *)((char *)io - offsetof(struct kms_glue, io));
}

static void glue_recv_cb(struct raft_io *io, struct raft_message *m)
{
    struct kms_glue *g = glue_of_io(io);
    if (g->raft != NULL && kms_glue_install_races_snapshot(g->raft, m)) {
        g->installs_dropped++;
        kms_glue_msg_release(m);
        return;
    }
    if (g->recv_filter_cb != NULL && !g->recv_filter_cb(g->data, m)) {
        /* Dropped like a lost packet. A RequestVote owns no buffers; other
         * types are never dropped by node.c (it only filters votes). */
        return;
    }
    g->recv_orig(io, m);
    if (g->after_recv_cb != NULL) {
        g->after_recv_cb(g->data);
    }
}

static int glue_start(struct raft_io *io, unsigned msecs, raft_io_tick_cb tick,
                      raft_io_recv_cb recv)
{
    struct kms_glue *g = glue_of_io(io);
    g->recv_orig = recv;
    return g->start_orig(io, msecs, tick, glue_recv_cb);
}

static void glue_defer_timer_cb(uv_timer_t *t)
{
    struct kms_glue *g = t->data;
    size_t n = g->n_defer;
    struct {
        struct raft_io_send *req;
        raft_io_send_cb cb;
    } batch[KMS_GLUE_DEFER_MAX];
    memcpy(batch, g->defer, n * sizeof(batch[0]));
    g->n_defer = 0;
    for (size_t i = 0; i < n; i++) {
        batch[i].cb(batch[i].req, 0);
    }
}

static int glue_send(struct raft_io *io, struct raft_io_send *req, const struct raft_message *m,
                     raft_io_send_cb cb)
{
    struct kms_glue *g = glue_of_io(io);
    if (g->send_filter_cb != NULL && g->defer_init && g->n_defer < KMS_GLUE_DEFER_MAX &&
        !g->send_filter_cb(g->data, m)) {
        /* raft 0.22's legacy layer treats a failing io->send as an error to
         * propagate, so a dropped message is reported as sent, later. */
        g->defer[g->n_defer].req = req;
        g->defer[g->n_defer].cb = cb;
        g->n_defer++;
        uv_timer_start(&g->defer_timer, glue_defer_timer_cb, 0, 0);
        return 0;
    }
    return g->send_orig(io, req, m, cb);
}

static void glue_hold_timer_cb(uv_timer_t *t)
{
    struct kms_glue *g = t->data;
    uint64_t now = uv_now(t->loop), next = 0;
    size_t i = 0;
    while (i < g->n_hold) {
        if (g->hold[i].due_ms <= now) {
            struct raft_message m = g->hold[i].m;
            char address[256];
            memcpy(address, g->hold[i].address, sizeof(address));
            m.server_address = address;
            g->hold[i] = g->hold[g->n_hold - 1];
            if (i < g->n_hold - 1) {
                g->hold[i].m.server_address = g->hold[i].address;
            }
            g->n_hold--;
            glue_recv_cb(&g->io, &m);
            continue; /* the slot now holds another entry */
        }
        if (next == 0 || g->hold[i].due_ms < next) {
            next = g->hold[i].due_ms;
        }
        i++;
    }
    if (next != 0) {
        uv_timer_start(&g->hold_timer, glue_hold_timer_cb, next - now, 0);
    }
}

void kms_glue_hold_vote(struct kms_glue *g, const struct raft_message *m, unsigned delay_ms)
{
    size_t i;
    uint64_t due;
    if (!g->defer_init || m->type != RAFT_REQUEST_VOTE || g->n_hold == KMS_GLUE_HOLD_MAX) {
        return;
    }
    i = g->n_hold++;
    g->hold[i].m = *m;
    snprintf(g->hold[i].address, sizeof(g->hold[i].address), "%s",
             m->server_address != NULL ? m->server_address : "");
    g->hold[i].m.server_address = g->hold[i].address;
    due = uv_now(g->defer_timer.loop) + delay_ms;
    g->hold[i].due_ms = due;
    glue_hold_timer_cb(&g->hold_timer); /* (re)arms for the earliest */
}

/* One append in flight: raft's request and callback, and ours. */
struct glue_append {
    struct raft_io_append inner;
    struct kms_glue *g;
    struct raft_io_append *outer;
    raft_io_append_cb cb;
};

static void glue_append_cb(struct raft_io_append *req, int status)
{
    struct glue_append *a = (struct glue_append *)req;
    struct kms_glue *g = a->g;
    struct raft_io_append *outer = a->outer;
    raft_io_append_cb cb = a->cb;
    free(a);
    if (status != 0 && status != RAFT_CANCELED) {
        if (!g->io_failed) {
            g->io_failed = true;
            if (g->io_error_cb != NULL) {
                g->io_error_cb(g->data, status, g->io.errmsg);
            }
        }
        return; /* raft never hears of it (see raft_glue.h) */
    }
    cb(outer, status);
}

static int glue_append(struct raft_io *io, struct raft_io_append *req,
                       const struct raft_entry entries[], unsigned n, raft_io_append_cb cb)
{
    struct kms_glue *g = glue_of_io(io);
    struct glue_append *a;
    int rv;
    if (g->io_failed) {
        return 0; /* swallowed: the node is stopping */
    }
    a = calloc(1, sizeof(*a));
    if (a == NULL) {
        return RAFT_NOMEM;
    }
    a->g = g;
    a->outer = req;
    a->cb = cb;
    a->inner.data = req->data;
    rv = g->append_orig(io, &a->inner, entries, n, glue_append_cb);
    if (rv != 0) {
        free(a);
        /* raft 0.22.1's error path for a failed append leaves it in a state
         * that crashes the next raft_apply: swallow the request (it never
         * completes) and stop the node instead. */
        if (!g->io_failed) {
            g->io_failed = true;
            if (g->io_error_cb != NULL) {
                g->io_error_cb(g->data, rv, g->io.errmsg);
            }
        }
        return 0;
    }
    return 0;
}

void kms_glue_io_wrap(struct kms_glue *g, uv_loop_t *loop, void *data,
                      kms_glue_filter_cb recv_filter, kms_glue_filter_cb send_filter,
                      void (*after_recv)(void *data),
                      void (*io_error)(void *data, int status, const char *errmsg))
{
    g->after_recv_cb = after_recv;
    g->io_error_cb = io_error;
    g->append_orig = g->io.append;
    g->io.append = glue_append;
    g->data = data;
    g->recv_filter_cb = recv_filter;
    g->send_filter_cb = send_filter;
    g->start_orig = g->io.start;
    g->io.start = glue_start;
    g->send_orig = g->io.send;
    g->io.send = glue_send;
    uv_timer_init(loop, &g->defer_timer);
    g->defer_timer.data = g;
    uv_timer_init(loop, &g->hold_timer);
    g->hold_timer.data = g;
    g->defer_init = true;
}

void kms_glue_io_close(struct kms_glue *g)
{
    if (!g->defer_init) {
        return;
    }
    for (size_t i = 0; i < g->n_defer; i++) {
        g->defer[i].cb(g->defer[i].req, RAFT_CANCELED);
    }
    g->n_defer = 0;
    uv_close((uv_handle_t *)&g->defer_timer, NULL);
    uv_close((uv_handle_t *)&g->hold_timer, NULL);
    g->n_hold = 0;
    g->defer_init = false;
}

int kms_glue_role(struct raft *raft)
{
    switch (raft_state(raft)) {
    case RAFT_FOLLOWER:
        return KMS_RAFT_FOLLOWER;
    case RAFT_CANDIDATE:
        return KMS_RAFT_CANDIDATE;
    case RAFT_LEADER:
        return KMS_RAFT_LEADER;
    default:
        return KMS_RAFT_UNAVAILABLE;
    }
}

uint64_t kms_glue_term(const struct raft *raft)
{
    return raft->current_term;
}

uint64_t kms_glue_commit(const struct raft *raft)
{
    return raft->commit_index;
}

uint64_t kms_glue_follower_leader(const struct raft *raft)
{
    if (raft->state != RAFT_FOLLOWER) {
        return 0;
    }
    return raft->follower_state.current_leader.id;
}

void kms_glue_forget_leader(struct raft *raft)
{
    if (raft->state == RAFT_FOLLOWER) {
        raft->follower_state.current_leader.id = 0;
    }
}

bool kms_glue_transfer_pending(const struct raft *raft)
{
    return raft->transfer != NULL;
}

static int glue_member_role(int raft_role)
{
    switch (raft_role) {
    case RAFT_VOTER:
        return KMS_RAFT_VOTER;
    case RAFT_SPARE:
        return KMS_RAFT_SPARE;
    default:
        return KMS_RAFT_STANDBY;
    }
}

size_t kms_glue_voters(const struct raft *raft, uint64_t *ids, size_t max)
{
    size_t n = 0;
    for (unsigned i = 0; i < raft->configuration.n && n < max; i++) {
        if (raft->configuration.servers[i].role == RAFT_VOTER) {
            ids[n++] = raft->configuration.servers[i].id;
        }
    }
    return n;
}

size_t kms_glue_n_members(const struct raft *raft)
{
    return raft->configuration.n;
}

bool kms_glue_member_at(const struct raft *raft, size_t i, uint64_t *id, const char **address,
                        int *role)
{
    const struct raft_server *s;
    if (i >= raft->configuration.n) {
        return false;
    }
    s = &raft->configuration.servers[i];
    *id = s->id;
    *address = s->address != NULL ? s->address : "";
    *role = glue_member_role(s->role);
    return true;
}

bool kms_glue_member_find(const struct raft *raft, uint64_t id, const char **address, int *role)
{
    for (unsigned i = 0; i < raft->configuration.n; i++) {
        const struct raft_server *s = &raft->configuration.servers[i];
        if (s->id == id) {
            if (address != NULL) {
                *address = s->address != NULL ? s->address : "";
            }
            if (role != NULL) {
                *role = glue_member_role(s->role);
            }
            return true;
        }
    }
    return false;
}

bool kms_glue_msg_vote(const struct raft_message *m, uint64_t *term, bool *pre_vote,
                       bool *disrupt)
{
    if (m->type != RAFT_REQUEST_VOTE) {
        return false;
    }
    *term = m->request_vote.term;
    *pre_vote = m->request_vote.pre_vote;
    *disrupt = m->request_vote.disrupt_leader;
    return true;
}

bool kms_glue_msg_from_leader(const struct raft_message *m, uint64_t *term)
{
    switch (m->type) {
    case RAFT_APPEND_ENTRIES:
        *term = m->append_entries.term;
        return true;
    case RAFT_INSTALL_SNAPSHOT:
        *term = m->install_snapshot.term;
        return true;
    default:
        return false;
    }
}

/* raft->legacy.snapshot_taking: this node is taking its own snapshot. */
bool kms_glue_install_races_snapshot(struct raft *raft, const struct raft_message *m)
{
    return m->type == RAFT_INSTALL_SNAPSHOT && raft->legacy.snapshot_taking;
}

void kms_glue_msg_release(struct raft_message *m)
{
    if (m->type == RAFT_INSTALL_SNAPSHOT) {
        raft_free(m->install_snapshot.data.base);
        m->install_snapshot.data.base = NULL;
        raft_configuration_close(&m->install_snapshot.conf);
    }
}
