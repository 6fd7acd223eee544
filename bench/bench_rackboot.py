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

  bench/bench_rackboot.py [--build-dir build/release] [--nodes 1000,5000]
                          [--volumes 3] [--window 2s] [--blobs 300]
                          [--base-port 32540] [--json FILE] [--lat-dir DIR]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default=os.environ.get("KMS_BUILD_DIR")
                    or os.path.join(SRC, "build", "release"))
    ap.add_argument("--nodes", default="1000,5000")
    ap.add_argument("--volumes", type=int, default=3)
    ap.add_argument("--window", default="2s")
    ap.add_argument("--blobs", type=int, default=300, help="distinct sealed volume keys")
    ap.add_argument("--base-port", type=int, default=32540)
    ap.add_argument("--json")
    ap.add_argument("--lat-dir")
    a = ap.parse_args()
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
                   "-blobs", blobs]
            if lat:
                cmd += ["-lat", lat]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            r = json.loads(p.stdout)
            r["loadavg"] = os.getloadavg()[0]
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        c.down()
        if not c.keep:
            shutil.rmtree(c.dir, ignore_errors=True)
    print(f"\nRack boot, {a.volumes} volumes per node, nodes start within {a.window}, new TLS "
          f"connection per Unseal; {os.cpu_count()} CPUs, {platform.release()}\n")
    print("| nodes | unseals | total s | p50 ms | p90 ms | p99 ms | max ms | failures | "
          "p99 margin to 10 s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        fails = sum(r["failures"].values())
        print(f"| {r['nodes']} | {r['ok'] + fails} | {r['total_s']:.2f} | {r.get('p50_ms', 0):.0f} | "
              f"{r.get('p90_ms', 0):.0f} | {r.get('p99_ms', 0):.0f} | {r.get('max_ms', 0):.0f} | "
              f"{fails} | {10000 / max(r.get('p99_ms', 1), 1):.1f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    sys.exit(1 if any(r["failures"] for r in results) else 0)


if __name__ == "__main__":
    main()
