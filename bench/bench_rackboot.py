#!/usr/bin/python3
"""Rack boot: 1,000 and 5,000 Talos nodes x 3 volumes unsealing at once.

A local three-node kmsd quorum holds --blobs sealed volume keys. Each
simulated node (bench/kmsbench -op rack) starts at a uniformly random moment
within --window and unseals its --volumes volumes one after the other, every
Unseal over a NEW TCP + TLS 1.3 connection (as Talos does), node i's first
endpoint being replica i mod 3 (DNS round robin). Reported per rack size:
total time from power-on to the last volume unsealed, p50/p90/p99/max
latency per Unseal, failures (must be 0), and the margin to Talos's 10 s
deadline per call. The client runs on the same machine and pays for every
handshake too.

--talos-retry 30s retries as Talos does (any RPC error: retry every 30 s, no
backoff): a failed Unseal is called again that long after the failure, on
the next endpoint, up to 10 calls per volume, and the node moves on to its
next volume only once this one is unsealed or out of calls. The first
table then shows first attempts only; a second table shows first-attempt
failures, the failed calls that were retried (by code), the volumes lost
(still sealed after 10 calls: must be 0) and the time from each node's
power-on to each volume unsealed and to its last volume. Exit status 1 on
any failure without --talos-retry, on lost volumes or wrong bytes with it.

  bench/bench_rackboot.py [--build-dir build/release] [--nodes 1000,5000]
                          [--volumes 3] [--window 2s] [--blobs 300]
                          [--talos-retry 0s] [--base-port 32540]
                          [--json FILE] [--lat-dir DIR]
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)


def seconds(d):
    """Go duration string ("30s", "500ms", "1m") -> seconds."""
    for unit, mul in (("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if d.endswith(unit):
            return float(d[:-len(unit)]) * mul
    return float(d)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default=os.environ.get("KMS_BUILD_DIR")
                    or os.path.join(SRC, "build", "release"))
    ap.add_argument("--nodes", default="1000,5000")
    ap.add_argument("--volumes", type=int, default=3)
    ap.add_argument("--window", default="2s")
    ap.add_argument("--blobs", type=int, default=300, help="distinct sealed volume keys")
    ap.add_argument("--talos-retry", default="0s",
                    help="retry a failed Unseal after this, like Talos (30s); 0s = no retry")
    ap.add_argument("--base-port", type=int, default=32540)
    ap.add_argument("--json")
    ap.add_argument("--lat-dir")
    a = ap.parse_args()
    retry = seconds(a.talos_retry) > 0
    build = os.path.abspath(a.build_dir)
    kmsbench = os.path.join(build, "bench", "kmsbench", "kmsbench")
    if not os.access(kmsbench, os.X_OK):
        sys.exit(f"bench_rackboot: {kmsbench} not built")
    sys.path.insert(0, os.path.join(SRC, "tests", "integration"))
    os.environ["KMS_BUILD_DIR"], os.environ["KMS_SOURCE_DIR"] = build, SRC
    os.environ["KMSD_RATE_LIMIT_SEALS_PER_MINUTE"] = "10000000"
    import kmslib
    c = kmslib.Cluster(nodes=3, base=a.base_port)
    results = []
    try:
        c.up()
        c.init()
        blobs = os.path.join(c.dir, "blobs.jsonl")
        got = 0
        with open(blobs, "w") as out:
            for _ in range(20):
                part = blobs + ".part"
                p = subprocess.run([kmsbench, "-op", "seal", "-ca", c.ca(), "-endpoints",
                                    c.endpoints(), "-clients", "8", "-warmup", "0s",
                                    "-duration", "1s", "-blobs-out", part],
                                   capture_output=True, text=True, timeout=120,
                                   env=dict(os.environ))
                with open(part) as f:
                    for line in f:
                        if got < a.blobs:
                            out.write(line)
                            got += 1
                if got >= a.blobs:
                    break
        if got < a.blobs:
            raise RuntimeError(f"only {got} blobs sealed")
        for n in [int(x) for x in a.nodes.split(",")]:
            lat = os.path.join(a.lat_dir, f"rack-{n}.txt") if a.lat_dir else None
            cmd = [kmsbench, "-op", "rack", "-ca", c.ca(), "-endpoints", c.endpoints(),
                   "-nodes", str(n), "-volumes", str(a.volumes), "-window", a.window,
                   "-blobs", blobs, "-retry-every", a.talos_retry]
            if lat:
                cmd += ["-lat", lat]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=900 + (10 * (10 + seconds(a.talos_retry)) if retry else 0))
            r = json.loads(p.stdout)
            r["loadavg"] = os.getloadavg()[0]
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        c.down()
        if not c.keep:
            shutil.rmtree(c.dir, ignore_errors=True)
    print(f"\nRack boot, {a.volumes} volumes per node, nodes start within {a.window}, new TLS "
          f"connection per Unseal; {os.cpu_count()} CPUs, {platform.release()}"
          + (f"; first attempts only (Talos retry every {a.talos_retry} below)" if retry else "")
          + "\n")
    print("| nodes | unseals | total s | p50 ms | p90 ms | p99 ms | max ms | failures | "
          "p99 margin to 10 s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        fails = sum(r.get("first_failures", r["failures"]).values())
        print(f"| {r['nodes']} | {r['ok'] + fails} | {r['total_s']:.2f} | {r.get('p50_ms', 0):.0f} | "
              f"{r.get('p90_ms', 0):.0f} | {r.get('p99_ms', 0):.0f} | {r.get('max_ms', 0):.0f} | "
              f"{fails} | {10000 / max(r.get('p99_ms', 1), 1):.1f}x |")
    if retry:
        print(f"\nTalos retry: a failed Unseal is called again {a.talos_retry} after the failure "
              f"on the next endpoint, up to {results[0]['max_attempts'] if results else 10} calls "
              "per volume; times from each node's power-on\n")
        print("| nodes | volumes | first-attempt failures | retried calls by code | lost | "
              "total s | volume-ready p50 / p99 / max s | node-done p99 s |")
        print("|---:|---:|---:|---|---:|---:|---:|---:|")
        for r in results:
            by = ", ".join(f"{n} {c}" for c, n in sorted(r["retried"].items(), key=lambda x: -x[1]))
            print(f"| {r['nodes']} | {r['nodes'] * r['volumes']} | "
                  f"{sum(r['first_failures'].values())} | {sum(r['retried'].values())}"
                  f"{' (' + by + ')' if by else ''} | {r['lost']} | {r['total_s']:.2f} | "
                  f"{r.get('volume_p50_ms', 0) / 1000:.2f} / {r.get('volume_p99_ms', 0) / 1000:.2f} / "
                  f"{r.get('volume_max_ms', 0) / 1000:.2f} | {r.get('node_done_p99_s', 0):.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    if retry:
        sys.exit(1 if any(r["lost"] or r["wrong_bytes"] for r in results) else 0)
    sys.exit(1 if any(r["failures"] for r in results) else 0)


if __name__ == "__main__":
    main()
