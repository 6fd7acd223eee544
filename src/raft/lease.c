/*
 * Read leases and vote promises (see lease.h for the protocol and
 * docs/architecture.md for the safety argument). Pure: no clock, no I/O.
 */
#include "lease.h"

#include <string.h>

#include "kms_raft.h"

static uint64_t lease_drift_ppm(const struct kms_lease *l)
{
    return l->cfg.drift_ppm != 0 ? l->cfg.drift_ppm : KMS_LEASE_DRIFT_PPM;
}

static uint64_t lease_margin_us(const struct kms_lease *l)
{
    return l->cfg.margin_us != 0 ? l->cfg.margin_us : KMS_LEASE_MARGIN_US;
}

/* d * (1 - drift): a duration measured on another host's clock, as a lower
 * bound on this host's. */
static uint64_t lease_shrink(const struct kms_lease *l, uint64_t d)
{
    return d - (d / 1000000u) * lease_drift_ppm(l) - ((d % 1000000u) * lease_drift_ppm(l)) / 1000000u;
}

/* d * (1 + drift), rounded up: an upper bound. */
static uint64_t lease_stretch(const struct kms_lease *l, uint64_t d)
{
    return d + (d / 1000000u) * lease_drift_ppm(l) +
           ((d % 1000000u) * lease_drift_ppm(l) + 999999u) / 1000000u;
}

static bool lease_is_voter(const struct kms_lease_view *v, uint64_t id)
{
    for (size_t i = 0; i < v->n_voters; i++) {
        if (v->voters[i] == id) {
            return true;
        }
    }
    return false;
}

/* The slot of `id`; a new one, or the slot of a server that is no longer a
 * voter when all are taken; NULL if none can be had. */
static struct kms_lease_peer *lease_peer_slot(struct kms_lease *l, uint64_t id,
                                              const struct kms_lease_view *v)
{
    for (size_t i = 0; i < l->n_peers; i++) {
        if (l->peers[i].id == id) {
            return &l->peers[i];
        }
    }
    if (l->n_peers < KMS_LEASE_MAX_PEERS) {
        struct kms_lease_peer *p = &l->peers[l->n_peers++];
        memset(p, 0, sizeof(*p));
        p->id = id;
        return p;
    }
    for (size_t i = 0; i < l->n_peers; i++) {
        if (!lease_is_voter(v, l->peers[i].id)) {
            memset(&l->peers[i], 0, sizeof(l->peers[i]));
            l->peers[i].id = id;
            return &l->peers[i];
        }
    }
    return NULL;
}

static void lease_promise(struct kms_lease *l, uint64_t term, uint64_t end_us)
{
    if (term > l->promise_term) {
        l->promise_term = term;
    }
    if (end_us > l->promise_end_us) {
        l->promise_end_us = end_us;
    }
}

void kms_lease_init(struct kms_lease *l, const struct kms_lease_config *cfg, uint64_t now_us)
{
    memset(l, 0, sizeof(*l));
    l->cfg = *cfg;
    l->promise_end_us = now_us + cfg->election_us;
}

static void lease_sample_push(struct kms_lease *l, const struct kms_lease_sample *s)
{
    if (l->n_pending == KMS_LEASE_SAMPLES) {
        /* Full: fold into the newest, conservatively (the higher commit to
         * wait for, the earlier end). */
        struct kms_lease_sample *last = &l->pending[l->n_pending - 1];
        if (last->leader_id == s->leader_id && last->term == s->term) {
            if (s->commit > last->commit) {
                last->commit = s->commit;
            }
            if (s->end_us < last->end_us) {
                last->end_us = s->end_us;
            }
            return;
        }
        *last = *s;
        return;
    }
    l->pending[l->n_pending++] = *s;
}

void kms_lease_on_stamp(struct kms_lease *l, uint64_t peer, const struct kms_transport_stamp *s,
                        uint64_t arrival_us, const struct kms_lease_view *v)
{
    struct kms_lease_peer *p;
    bool leader_stamp = (s->flags & KMS_STAMP_LEADER) != 0 && s->term >= v->term && s->term != 0;

    if (peer == 0 || peer == l->cfg.self_id) {
        return;
    }
    p = lease_peer_slot(l, peer, v);
    if (p != NULL) {
        p->rx_sent_us = s->sent_us;
        p->rx_promised = leader_stamp;
        /* Our own stamp, echoed after it extended the peer's promise: the
         * peer helps elect nobody of a later term before echo + ET. */
        if ((s->flags & KMS_STAMP_ECHO_PROMISED) != 0 && s->echo_us != 0 &&
            s->echo_us <= arrival_us && s->echo_us > p->acked_us) {
            p->acked_us = s->echo_us;
        }
    }
    if (!leader_stamp) {
        return;
    }
    lease_promise(l, s->term, arrival_us + l->cfg.election_us);
    /* Follower lease sample: echo_us is a send time of ours that the leader
     * had received before it sent this stamp, so it precedes the stamp. */
    if (s->lease_rem_us > 0 && s->echo_us != 0 && s->echo_us <= arrival_us) {
        uint64_t rem = lease_shrink(l, s->lease_rem_us);
        if (rem > lease_margin_us(l)) {
            struct kms_lease_sample smp = {.leader_id = peer,
                                           .term = s->term,
                                           .commit = s->commit,
                                           .end_us = s->echo_us + rem - lease_margin_us(l)};
            if (smp.end_us > arrival_us) {
                lease_sample_push(l, &smp);
            }
        }
    }
}

static int lease_cmp_desc(uint64_t a, uint64_t b)
{
    return a < b ? 1 : a > b ? -1 : 0;
}

static uint64_t lease_leader_end(struct kms_lease *l, uint64_t now_us,
                                 const struct kms_lease_view *v)
{
    uint64_t times[KMS_LEASE_MAX_PEERS + 1];
    size_t n = 0, quorum;

    if (!v->barrier_applied || v->releasing || v->n_voters == 0) {
        return 0;
    }
    for (size_t i = 0; i < v->n_voters && n < KMS_LEASE_MAX_PEERS + 1; i++) {
        uint64_t id = v->voters[i];
        if (id == l->cfg.self_id) {
            times[n++] = now_us;
            continue;
        }
        for (size_t j = 0; j < l->n_peers; j++) {
            if (l->peers[j].id == id && l->peers[j].acked_us != 0) {
                times[n++] = l->peers[j].acked_us;
                break;
            }
        }
    }
    quorum = v->n_voters / 2 + 1;
    if (n < quorum) {
        return 0;
    }
    /* Insertion sort, newest first: at most 17 values. */
    for (size_t i = 1; i < n; i++) {
        uint64_t x = times[i];
        size_t j = i;
        while (j > 0 && lease_cmp_desc(times[j - 1], x) > 0) {
            times[j] = times[j - 1];
            j--;
        }
        times[j] = x;
    }
    {
        uint64_t span = lease_shrink(l, l->cfg.election_us);
        uint64_t end;
        if (span <= lease_margin_us(l)) {
            return 0;
        }
        end = times[quorum - 1] + span - lease_margin_us(l);
        return end > now_us ? end : 0;
    }
}

static uint64_t lease_follower_end(struct kms_lease *l, uint64_t now_us,
                                   const struct kms_lease_view *v)
{
    size_t keep = 0;
    bool best_current = l->best.leader_id == v->leader_id && l->best.term == v->term;

    if (v->leader_id == 0) {
        return 0;
    }
    for (size_t i = 0; i < l->n_pending; i++) {
        struct kms_lease_sample *s = &l->pending[i];
        if (s->leader_id != v->leader_id || s->term != v->term) {
            continue; /* another leader's or term's: never usable again */
        }
        if (s->commit <= v->applied) {
            if (!best_current || s->end_us > l->best.end_us) {
                l->best = *s;
                best_current = true;
            }
            continue;
        }
        l->pending[keep++] = *s;
    }
    l->n_pending = keep;
    if (!best_current || l->best.end_us <= now_us) {
        return 0;
    }
    return l->best.end_us;
}

uint64_t kms_lease_compute(struct kms_lease *l, uint64_t now_us, const struct kms_lease_view *v)
{
    uint64_t until = 0;

    if (v->role == KMS_RAFT_LEADER) {
        if (!v->releasing) {
            lease_promise(l, v->term, now_us + l->cfg.election_us);
        }
        until = lease_leader_end(l, now_us, v);
    } else if (v->role == KMS_RAFT_FOLLOWER) {
        until = lease_follower_end(l, now_us, v);
    }
    l->until_us = until;
    return until;
}

bool kms_lease_stamp_out(struct kms_lease *l, uint64_t peer, uint64_t now_us,
                         const struct kms_lease_view *v, struct kms_transport_stamp *s)
{
    struct kms_lease_peer *p = peer != 0 ? lease_peer_slot(l, peer, v) : NULL;

    memset(s, 0, sizeof(*s));
    s->sent_us = now_us;
    s->term = v->term;
    s->commit = v->commit;
    if (p != NULL) {
        s->echo_us = p->rx_sent_us;
        if (p->rx_promised) {
            s->flags |= KMS_STAMP_ECHO_PROMISED;
        }
    }
    if (v->role == KMS_RAFT_LEADER && !v->releasing) {
        uint64_t until;
        s->flags |= KMS_STAMP_LEADER;
        l->last_flagged_us = now_us;
        until = kms_lease_compute(l, now_us, v); /* also extends our own promise */
        s->lease_rem_us = until > now_us ? until - now_us : 0;
    }
    return true;
}

bool kms_lease_vote_allowed(const struct kms_lease *l, uint64_t term, uint64_t now_us)
{
    return !(now_us < l->promise_end_us && term > l->promise_term);
}

uint64_t kms_lease_release_wait_us(const struct kms_lease *l, uint64_t now_us)
{
    uint64_t end = l->promise_end_us;
    if (l->last_flagged_us != 0) {
        uint64_t theirs =
            l->last_flagged_us + lease_stretch(l, l->cfg.election_us) + lease_margin_us(l);
        if (theirs > end) {
            end = theirs;
        }
    }
    return end > now_us ? end - now_us : 0;
}
