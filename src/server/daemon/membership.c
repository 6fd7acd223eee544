/*
 * Removed-node detection (kmsd.h kmsd_removal_tick).
 *
 * A member removed with `kmsctl operator members remove` usually never
 * learns it from raft: the leader stops replicating to it as soon as it
 * appends the configuration without it, so the removed node keeps its old
 * configuration and would stand for election for ever (its peers refuse its
 * raft connections). Two signals end that:
 *  (a) this node's own raft configuration no longer lists it (it received
 *      the change, or it was the leader that removed itself);
 *  (b) it has heard from no leader for REMOVAL_SILENCE_ELECTIONS election
 *      timeouts and a majority of the members its configuration lists
 *      answer a probe (kmsd_member_probe: a Forward of a NOOP, which changes
 *      nothing anywhere) with "not a member of the cluster". A partition
 *      gives no such answer (the peers cannot be reached), so it never
 *      stops a node.
 * Then the node logs that it was removed and stops with exit status 4.
 */
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "kms_log.h"
#include "kms_raft.h"
#include "kmsd.h"
#include "kmsd_pool.h"

#define REMOVAL_SILENCE_ELECTIONS 3u /* leader silence before probing */
#define REMOVAL_PROBE_EVERY_MS 5000u
#define REMOVAL_PROBE_TIMEOUT_MS 2000u

static void removal_stop(struct kmsd *d, const char *how)
{
    if (atomic_exchange(&d->removed, true)) {
        return;
    }
    kms_log(KMS_LOG_ERROR, "kmsd",
            "this node was removed from the cluster (kmsctl operator members remove): "
            "stopping with exit status 4; to add it again, wipe its dataDir first and run "
            "kmsctl operator members add",
            "how", how, NULL);
    (void)kill(getpid(), SIGTERM);
}

/* Operator pool job: the probes block (up to REMOVAL_PROBE_TIMEOUT_MS per
 * member), so they do not run on the supervisor thread, which opens and
 * closes the Talos listener. */
static void removal_probe_cb(void *arg)
{
    struct kmsd *d = arg;
    struct kms_raft_status rs;
    size_t others = 0, denied = 0;
    char how[160];

    memset(&rs, 0, sizeof(rs));
    (void)kms_raft_status(d->raft, &rs);
    for (size_t i = 0; i < rs.n_members && i < sizeof(rs.members) / sizeof(rs.members[0]) &&
                       !atomic_load(&d->stopping);
         i++) {
        bool no = false;
        struct kms_err err;
        if (rs.members[i].id == d->opt.node_id) {
            continue;
        }
        others++;
        kms_err_clear(&err);
        if (kmsd_member_probe(d, rs.members[i].id, REMOVAL_PROBE_TIMEOUT_MS, &no, &err) == 0 &&
            no) {
            denied++;
        }
    }
    /* A majority of the configuration this node knows (itself included,
     * which does not deny) says it is gone. */
    if (others > 0 && denied >= (others + 1) / 2 + 1 && !atomic_load(&d->stopping)) {
        snprintf(how, sizeof(how),
                 "%zu of the %zu other members say this node is not a member; no leader "
                 "heard for %" PRIu64 " ms",
                 denied, others,
                 rs.last_leader_contact_ms == UINT64_MAX ? 0 : rs.last_leader_contact_ms);
        removal_stop(d, how);
    }
    atomic_store(&d->removal_probing, false);
}

void kmsd_removal_tick(struct kmsd *d, struct kmsd_removal *st, uint64_t now_ms)
{
    struct kms_raft_status rs;
    uint64_t silence_ms;
    bool self_listed = false;

    if (atomic_load(&d->removed) || atomic_load(&d->stopping)) {
        return;
    }
    memset(&rs, 0, sizeof(rs));
    (void)kms_raft_status(d->raft, &rs);
    for (size_t i = 0; i < rs.n_members && i < sizeof(rs.members) / sizeof(rs.members[0]); i++) {
        if (rs.members[i].id == d->opt.node_id) {
            self_listed = true;
        }
    }
    if (self_listed) {
        st->was_member = true;
    } else {
        if (st->was_member && rs.n_members > 0) {
            removal_stop(d, "the raft configuration no longer lists this node");
        }
        return;
    }
    if (rs.role == KMS_RAFT_LEADER || rs.n_members < 2) {
        return;
    }
    silence_ms = (uint64_t)REMOVAL_SILENCE_ELECTIONS *
                 (d->opt.election_timeout_ms ? d->opt.election_timeout_ms : 1000u);
    if (rs.last_leader_contact_ms != UINT64_MAX && rs.last_leader_contact_ms < silence_ms) {
        return;
    }
    if (st->last_probe_ms != 0 && now_ms - st->last_probe_ms < REMOVAL_PROBE_EVERY_MS) {
        return;
    }
    if (atomic_exchange(&d->removal_probing, true)) {
        return; /* the previous round still runs */
    }
    st->last_probe_ms = now_ms;
    if (kmsd_pool_submit(d->op_pool, removal_probe_cb, d) != 0) {
        atomic_store(&d->removal_probing, false); /* busy or stopping: next time */
    }
}
