#!/usr/bin/python3
"""Large data sets: 100,000 and 1,000,000 records end to end through kmsd.

One command builds each data set fast and measures it on a local
three-node cluster (ports --base-port .. +23):
  1. a real cluster seals --real records (warm grpc-go Seals, bench/kmsbench);
     Unseal latency is measured at that size (the "1k" baseline): warm
     connections (kmsbench) and a new TLS connection per call (talosclient
     load, as Talos does);
  2. `kmsctl operator snapshot save` of it; bench/kms-snapshot-fill adds
     filler records (copies of real ones under new key ids and node UUIDs,
     with their index entries) up to N records;
  3. every dataDir is emptied and `kmsd restore` loads the N-record file on
     each node (timed), the nodes start and are unsealed with the OLD shares;
  4. at N records: Unseal p50/p99 of the same real records (both kinds of
     connection), resident memory of every kmsd, `snapshot save` time and
     file size, and restart to serving (stop one node, start it, unseal it:
     time until its Talos port answers an Unseal with the right bytes).

  bench/bench_onemillion.py [--build-dir build/release] [--records 100000,1000000]
                            [--real 1000] [--duration 5s] [--base-port 32500] [--json FILE]

Needs about 1 GB of disk in $TMPDIR for 1M records. Standard library only.
"""
import argparse
import json
import os
import platform
import resource
import shutil
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
    ap.add_argument("--records", default="100000,1000000")
    ap.add_argument("--real", type=int, default=1000)
    ap.add_argument("--duration", default="5s")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--base-port", type=int, default=32500)
    ap.add_argument("--json", help="write raw results here")
    return ap.parse_args()


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def cpu_s(pids):
    """utime + stime of the processes, seconds."""
    from bench_unseal import cpu_ticks  # same directory (sys.path[0])
    return cpu_ticks(pids) / os.sysconf("SC_CLK_TCK")


def settle(pids, limit_s=90.0):
    """Waits until the replicas are idle (under 5 % of a CPU together over
    a second: RocksDB's compactions after a restore of N records are done),
    at most limit_s; returns the seconds waited."""
    t0 = time.time()
    while time.time() - t0 < limit_s:
        c0 = cpu_s(pids)
        time.sleep(1)
        if cpu_s(pids) - c0 < 0.05:
            break
    return time.time() - t0


def du_mb(path):
    total = 0
    for root, _, files in os.walk(path):
        for n in files:
            try:
                total += os.path.getsize(os.path.join(root, n))
            except OSError:
                pass
    return total / 1e6


class Bench:
    def __init__(self, a, kmslib):
        self.a = a
        self.build = os.path.abspath(a.build_dir)
        self.kmsbench = os.path.join(self.build, "bench", "kmsbench", "kmsbench")
        self.fill = os.path.join(self.build, "bench", "kms-snapshot-fill")
        self.talos = os.path.join(self.build, "tests", "integration", "talosclient",
                                  "talosclient")
        self.kmsd = os.path.join(self.build, "src", "server", "kmsd")
        for b in (self.kmsbench, self.fill, self.talos, self.kmsd):
            if not os.access(b, os.X_OK):
                sys.exit(f"bench_onemillion: {b} not built")
        self.c = kmslib.Cluster(nodes=3, base=a.base_port)
        self.work = tempfile.mkdtemp(prefix="kmsd-bench-1m-")
        self.blobs = os.path.join(self.work, "blobs.jsonl")

    def unseal_figures(self):
        eps, ca = self.c.endpoints(), self.c.ca()
        p = subprocess.run([self.kmsbench, "-op", "unseal", "-ca", ca, "-endpoints", eps,
                            "-clients", str(self.a.clients), "-duration", self.a.duration,
                            "-blobs", self.blobs], capture_output=True, text=True, timeout=300)
        warm = json.loads(p.stdout)
        p = subprocess.run([self.talos, "load", "-ca", ca, "-endpoints", eps, "-rotate",
                            "-clients", str(self.a.clients), "-duration", self.a.duration,
                            "-blobs", self.blobs], capture_output=True, text=True, timeout=300)
        new = json.loads(p.stdout)
        return {"warm": {k: warm[k] for k in ("per_s", "p50_ms", "p99_ms", "max_ms", "ok",
                                             "failures", "wrong_bytes")},
                "new_conn": {"per_s": new["ok"] / float(self.a.duration.rstrip("s")),
                             "p50_ms": new["p50_ms"], "p99_ms": new["p99_ms"],
                             "max_ms": new["max_latency_ms"], "ok": new["ok"],
                             "failures": new.get("failures", {}),
                             "wrong_bytes": new.get("wrong_bytes", 0)}}

    def snapshot_save(self, node, path):
        t0 = time.time()
        p = self.c.ctl(node, "operator", "snapshot", "save", path, timeout=900)
        dt = time.time() - t0
        if p.returncode != 0:
            raise RuntimeError(f"snapshot save failed: {p.stderr}")
        return dt, os.path.getsize(path)

    def wait_unseal_ok(self, node, timeout=120):
        with open(self.blobs) as f:
            b = json.loads(f.readline())
        end = time.time() + timeout
        while time.time() < end:
            rc, out = self.c.unseal(self.c.talos(node), b["uuid"], b["blob"])
            if rc == 0 and out == b["data"]:
                return True
            time.sleep(0.05)
        return False

    def start_node(self, i):
        """start-node (unseals with 3 of the old shares), then the first good
        Unseal on its Talos port. Returns seconds from the start."""
        t0 = time.time()
        self.c.local("start-node", str(i), timeout=300)
        if not self.wait_unseal_ok(i):
            raise RuntimeError(f"node {i} never served an Unseal")
        return time.time() - t0

    def run(self):
        a, c = self.a, self.c
        res = {"real": a.real, "sizes": []}
        c.up()
        c.init()
        # 1. real records
        sealed = 0
        with open(self.blobs, "w") as out:
            while sealed < a.real:
                p = subprocess.run([self.kmsbench, "-op", "seal", "-ca", c.ca(), "-endpoints",
                                    c.endpoints(), "-clients", "16", "-warmup", "0s",
                                    "-duration", "2s", "-blobs-out", self.blobs + ".part"],
                                   capture_output=True, text=True, timeout=300)
                if p.returncode != 0:
                    raise RuntimeError(f"kmsbench seal: {p.stderr[-500:]}")
                with open(self.blobs + ".part") as f:
                    for line in f:
                        if sealed < a.real:
                            out.write(line)
                            sealed += 1
        print(f"sealed {sealed} real records", file=sys.stderr, flush=True)
        base = {"records": sealed, "unseal": self.unseal_figures(),
                "rss_mb": [rss_mb(c.pid(i)) for i in range(1, 4)]}
        snap = os.path.join(self.work, "real.snap")
        base["snapshot_save_s"], base["snapshot_bytes"] = self.snapshot_save(1, snap)
        res["base"] = base
        print(f"base: {json.dumps(base)}", file=sys.stderr, flush=True)
        for n in [int(x) for x in a.records.split(",")]:
            big = os.path.join(self.work, f"fill-{n}.snap")
            t0 = time.time()
            subprocess.run([self.fill, snap, big, str(n)], check=True, capture_output=True,
                           timeout=900)
            fill_s = time.time() - t0
            c.local("down")
            restore_s, restore_cpu_s = [], []
            for i in range(1, 4):
                data = os.path.join(c.dir, f"node{i}", "data")
                shutil.rmtree(data, ignore_errors=True)
                os.makedirs(data)
                t0 = time.time()
                ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                p = subprocess.run([self.kmsd, "restore", "--snapshot", big, "--config",
                                    os.path.join(c.dir, f"node{i}", "kmsd.yaml")],
                                   capture_output=True, text=True, timeout=900)
                restore_s.append(time.time() - t0)
                ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                # CPU of the restore itself: on a shared machine the wall
                # time mostly measures the wait for a CPU.
                restore_cpu_s.append(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
                if p.returncode != 0:
                    raise RuntimeError(f"kmsd restore node {i}: {p.stderr[-500:]}")
            os.unlink(big)
            # All three, then the first good Unseal on each (one node alone
            # has no quorum and never serves).
            t0 = time.time()
            for i in range(1, 4):
                self.c.local("start-node", str(i), timeout=300)
            first_start = []
            for i in range(1, 4):
                if not self.wait_unseal_ok(i):
                    raise RuntimeError(f"restored node {i} never served an Unseal")
                first_start.append(time.time() - t0)
            time.sleep(1)
            # Right after the start RocksDB is still compacting what the
            # restore wrote: measured once then, and once it is idle.
            at_start = self.unseal_figures()
            settle_s = settle([c.pid(i) for i in range(1, 4)])
            fig = {"records": n, "fill_s": fill_s, "restore_s": restore_s,
                   "restore_cpu_s": restore_cpu_s, "loadavg": os.getloadavg()[0],
                   "first_start_s": first_start, "unseal_at_start": at_start,
                   "settle_s": settle_s, "unseal": self.unseal_figures(),
                   "rss_mb": [rss_mb(c.pid(i)) for i in range(1, 4)],
                   "data_dir_mb": [du_mb(os.path.join(c.dir, f"node{i}", "data"))
                                   for i in range(1, 4)]}
            s2 = os.path.join(self.work, f"save-{n}.snap")
            fig["snapshot_save_s"], fig["snapshot_bytes"] = self.snapshot_save(2, s2)
            os.unlink(s2)
            # restart to serving: a follower, then the leader
            restarts = []
            for k in range(2):
                lead = c.wait_leader() or 1
                i = lead % 3 + 1 if k == 0 else lead
                c.local("stop-node", str(i))
                restarts.append({"node": i, "seconds": self.start_node(i)})
                time.sleep(1)
            fig["restart_to_serving"] = restarts
            fig["rss_mb_after_restart"] = [rss_mb(c.pid(i)) for i in range(1, 4)]
            res["sizes"].append(fig)
            print(f"{n}: {json.dumps(fig)}", file=sys.stderr, flush=True)
        return res

    def close(self):
        self.c.down()
        if not self.c.keep:
            shutil.rmtree(self.c.dir, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)


def main():
    a = parse_args()
    build = os.path.abspath(a.build_dir)
    sys.path.insert(0, os.path.join(SRC, "tests", "integration"))
    os.environ["KMS_BUILD_DIR"], os.environ["KMS_SOURCE_DIR"] = build, SRC
    os.environ["KMSD_RATE_LIMIT_SEALS_PER_MINUTE"] = "10000000"
    os.environ["KMSD_LIMITS_TALOS_CONNECTION_BYTES"] = "0"  # warm connections
    import kmslib
    b = Bench(a, kmslib)
    try:
        res = b.run()
    finally:
        b.close()
    base = res["base"]
    print(f"\nLarge data sets, {a.duration} per load, {a.clients} clients; {os.cpu_count()} CPUs, "
          f"{platform.release()}\n")
    print("| records | restore s/node | restart to serving s | Unseal p99 ms warm (x base) | "
          "Unseal p99 ms new conn (x base) | RSS MB/node | snapshot save s | snapshot MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    bw, bn = base["unseal"]["warm"]["p99_ms"], base["unseal"]["new_conn"]["p99_ms"]
    print(f"| {base['records']} | - | - | {bw:.1f} | {bn:.1f} | "
          f"{max(base['rss_mb']):.0f} | {base['snapshot_save_s']:.2f} | "
          f"{base['snapshot_bytes'] / 1e6:.2f} |")
    for f in res["sizes"]:
        w, nn = f["unseal"]["warm"]["p99_ms"], f["unseal"]["new_conn"]["p99_ms"]
        rs = max(r["seconds"] for r in f["restart_to_serving"])
        print(f"| {f['records']} | {max(f['restore_s']):.1f} | {rs:.1f} | {w:.1f} "
              f"({w / bw:.2f}x) | {nn:.1f} ({nn / bn:.2f}x) | {max(f['rss_mb_after_restart']):.0f} | "
              f"{f['snapshot_save_s']:.1f} | {f['snapshot_bytes'] / 1e6:.1f} |")
    for f in res["sizes"]:
        s0 = f["unseal_at_start"]
        print(f"{f['records']} records, right after the start (before RocksDB settled, "
              f"{f['settle_s']:.0f} s): warm p99 {s0['warm']['p99_ms']:.1f} ms "
              f"({s0['warm']['p99_ms'] / bw:.2f}x), {s0['warm']['per_s']:.0f}/s; new conn p99 "
              f"{s0['new_conn']['p99_ms']:.1f} ms ({s0['new_conn']['p99_ms'] / bn:.2f}x)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    bad = any(f[u][k]["wrong_bytes"] or f[u][k]["failures"]
              for f in res["sizes"] for u in ("unseal", "unseal_at_start")
              for k in ("warm", "new_conn")) or \
        any(base["unseal"][k]["wrong_bytes"] or base["unseal"][k]["failures"]
            for k in ("warm", "new_conn"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
