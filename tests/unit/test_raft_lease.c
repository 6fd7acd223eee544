/*
 * Read leases and vote promises (src/raft/lease.c) as a pure function over
 * event sequences. Each test is a small deterministic cluster: every node
 * has its own clock (an offset and a rate against "real" time), messages
 * are stamps delivered with chosen delays, and the checks are the safety
 * statements of lease.h:
 *   - a leader's lease never outlives a promise it counted on;
 *   - a follower's lease never outlives its leader's lease;
 *   - no vote is possible before the promises end;
 * plus the liveness cases that were broken before (a restarted follower,
 * sends to a peer that is down).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "kms_raft.h"
#include "lease.h"

#define ET 1000000u /* election timeout, µs */
#define MAXN 5

struct node {
    uint64_t id;
    struct kms_lease l;
    int64_t offset;     /* local clock = real * rate + offset */
    double rate;
    struct kms_lease_view v;
    uint64_t voters[MAXN];
};

struct sim {
    struct node n[MAXN];
    size_t count;
    uint64_t real;      /* µs */
};

static uint64_t clock_of(const struct node *x, uint64_t real)
{
    return (uint64_t)((double)real * x->rate + (double)x->offset);
}

static uint64_t now_of(struct sim *s, size_t i)
{
    return clock_of(&s->n[i], s->real);
}

static void sim_init(struct sim *s, size_t count)
{
    memset(s, 0, sizeof(*s));
    s->count = count;
    s->real = 10 * ET;
    for (size_t i = 0; i < count; i++) {
        struct node *x = &s->n[i];
        struct kms_lease_config cfg = {.self_id = i + 1, .election_us = ET};
        x->id = i + 1;
        x->rate = 1.0;
        x->offset = (int64_t)(i * 7777777u); /* unrelated clocks */
        for (size_t j = 0; j < count; j++) {
            x->voters[j] = j + 1;
        }
        x->v.voters = x->voters;
        x->v.n_voters = count;
        x->v.term = 1;
        x->v.role = KMS_RAFT_FOLLOWER;
        kms_lease_init(&x->l, &cfg, now_of(s, i));
    }
}

static void make_leader(struct sim *s, size_t li, uint64_t term)
{
    for (size_t i = 0; i < s->count; i++) {
        s->n[i].v.term = term;
        s->n[i].v.leader_id = s->n[li].id;
        s->n[i].v.role = i == li ? KMS_RAFT_LEADER : KMS_RAFT_FOLLOWER;
    }
    s->n[li].v.barrier_applied = true;
}

/* A stamp from a to b, sent now, arriving `delay` µs later (real). The
 * simulation applies it at that time; callers advance time themselves. */
struct flight {
    size_t from, to;
    struct kms_transport_stamp st;
    uint64_t arrive_real;
};

static struct flight sim_send(struct sim *s, size_t a, size_t b, uint64_t delay)
{
    struct flight f = {.from = a, .to = b, .arrive_real = s->real + delay};
    assert_true(kms_lease_stamp_out(&s->n[a].l, s->n[b].id, now_of(s, a), &s->n[a].v, &f.st));
    return f;
}

static void sim_deliver(struct sim *s, const struct flight *f)
{
    struct node *to = &s->n[f->to];
    assert_true(s->real <= f->arrive_real);
    s->real = f->arrive_real;
    kms_lease_on_stamp(&to->l, s->n[f->from].id, &f->st, clock_of(to, s->real), &to->v);
}

/* One heartbeat round from leader li to every live node and back, with a
 * one-way delay d. */
static void sim_round(struct sim *s, size_t li, uint64_t d, const bool *down)
{
    struct flight out[MAXN], back[MAXN];
    size_t n = 0;
    for (size_t i = 0; i < s->count; i++) {
        if (i == li || (down != NULL && down[i])) {
            continue;
        }
        out[n++] = sim_send(s, li, i, d);
    }
    for (size_t k = 0; k < n; k++) {
        sim_deliver(s, &out[k]);
        back[k] = sim_send(s, out[k].to, li, d);
    }
    for (size_t k = 0; k < n; k++) {
        sim_deliver(s, &back[k]);
    }
}

static uint64_t lease_end_real(struct sim *s, size_t i)
{
    struct node *x = &s->n[i];
    uint64_t end = kms_lease_compute(&x->l, now_of(s, i), &x->v);
    if (end == 0) {
        return 0;
    }
    /* Convert the local end to real time. */
    return (uint64_t)(((double)end - (double)x->offset) / x->rate);
}

/* Earliest real time at which node i may vote for a term above `term`. */
static uint64_t vote_free_real(struct sim *s, size_t i, uint64_t term)
{
    struct node *x = &s->n[i];
    uint64_t t = s->real;
    while (!kms_lease_vote_allowed(&x->l, term + 1, clock_of(x, t))) {
        t += 1000;
    }
    return t;
}

static void settle(struct sim *s, size_t li, int rounds)
{
    for (int r = 0; r < rounds; r++) {
        sim_round(s, li, 2000, NULL);
        s->real += 100000;
    }
}

/* A cluster of `count` past its start-up promises with node 0 leading
 * term 2 and `rounds` heartbeat rounds done. */
static void sim_ready(struct sim *s, size_t count, int rounds)
{
    sim_init(s, count);
    s->real += 2 * ET;
    make_leader(s, 0, 2);
    settle(s, 0, rounds);
}

/* The leader gets a lease after a round; it ends no later than the moment
 * a majority may vote again. */
static void test_leader_lease_bounded_by_promises(void **state)
{
    struct sim s;
    (void)state;
    sim_init(&s, 3);
    s.real += 2 * ET; /* past the start-up promise */
    make_leader(&s, 0, 2);
    settle(&s, 0, 3);
    uint64_t end = lease_end_real(&s, 0);
    assert_true(end > s.real);
    /* A majority that excludes the leader: both followers must still be
     * bound until the leader's lease is over. */
    assert_true(vote_free_real(&s, 1, 2) >= end);
    assert_true(vote_free_real(&s, 2, 2) >= end);
    /* And the leader itself promised too. */
    assert_true(vote_free_real(&s, 0, 2) >= end);
}

static void test_no_lease_before_barrier(void **state)
{
    struct sim s;
    (void)state;
    sim_init(&s, 3);
    s.real += 2 * ET;
    make_leader(&s, 0, 2);
    s.n[0].v.barrier_applied = false;
    settle(&s, 0, 3);
    assert_int_equal(lease_end_real(&s, 0), 0);
    assert_int_equal(lease_end_real(&s, 1), 0); /* leader stamps carry no lease */
    s.n[0].v.barrier_applied = true;
    settle(&s, 0, 2);
    assert_true(lease_end_real(&s, 0) > s.real);
}

/* Followers' leases end before the leader's. */
static void test_follower_lease_inside_leader_lease(void **state)
{
    struct sim s;
    (void)state;
    sim_init(&s, 3);
    s.real += 2 * ET;
    make_leader(&s, 0, 2);
    for (int r = 0; r < 10; r++) {
        sim_round(&s, 0, 3000, NULL);
        s.real += 100000;
        uint64_t le = lease_end_real(&s, 0);
        for (size_t i = 1; i < 3; i++) {
            uint64_t fe = lease_end_real(&s, i);
            if (r >= 2) {
                assert_true(fe > s.real); /* the lease is there */
            }
            assert_true(fe <= le);
        }
    }
}

/* The follower lease needs the stamp's commit index applied. */
static void test_follower_lease_waits_for_commit(void **state)
{
    struct sim s;
    (void)state;
    sim_init(&s, 3);
    s.real += 2 * ET;
    make_leader(&s, 0, 2);
    s.n[0].v.commit = 50;
    s.n[1].v.applied = 49;
    settle(&s, 0, 4);
    assert_int_equal(lease_end_real(&s, 1), 0);
    s.n[1].v.applied = 50;
    assert_true(lease_end_real(&s, 1) > s.real);
}

/* Issue 1 of the raft-safety report: a follower restarts, the leader had
 * sent to it while it was down; afterwards the leader must get its lease
 * back at once (no lag from unanswered sends). */
static void test_follower_restart_and_sends_to_down_peer(void **state)
{
    struct sim s;
    bool down[MAXN] = {false};
    (void)state;
    sim_ready(&s, 3, 3);
    /* Node 2 down for 3 s: the leader keeps sending to it (lost). */
    down[2] = true;
    for (int r = 0; r < 30; r++) {
        (void)sim_send(&s, 0, 2, 1000); /* never delivered */
        sim_round(&s, 0, 2000, down);
        s.real += 100000;
        assert_true(lease_end_real(&s, 0) > s.real); /* {0,1} is a quorum */
    }
    /* It restarts: fresh state, refuses votes for one election timeout. */
    struct kms_lease_config cfg = {.self_id = 3, .election_us = ET};
    kms_lease_init(&s.n[2].l, &cfg, now_of(&s, 2));
    assert_false(kms_lease_vote_allowed(&s.n[2].l, 3, now_of(&s, 2)));
    down[2] = false;
    /* Now node 1 goes down: the leader needs node 2's echoes. */
    down[1] = true;
    sim_round(&s, 0, 2000, down);
    s.real += 1000;
    sim_round(&s, 0, 2000, down);
    uint64_t end = lease_end_real(&s, 0);
    assert_true(end > s.real);
    assert_true(end >= s.real + ET / 2); /* current, not lagging */
    assert_true(lease_end_real(&s, 2) > s.real); /* and the follower serves */
}

/* Issue 2: delayed delivery (retransmission, a pause with messages queued
 * in the socket) must not stretch a follower lease over stale state. */
static void test_delayed_stamp_gives_no_lease(void **state)
{
    struct sim s;
    (void)state;
    sim_ready(&s, 3, 3);
    s.n[0].v.commit = 10;
    struct flight late = sim_send(&s, 0, 1, 5 * ET); /* arrives 5 s later */
    uint64_t leader_end = lease_end_real(&s, 0);
    /* Node 1 hears nothing else meanwhile; its old lease runs out. */
    s.real += 2 * ET;
    assert_int_equal(lease_end_real(&s, 1), 0);
    s.n[1].v.applied = 10;
    sim_deliver(&s, &late);
    assert_int_equal(lease_end_real(&s, 1), 0);
    assert_true(s.real > leader_end);
}

/* A paused follower (SIGSTOP): the lease it held ends on its clock while
 * paused; after the pause, messages queued during it give no lease. */
static void test_pause(void **state)
{
    struct sim s;
    struct flight q[20];
    (void)state;
    sim_ready(&s, 3, 3);
    uint64_t end = lease_end_real(&s, 1);
    assert_true(end > s.real);
    /* Node 1 paused 6 s: the leader's stamps queue up. */
    for (int i = 0; i < 20; i++) {
        q[i] = sim_send(&s, 0, 1, 6 * ET - (uint64_t)i * 300000u);
        s.real += 300000;
    }
    for (int i = 0; i < 20; i++) {
        if (q[i].arrive_real < s.real) {
            q[i].arrive_real = s.real;
        }
        sim_deliver(&s, &q[i]);
    }
    assert_true(s.real > end);
    assert_int_equal(lease_end_real(&s, 1), 0);
    /* Fresh rounds bring it back. */
    settle(&s, 0, 3);
    assert_true(lease_end_real(&s, 1) > s.real);
}

/* Term change: stamps of an older term count for nothing. */
static void test_term_change(void **state)
{
    struct sim s;
    (void)state;
    sim_ready(&s, 3, 3);
    /* Node 1 moves to term 3 (it saw a candidate); old-term stamps from 0
     * now neither renew its promise nor give it a lease. */
    s.n[1].v.term = 3;
    s.n[1].v.leader_id = 0;
    s.real += 2 * ET;
    sim_round(&s, 0, 2000, NULL);
    assert_int_equal(lease_end_real(&s, 1), 0);
    assert_true(kms_lease_vote_allowed(&s.n[1].l, 4, now_of(&s, 1)));
}

/* Leadership transfer: once releasing, no lease anywhere, and by the time
 * the release wait is over every node may vote. */
static void test_transfer_release(void **state)
{
    struct sim s;
    (void)state;
    sim_ready(&s, 3, 3);
    s.n[0].v.releasing = true;
    assert_int_equal(lease_end_real(&s, 0), 0);
    uint64_t wait = kms_lease_release_wait_us(&s.n[0].l, now_of(&s, 0));
    assert_true(wait > 0 && wait <= 2 * ET);
    /* Heartbeats continue unflagged during the wait. */
    uint64_t until = s.real + wait;
    while (s.real < until) {
        sim_round(&s, 0, 2000, NULL);
        s.real += 100000;
        for (size_t i = 0; i < 3; i++) {
            assert_true(lease_end_real(&s, i) == 0 || i != 0);
        }
    }
    s.real = until;
    for (size_t i = 0; i < 3; i++) {
        assert_true(kms_lease_vote_allowed(&s.n[i].l, 3, now_of(&s, i)));
        assert_int_equal(lease_end_real(&s, i), 0);
    }
}

/* Membership: a voter added later counts only once it echoes; removing
 * voters changes the quorum. */
static void test_membership_change(void **state)
{
    struct sim s;
    (void)state;
    sim_init(&s, 5);
    s.real += 2 * ET;
    /* Start as a 3-voter cluster of nodes 0..2. */
    for (size_t i = 0; i < 5; i++) {
        s.n[i].v.n_voters = 3;
    }
    make_leader(&s, 0, 2);
    bool down[MAXN] = {false, false, false, true, true};
    for (int r = 0; r < 3; r++) {
        sim_round(&s, 0, 2000, down);
        s.real += 100000;
    }
    assert_true(lease_end_real(&s, 0) > s.real);
    /* Grow to 5 voters; nodes 3 and 4 have not echoed yet and node 2 is
     * down: 2 of 5 is no quorum. */
    for (size_t i = 0; i < 5; i++) {
        s.n[i].v.n_voters = 5;
    }
    down[2] = true;
    s.real += 2 * ET;
    sim_round(&s, 0, 2000, down);
    assert_int_equal(lease_end_real(&s, 0), 0);
    down[3] = false;
    sim_round(&s, 0, 2000, down);
    assert_true(lease_end_real(&s, 0) > s.real);
}

/* Issue 4(a): five nodes, {leader, F1} | {F2, F3, F4}. F1 keeps hearing
 * the old leader; its lease must end before the majority can elect. */
static void test_five_node_partial_partition(void **state)
{
    struct sim s;
    bool minority_view[MAXN] = {false, false, true, true, true};
    (void)state;
    sim_ready(&s, 5, 3);
    uint64_t cut = s.real;
    uint64_t leader_end = 0, f1_end = 0;
    for (int r = 0; r < 40; r++) {
        sim_round(&s, 0, 2000, minority_view);
        s.real += 100000;
        uint64_t le = lease_end_real(&s, 0), fe = lease_end_real(&s, 1);
        leader_end = le > leader_end ? le : leader_end;
        f1_end = fe > f1_end ? fe : f1_end;
    }
    /* The majority side may elect once F2..F4's promises end. */
    uint64_t elect = 0;
    for (size_t i = 2; i < 5; i++) {
        uint64_t t = vote_free_real(&s, i, 2);
        elect = t > elect ? t : elect;
    }
    (void)cut;
    assert_true(f1_end <= leader_end);
    assert_true(leader_end <= elect);
    assert_true(f1_end < elect);
    assert_int_equal(lease_end_real(&s, 1), 0);
    assert_int_equal(lease_end_real(&s, 0), 0);
}

/* Clock rates that differ within the 5 % bound keep the order of ends. */
static void test_clock_rate_skew(void **state)
{
    struct sim s;
    (void)state;
    sim_init(&s, 3);
    s.n[0].rate = 0.96; /* leader's clock slow: its lease looks longer */
    s.n[1].rate = 1.0;
    s.n[2].rate = 1.0;
    s.real += 3 * ET;
    make_leader(&s, 0, 2);
    settle(&s, 0, 3);
    uint64_t le = lease_end_real(&s, 0);
    assert_true(le > s.real);
    assert_true(vote_free_real(&s, 1, 2) >= le);
    assert_true(vote_free_real(&s, 2, 2) >= le);
    assert_true(lease_end_real(&s, 1) <= le);
}

/* A node that starts refuses every vote for one election timeout (its
 * promises died with the previous process). */
static void test_restart_promise(void **state)
{
    struct kms_lease l;
    struct kms_lease_config cfg = {.self_id = 1, .election_us = ET};
    (void)state;
    kms_lease_init(&l, &cfg, 5000000);
    assert_false(kms_lease_vote_allowed(&l, 1, 5000000));
    assert_false(kms_lease_vote_allowed(&l, 99, 5000000 + ET - 1));
    assert_true(kms_lease_vote_allowed(&l, 99, 5000000 + ET));
}

/* Echoes that claim a future time, or stamps from ourselves, are ignored. */
static void test_bogus_stamps(void **state)
{
    struct sim s;
    (void)state;
    sim_init(&s, 3);
    s.real += 2 * ET;
    make_leader(&s, 0, 2);
    struct kms_transport_stamp st = {.sent_us = 1, .echo_us = now_of(&s, 0) + 10 * ET,
                                     .term = 2, .flags = KMS_STAMP_ECHO_PROMISED};
    kms_lease_on_stamp(&s.n[0].l, 2, &st, now_of(&s, 0), &s.n[0].v);
    kms_lease_on_stamp(&s.n[0].l, 3, &st, now_of(&s, 0), &s.n[0].v);
    assert_int_equal(lease_end_real(&s, 0), 0);
    kms_lease_on_stamp(&s.n[0].l, 1, &st, now_of(&s, 0), &s.n[0].v);
    assert_int_equal(lease_end_real(&s, 0), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_leader_lease_bounded_by_promises),
        cmocka_unit_test(test_no_lease_before_barrier),
        cmocka_unit_test(test_follower_lease_inside_leader_lease),
        cmocka_unit_test(test_follower_lease_waits_for_commit),
        cmocka_unit_test(test_follower_restart_and_sends_to_down_peer),
        cmocka_unit_test(test_delayed_stamp_gives_no_lease),
        cmocka_unit_test(test_pause),
        cmocka_unit_test(test_term_change),
        cmocka_unit_test(test_transfer_release),
        cmocka_unit_test(test_membership_change),
        cmocka_unit_test(test_five_node_partial_partition),
        cmocka_unit_test(test_clock_rate_skew),
        cmocka_unit_test(test_restart_promise),
        cmocka_unit_test(test_bogus_stamps),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
