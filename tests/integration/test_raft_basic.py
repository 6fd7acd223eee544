#!/usr/bin/python3
"""Raft (a): three nodes elect a leader, commit 1,000 proposals, and every
node ends with the identical store digest. Also: followers refuse proposals
with the leader's identity, hold a read lease, and wait_applied works; the
read lease (docs/architecture.md "Read leases") is lost within one election timeout when the leader
freezes (SIGSTOP) or loses its followers, and a frozen-then-resumed old
leader does not claim a lease."""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from raft_lib import Cluster, check, log  # noqa: E402


def main():
    with Cluster("raft-basic", 25100, 3) as c:
        c.start_all()
        leader = c.wait_leader(15)
        log("leader is node %d" % leader.id)
        r = leader.cmd("propose 1000 200 16 10000", 120)
        log("propose: %s" % r)
        check(r["committed"] == 1000 and r["apply_errors"] == 0, "1000 proposals committed and applied")
        followers = [n for n in c.running() if n is not leader]
        for f in followers:
            fr = f.cmd("propose 1 64 1 2000")
            check(fr["notleader"] == 1 and fr["committed"] == 0, "follower %d refuses: %s" % (f.id, fr["error"]))
            st = f.status()
            check(st["leader_id"] == leader.id and st["leader_address"] == leader.addr,
                  "follower %d knows leader %d at %s" % (f.id, leader.id, leader.addr))
            w = f.cmd("wait_applied %d 10000" % r["max_index"], 15)
            check(w["ok"], "follower %d applied through %d" % (f.id, r["max_index"]))
        # Every proposal gets its own entry's result: raft 0.22 fires apply
        # callbacks after a whole batch, so results reused by the store were
        # once handed to the wrong caller (a revoke answered "already exists").
        r2 = leader.cmd("propose_dup 400 64 32 10000", 120)
        check(r2["committed"] == 400 and r2["apply_errors"] == 200 and r2["mismatched"] == 0,
              "400 proposals of 200 keys twice, 32 in flight: 200 EEXIST, each naming its own key "
              "(mismatched %d)" % r2["mismatched"])
        d = c.wait_converged(timeout=30)
        check(d["count"] == 1200, "digest %s... identical on 3 nodes, 1200 records" % d["digest"][:16])
        for n in c.running():
            st = n.status()
            check(st["lease"], "node %d (%s) holds a read lease" % (n.id, st["role"]))
            check(len(st["members"]) == 3 and all(m["role"] == "voter" for m in st["members"]),
                  "node %d sees 3 voters" % n.id)

        # -- lease: followers freeze -> the leader loses its lease
        for f in followers:
            f.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        while leader.cmd("lease")["lease"]:
            if time.monotonic() - t0 > 3:
                break
            time.sleep(0.01)
        lost_ms = (time.monotonic() - t0) * 1000
        check(lost_ms <= c.election_ms + 150,
              "leader lost its lease %.0f ms after its followers froze" % lost_ms)
        # proposals without a quorum: the leader steps down (no contact with a
        # majority for an election timeout) and reports them as uncertain
        r = leader.cmd("propose 3 200 3 8000", 20)
        check(r["committed"] == 0 and r["unavail"] + r["timedout"] == 3,
              "proposals without a quorum are not reported committed (unavail %d, timed out %d: %s)"
              % (r["unavail"], r["timedout"], r["error"]))
        for f in followers:
            f.proc.send_signal(signal.SIGCONT)
        leader = c.wait_leader(15)

        # -- lease: the leader freezes -> followers lose theirs before a new leader exists
        followers = [n for n in c.running() if n is not leader]
        leader.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        lost = {}
        while len(lost) < len(followers) and time.monotonic() - t0 < 5:
            for f in followers:
                if f.id not in lost and not f.cmd("lease")["lease"]:
                    lost[f.id] = (time.monotonic() - t0) * 1000
            time.sleep(0.01)
        check(len(lost) == 2 and max(lost.values()) <= c.election_ms + 150,
              "followers lost their leases %s ms after the leader froze" % {k: round(v) for k, v in lost.items()})
        newl = c.wait_leader(15, among=followers)
        t_new = (time.monotonic() - t0) * 1000
        check(t_new >= max(lost.values()), "new leader %d (after %.0f ms) only after the leases ended" % (newl.id, t_new))
        leader.proc.send_signal(signal.SIGCONT)
        first = leader.cmd("lease", 10)
        check(not first["lease"], "resumed old leader %d claims no lease" % leader.id)
        r = newl.cmd("propose 10 200 1 10000", 30)
        check(r["committed"] == 10, "new leader commits")
        d = c.wait_converged(timeout=30)
        check(d["count"] in (1210, 1213), "all 3 identical after the freezes, %d records" % d["count"])
    log("PASS")


if __name__ == "__main__":
    main()
