#!/usr/bin/python3
"""Seal throughput: kmsd Seal against etcd 3.4 Put, same client, same run.

A local three-node kmsd quorum and a local three-member etcd 3.4 cluster
(the Debian etcd-server package, default durability: fsync on every commit,
plaintext on loopback) run side by side in one temp dir. The same grpc-go
load generator (bench/kmsbench: one warm connection per client, client i on
member i mod 3, one call in flight per client) drives kmsd Seal (32 bytes,
a fresh node UUID per call, TLS) and etcd KV/Put (32-byte value), at each
client count, kmsd and etcd interleaved, --rounds times; the table gives the
median of the rounds. Every acknowledged Seal is committed on a quorum of
kmsd replicas (fsync) before its OK, like an etcd Put.

  bench/bench_seal.py [--build-dir build/release] [--clients 1,16,64]
                      [--duration 8s] [--rounds 3] [--base-port 32400]
                      [--json FILE] [--lat-dir DIR]

Installs etcd-server (apt-get) when /usr/bin/etcd is missing and the user is
root. Ports: base .. base+23 (kmsd), base+50 .. base+55 (etcd).
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default=os.environ.get("KMS_BUILD_DIR")
                    or os.path.join(SRC, "build", "release"))
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--duration", default="8s")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base-port", type=int, default=32400)
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--lat-dir", help="write per-run latency files here (for plots)")
    ap.add_argument("--no-etcd", action="store_true", help="kmsd only")
    return ap.parse_args()


def ensure_etcd():
    if shutil.which("etcd"):
        return
    if os.geteuid() != 0:
        sys.exit("bench_seal: etcd not installed (apt-get install etcd-server)")
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "etcd-server"],
                   check=True, timeout=600, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def start_etcd(work, base):
    names = [f"e{i}" for i in range(3)]
    peer = {n: f"http://127.0.0.1:{base + 50 + 2 * i + 1}" for i, n in enumerate(names)}
    client = {n: f"http://127.0.0.1:{base + 50 + 2 * i}" for i, n in enumerate(names)}
    initial = ",".join(f"{n}={peer[n]}" for n in names)
    procs = []
    for n in names:
        log = open(os.path.join(work, f"etcd-{n}.log"), "w")
        procs.append(subprocess.Popen(
            ["etcd", "--name", n, "--data-dir", os.path.join(work, f"etcd-{n}"),
             "--listen-client-urls", client[n], "--advertise-client-urls", client[n],
             "--listen-peer-urls", peer[n], "--initial-advertise-peer-urls", peer[n],
             "--initial-cluster", initial, "--initial-cluster-state", "new",
             "--initial-cluster-token", "kmsd-bench", "--log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT))
    eps = ",".join(c.replace("http://", "") for c in client.values())
    return procs, eps


def cpu_ticks(pids):
    """utime + stime of the processes, in clock ticks."""
    t = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            t += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return t


def run(kmsbench, op, eps, clients, duration, ca=None, lat=None, warmup="1s", pids=()):
    cmd = [kmsbench, "-op", op, "-endpoints", eps, "-clients", str(clients),
           "-duration", duration, "-warmup", warmup]
    if ca:
        cmd += ["-ca", ca]
    if lat:
        cmd += ["-lat", lat]
    t0 = cpu_ticks(pids)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    ticks = cpu_ticks(pids) - t0
    try:
        rep = json.loads(p.stdout)
    except ValueError:
        raise RuntimeError(f"kmsbench {op} failed rc={p.returncode}: {p.stderr[-800:]}")
    rep["loadavg"] = os.getloadavg()[0]
    # Server CPU (all members, warm-up included) per call of the whole run:
    # a figure that depends far less on what else the machine runs.
    secs = float(duration.rstrip("s")) + float(warmup.rstrip("s"))
    calls = rep["ok"] * secs / float(duration.rstrip("s"))
    rep["server_cpu_ms_per_op"] = (1000.0 * ticks / os.sysconf("SC_CLK_TCK") / calls
                                   if calls else 0.0)
    return rep


def wait_ready(kmsbench, op, eps, ca=None, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            r = run(kmsbench, op, eps, 3, "1s", ca=ca, warmup="0s")
            if r["ok"] > 0 and not r["failures"]:
                return
        except RuntimeError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{op} endpoints {eps} not serving within {timeout} s")


def stop(procs):
    for pr in procs:
        pr.terminate()
    for pr in procs:
        try:
            pr.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pr.kill()


def main():
    a = parse_args()
    build = os.path.abspath(a.build_dir)
    kmsbench = os.path.join(build, "bench", "kmsbench", "kmsbench")
    if not os.access(kmsbench, os.X_OK):
        sys.exit(f"bench_seal: {kmsbench} not built (cmake --build {a.build_dir} --target "
                 "kmsbench kmsd kmsctl talosclient)")
    if not a.no_etcd:
        ensure_etcd()
    clients = [int(x) for x in a.clients.split(",")]
    sys.path.insert(0, os.path.join(SRC, "tests", "integration"))
    os.environ["KMS_BUILD_DIR"], os.environ["KMS_SOURCE_DIR"] = build, SRC
    # A benchmark seals from one address far faster than any rack would.
    os.environ["KMSD_RATE_LIMIT_SEALS_PER_MINUTE"] = "10000000"
    # Warm connections carry many calls: lift the per-connection byte budget
    # meant for Talos's one-call connections (limits.talosConnectionBytes).
    os.environ["KMSD_LIMITS_TALOS_CONNECTION_BYTES"] = "0"
    import kmslib
    work = tempfile.mkdtemp(prefix="kmsd-bench-seal-")
    cluster, etcd = None, []
    runs = {"kmsd": {n: [] for n in clients}, "etcd": {n: [] for n in clients}}
    try:
        cluster = kmslib.Cluster(nodes=3, base=a.base_port)
        cluster.up()
        cluster.init()
        ca = cluster.ca()
        wait_ready(kmsbench, "seal", cluster.endpoints(), ca=ca)
        kmsd_pids = [cluster.pid(i) for i in range(1, 4)]
        if not a.no_etcd:
            etcd, etcd_eps = start_etcd(work, a.base_port)
            etcd_pids = [pr.pid for pr in etcd]
            wait_ready(kmsbench, "put", etcd_eps)
        for rnd in range(a.rounds):
            for n in clients:
                lat = (os.path.join(a.lat_dir, f"seal-kmsd-{n}-r{rnd}.txt")
                       if a.lat_dir else None)
                r = run(kmsbench, "seal", cluster.endpoints(), n, a.duration, ca=ca, lat=lat,
                        pids=kmsd_pids)
                runs["kmsd"][n].append(r)
                print(f"round {rnd} clients {n} kmsd seal {r['per_s']:.0f}/s "
                      f"p99 {r['p99_ms']:.1f} ms cpu/op {r['server_cpu_ms_per_op']:.2f} ms "
                      f"fail {r['failures']} load {r['loadavg']:.1f}",
                      file=sys.stderr, flush=True)
                if not a.no_etcd:
                    lat = (os.path.join(a.lat_dir, f"seal-etcd-{n}-r{rnd}.txt")
                           if a.lat_dir else None)
                    r = run(kmsbench, "put", etcd_eps, n, a.duration, lat=lat, pids=etcd_pids)
                    runs["etcd"][n].append(r)
                    print(f"round {rnd} clients {n} etcd put  {r['per_s']:.0f}/s "
                          f"p99 {r['p99_ms']:.1f} ms cpu/op {r['server_cpu_ms_per_op']:.2f} ms "
                          f"fail {r['failures']} "
                          f"load {r['loadavg']:.1f}", file=sys.stderr, flush=True)
    finally:
        stop(etcd)
        if cluster is not None:
            cluster.down()
            if not cluster.keep:
                shutil.rmtree(cluster.dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    def med(rs, k):
        return statistics.median(r[k] for r in rs) if rs else 0.0

    summary = []
    print(f"\nSeal vs etcd 3.4 Put, {a.duration} per point, median of {a.rounds} interleaved "
          f"rounds; {os.cpu_count()} CPUs, {platform.release()}\n")
    print("| clients | kmsd seals/s | kmsd p50 ms | kmsd p99 ms | etcd puts/s | etcd p50 ms | "
          "etcd p99 ms | kmsd / etcd | server CPU ms/op kmsd / etcd | failures kmsd/etcd |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in clients:
        k, e = runs["kmsd"][n], runs["etcd"][n]
        kt, et = med(k, "per_s"), med(e, "per_s")
        fk = sum(sum(r["failures"].values()) + r["wrong_bytes"] for r in k)
        fe = sum(sum(r["failures"].values()) for r in e)
        ratio = kt / et if et else 0.0
        summary.append({"clients": n, "kmsd_per_s": kt, "etcd_per_s": et, "ratio": ratio,
                        "kmsd_p50_ms": med(k, "p50_ms"), "kmsd_p99_ms": med(k, "p99_ms"),
                        "etcd_p50_ms": med(e, "p50_ms"), "etcd_p99_ms": med(e, "p99_ms"),
                        "kmsd_cpu_ms": med(k, "server_cpu_ms_per_op"),
                        "etcd_cpu_ms": med(e, "server_cpu_ms_per_op"),
                        "kmsd_failures": fk, "etcd_failures": fe})
        print(f"| {n} | {kt:.0f} | {med(k, 'p50_ms'):.1f} | {med(k, 'p99_ms'):.1f} | {et:.0f} | "
              f"{med(e, 'p50_ms'):.1f} | {med(e, 'p99_ms'):.1f} | {ratio:.2f}x | "
              f"{med(k, 'server_cpu_ms_per_op'):.2f} / {med(e, 'server_cpu_ms_per_op'):.2f} | "
              f"{fk}/{fe} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": summary, "runs": runs, "duration": a.duration,
                       "rounds": a.rounds, "cpus": os.cpu_count(),
                       "kernel": platform.release()}, f, indent=1)
    sys.exit(1 if any(s["kmsd_failures"] for s in summary) else 0)


if __name__ == "__main__":
    main()
