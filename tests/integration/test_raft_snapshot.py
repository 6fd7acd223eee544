#!/usr/bin/python3
"""Raft (c): a node down across several snapshots (threshold 64, trailing 16)
catches up through snapshot install: digest identical, the harness reports a
snapshot restore, and snapshot files exist in the raft directories."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from raft_lib import Cluster, check, log  # noqa: E402


def snapshots_in(node):
    d = os.path.join(node.dir, "raft")
    return sorted(f for f in os.listdir(d) if f.startswith("snapshot-") and not f.endswith(".meta"))


def main():
    with Cluster("raft-snapshot", 25300, 3, snapshot_threshold=64, snapshot_trailing=16) as c:
        c.start_all()
        peers = c.initial()
        leader = c.wait_leader(15)
        r = leader.cmd("propose 100 200 8 10000", 60)
        check(r["committed"] == 100, "100 proposals committed")
        c.wait_converged(timeout=30)
        victim = next(n for n in peers if n is not leader)
        victim_last = victim.status()["last_index"]
        victim.kill9()
        log("killed follower %d at last index %d" % (victim.id, victim_last))
        r = leader.cmd("propose 400 200 8 10000", 60)
        check(r["committed"] == 400, "400 proposals committed with the follower down")
        st = leader.status()
        check(st["snapshot_index"] > victim_last + 64,
              "leader took snapshots past the follower's log (snapshot index %d > %d + 64)"
              % (st["snapshot_index"], victim_last))
        check(len(snapshots_in(leader)) >= 1, "leader raft dir holds snapshots %s" % snapshots_in(leader))
        victim.start(peers=peers)
        d = c.wait_converged(timeout=40)
        check(d["count"] == 500, "follower caught up: digests identical, 500 records")
        vs = victim.status()
        check(vs["snapshots_restored"] >= 1, "follower %d installed %d snapshot(s) from the leader"
              % (victim.id, vs["snapshots_restored"]))
        # the restored follower keeps applying new entries normally
        r = leader.cmd("propose 50 200 4 10000", 60)
        check(r["committed"] == 50, "50 more committed after the install")
        d = c.wait_converged(timeout=30)
        check(d["count"] == 550, "still identical after further entries")
        # and a restart of the follower loads from its own snapshot + log
        victim.kill9()
        time.sleep(0.2)
        victim.start(peers=peers)
        d = c.wait_converged(timeout=30)
        check(d["count"] == 550, "follower restarted from its own snapshot, digests identical")
    log("PASS")


if __name__ == "__main__":
    main()
