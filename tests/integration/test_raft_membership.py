#!/usr/bin/python3
"""Raft (d): grow 3 -> 5 members (new nodes start empty and are added as
spare then promoted to voter once caught up), shrink back to 3, transfer
leadership (to any, then to a named node)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from raft_lib import Cluster, check, log  # noqa: E402


def voters(st):
    return sorted(m["id"] for m in st["members"] if m["role"] == "voter")


def main():
    with Cluster("raft-membership", 25400, 3) as c:
        c.start_all()
        leader = c.wait_leader(15)
        r = leader.cmd("propose 300 200 16 10000", 60)
        check(r["committed"] == 300, "300 proposals committed on 3 nodes")

        n4, n5 = c.new_node(4), c.new_node(5)
        n4.start()  # no initial cluster: empty, waits to be added
        n5.start()
        check(n4.status()["role"] in ("follower", "unavailable") and not n4.status()["members"],
              "node 4 starts with an empty configuration")
        for n in (n4, n5):
            a = leader.cmd("add %d %s 30000" % (n.id, n.addr), 40)
            check(a["ok"], "added node %d as voter in %d ms" % (n.id, a["ms"]))
        again = leader.cmd("add 4 %s 5000" % n4.addr, 10)
        check(again["ok"], "adding an existing voter again is a no-op")
        st = leader.status()
        check(voters(st) == [1, 2, 3, 4, 5], "5 voters: %s" % voters(st))
        r = leader.cmd("propose 200 200 16 10000", 60)
        check(r["committed"] == 200, "200 proposals committed on 5 nodes")
        d = c.wait_converged(timeout=30)
        check(d["count"] == 500, "5 nodes identical, 500 records")

        for n in (n4, n5):
            rm = leader.cmd("remove %d 10000" % n.id, 15)
            check(rm["ok"], "removed node %d" % n.id)
        bad = leader.cmd("remove 4 2000", 5)
        check(not bad["ok"] and bad["code"] == "KMS_ENOTFOUND", "removing a non-member: KMS_ENOTFOUND")
        st = leader.status()
        check(voters(st) == [1, 2, 3], "back to 3 voters: %s" % voters(st))
        check(n4.quit() == 0 and n5.quit() == 0, "removed nodes stop cleanly")
        del c.nodes[4], c.nodes[5]
        r = leader.cmd("propose 100 200 8 10000", 60)
        check(r["committed"] == 100, "100 proposals committed on 3 nodes again")

        # -- leadership transfer: to any voter, then to a named one
        old = leader
        t = old.cmd("transfer 0 10000", 15)
        check(t["ok"], "transfer to any voter in %d ms" % t["ms"])
        leader = c.wait_leader(10)
        check(leader is not old, "leadership moved from %d to %d" % (old.id, leader.id))
        target = next(n for n in c.running() if n is not leader)
        t = leader.cmd("transfer %d 10000" % target.id, 15)
        check(t["ok"], "transfer to node %d in %d ms" % (target.id, t["ms"]))
        leader = c.wait_leader(10)
        check(leader is target, "node %d leads" % target.id)
        nl = old.cmd("transfer 0 2000") if old is not leader else None
        if nl is not None:
            check(not nl["ok"] and nl["code"] == "KMS_ENOTLEADER", "transfer on a follower: KMS_ENOTLEADER")
        r = leader.cmd("propose 100 200 8 10000", 60)
        check(r["committed"] == 100, "new leader commits")
        d = c.wait_converged(timeout=30)
        check(d["count"] == 700, "3 nodes identical, 700 records")
    log("PASS")


if __name__ == "__main__":
    main()
