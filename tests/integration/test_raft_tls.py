#!/usr/bin/python3
"""Raft (e): the mutual-TLS raft transport. Three nodes with certificates
from deploy/gen-pki.sh form a cluster and commit; a node whose certificate
comes from a foreign CA can neither join (the leader cannot replicate to it)
nor send entries to a member (it makes itself leader of a one-node cluster
and tries to add a real member: the member refuses the handshake, its state
and term do not move). Skipped while the transport or gen-pki.sh is missing."""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from raft_lib import Cluster, check, log  # noqa: E402

SRC = os.environ.get("KMS_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def first_existing(d, names):
    for n in names:
        p = os.path.join(d, n)
        if os.path.exists(p):
            return p
    raise SystemExit("gen-pki.sh did not produce any of %s in %s" % (names, d))


def main():
    genpki = os.path.join(SRC, "deploy", "gen-pki.sh")
    with Cluster("raft-tls", 25500, 3) as c:
        pki = os.path.join(c.workdir, "pki")
        subprocess.run([genpki, pki, "--nodes", "3"], check=True, stdout=subprocess.DEVNULL)
        ca = first_existing(pki, ["ca.pem"])

        def tls(n):
            return ["--cert", first_existing(pki, ["node%d.pem" % n.id]),
                    "--key", first_existing(pki, ["node%d-key.pem" % n.id, "node%d.key" % n.id]),
                    "--ca", ca]

        c.start_all(extra=tls)
        peers = c.initial()
        leader = c.wait_leader(20)
        r = leader.cmd("propose 300 200 16 10000", 60)
        check(r["committed"] == 300, "300 proposals committed over mutual TLS")
        rl = leader.cmd("reload", 10)
        check(rl["ok"], "leader reloads its raft certificates")
        r = leader.cmd("propose 10 200 2 10000", 60)
        check(r["committed"] == 10, "commits after the reload")
        before = c.wait_converged(timeout=30)
        term_before = {n.id: n.status()["term"] for n in c.running()}

        fcert = first_existing(pki, ["foreign-node1.pem"])
        fkey = first_existing(pki, ["foreign-node1-key.pem", "foreign-node1.key"])

        # -- a foreign-CA node cannot join
        f4 = c.new_node(4)
        f4.start(extra=["--cert", fcert, "--key", fkey, "--ca", ca])
        a = leader.cmd("add 4 %s 6000" % f4.addr, 15)
        check(not a["ok"], "adding the foreign-CA node fails: %s %s" % (a["code"], a["error"]))
        time.sleep(1.0)
        st4 = f4.status()
        check(st4["store_count"] == 0 and st4["applied"] == 0 and st4["role"] != "leader",
              "foreign node received nothing (applied %d, %d records)" % (st4["applied"], st4["store_count"]))
        r = leader.cmd("propose 50 200 4 10000", 60)
        check(r["committed"] == 50, "cluster keeps committing with the foreign node refused")

        # -- a foreign-CA node cannot send entries to a member
        # It claims id 1, matching its certificate's CN (kmsd-node-1), so only
        # the CA tells it apart from the real node 1.
        f9 = c.new_node(1, port=c.base_port + 9, key="foreign")
        f9.start(peers=[f9], extra=["--cert", fcert, "--key", fkey, "--ca", ca])
        c.wait_leader(15, among=[f9])
        victim = next(n for n in c.running() if n is not leader and n.id != 1 and n in peers)
        vs0 = victim.status()
        f9.cmd("propose 20 200 1 5000", 30)
        a = f9.cmd("add %d %s 5000" % (victim.id, victim.addr), 15)
        log("foreign leader adding member %d: %s" % (victim.id, a))
        time.sleep(1.5)
        vs1 = victim.status()
        check(vs1["leader_id"] == leader.id and vs1["term"] == term_before[victim.id],
              "member %d still follows %d in term %d" % (victim.id, leader.id, vs1["term"]))
        d = victim.digest()
        check(d["count"] == before["count"] + 50 and vs1["last_index"] >= vs0["last_index"],
              "member %d state untouched by the foreign node (%d records)" % (victim.id, d["count"]))
        with open(os.path.join(c.workdir, victim.logname), errors="replace") as fh:
            vlog = fh.read()
        check("connection rejected" in vlog and "certificate verify failed" in vlog,
              "member %d logged the rejected foreign handshakes" % victim.id)
        for n in (f4, f9):
            n.quit()
        del c.nodes[4], c.nodes["foreign"]
        d = c.wait_converged(timeout=30)
        check(d["count"] == 360, "3 members identical, 360 records")
        for n in c.running():
            check(n.status()["term"] == term_before[n.id], "node %d term unchanged" % n.id)
    log("PASS")


if __name__ == "__main__":
    main()
