#!/usr/bin/python3
"""Election time after a leader crash: three kms-raft-harness nodes on
loopback (mutual TLS, RocksDB store, default timeouts unless given), a
proposal load on the leader, kill -9 of the leader, then every surviving
node is polled with a one-entry proposal until one commits. The figure is
kill -> first committed proposal on the new leader: detection, pre-vote,
vote, the new leader's term-start barrier and one commit round trip. The old
leader is restarted between rounds.

The ceiling printed beside it is the election timeout itself: no follower
may vote before it (the promise rule, docs/architecture.md), so 1.0x is the
floor and raft's randomised timeouts put the typical case at 1-1.5x.

Usage: bench/bench_election.py [--build DIR] [--rounds N] [--election-ms MS]
Ports 25700-25799. Prints min/median/max and a Markdown row.
"""
import argparse
import os
import statistics
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "tests", "integration"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.environ.get("KMS_BUILD_DIR",
                                                      os.path.join(here, "..", "build", "release")))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--election-ms", type=int, default=1000)
    ap.add_argument("--heartbeat-ms", type=int, default=100)
    args = ap.parse_args()
    os.environ["KMS_BUILD_DIR"] = os.path.abspath(args.build)
    from raft_lib import Cluster, log  # noqa: E402
    from test_raft_failover import first_commit_after_kill  # noqa: E402

    times = []
    with Cluster("bench-election", 25700, 3, election_ms=args.election_ms,
                 heartbeat_ms=args.heartbeat_ms) as c:
        c.start_all()
        peers = c.initial()
        for rnd in range(args.rounds):
            leader = c.wait_leader(30)
            leader.send("propose 100000 200 4 3000")
            time.sleep(0.5)
            t_kill = time.monotonic()
            leader.kill9()
            new, ms = first_commit_after_kill(c, leader, t_kill, timeout=30)
            times.append(ms)
            log("round %d: killed leader %d, node %d committed after %.0f ms"
                % (rnd + 1, leader.id, new.id, ms))
            leader.start(peers=peers)
            c.wait_converged(timeout=60)
    et = args.election_ms
    med = statistics.median(times)
    print("ELECTION rounds=%d min=%.0f median=%.0f max=%.0f ms (election timeout %d ms, "
          "heartbeat %d ms; median = %.2fx the timeout)"
          % (len(times), min(times), med, max(times), et, args.heartbeat_ms, med / et))
    print("| %d | %d | %.0f | %.0f | %.0f | %.2fx |"
          % (et, len(times), min(times), med, max(times), med / et))


if __name__ == "__main__":
    main()
