#!/usr/bin/python3
"""Raft commit rate: committed proposals/s of 200-byte PutRecord entries on
three local nodes (kms-raft-harness, mutual TLS on loopback, RocksDB store)
with 1, 16 and 64 proposals in flight, plus same-run ceilings for context:

  - the raw fsync rate of the disk holding the data (4 KiB write + fdatasync),
  - the same proposals on a single node with no peers.

Usage: bench/bench_raft.py [--build DIR] [--n N] [--size BYTES] [--tls]
Ports 25600-25699. Prints a Markdown table (pasted into docs/benchmarks.md).
"""
import argparse
import os
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "tests", "integration"))
from raft_lib import Cluster  # noqa: E402


def run_rates(cluster, leader, n, size, inflights):
    out = {}
    for k in inflights:
        cnt = n if k > 1 else max(200, n // 4)
        leader.cmd("propose %d %d %d 10000" % (min(200, cnt), size, k), 120)  # warm-up
        r = leader.cmd("propose %d %d %d 10000" % (cnt, size, k), 300)
        if r["committed"] != cnt:
            raise SystemExit("benchmark run failed: %s" % r)
        out[k] = r
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.environ.get("KMS_BUILD_DIR", os.path.join(here, "..", "build", "release")))
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--size", type=int, default=200)
    args = ap.parse_args()
    os.environ["KMS_BUILD_DIR"] = os.path.abspath(args.build)
    inflights = (1, 16, 64)

    with Cluster("bench-raft-1", 25600, 1) as c1:
        c1.start_all()
        leader = c1.wait_leader(15)
        probe = leader.cmd("fsyncprobe %s 500" % c1.workdir, 120)
        single = run_rates(c1, leader, args.n, args.size, inflights)

    with Cluster("bench-raft-3", 25650, 3) as c3:
        c3.start_all()
        leader = c3.wait_leader(15)
        three = run_rates(c3, leader, args.n, args.size, inflights)
        c3.wait_converged(timeout=60)

    print()
    print("Entry: PutRecord with a %d-byte ciphertext (%s); data dir on the same disk as the probe." %
          (args.size, "about %d bytes framed" % (args.size + 100)))
    print("Raw disk: %.0f fdatasync/s (4 KiB write + fdatasync, 500 rounds)." % probe["rate"])
    print()
    print("| in flight | 3 nodes: commits/s | avg latency ms | 1 node (no peers): commits/s |")
    print("|---:|---:|---:|---:|")
    for k in inflights:
        print("| %d | %.0f | %.2f | %.0f |" % (k, three[k]["rate"], three[k]["lat_avg_ms"], single[k]["rate"]))


if __name__ == "__main__":
    main()
