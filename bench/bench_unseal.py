#!/usr/bin/python3
"""Unseal burst: a whole rack of Talos nodes booting at once.

N concurrent Talos-like clients (grpc-go, a NEW TCP + TLS 1.3 connection for
every RPC, like Talos) unseal pre-sealed blobs for a fixed duration against a
local three-node kmsd quorum, every client listing all three endpoints
(client i starts at endpoint i mod 3: DNS round robin spreads a rack over the
replicas). The CEILING is measured in the same run with the same client and
load against three kms-echo-server processes (bench/echo_server.c: kmsd's own
gRPC C core + OpenSSL stack, same TLS policy and certificate, an Unseal that
returns 32 fixed bytes), so the result reads "kmsd serves X unseals/s = Y% of
what the TLS + gRPC stack alone serves on this machine".
A second ceiling, three kms-h2-echo-server processes (bench/h2_echo_server.c:
the same two methods on OpenSSL + nghttp2, one epoll thread, no gRPC C core),
shows what a Talos port outside gRPC's per-connection machinery would cost;
its rows are skipped (and say so) when it was not built (no libnghttp2-dev).

  bench/bench_unseal.py [--build-dir build/release] [--clients 8,32,64]
                        [--duration 10s] [--base-port 27400] [--echo-only]

--echo-only measures the ceiling alone (no kmsd needed; throw-away PKI).
Prints a markdown table; --json FILE also writes the raw figures.
Standard library only.
"""
import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)
FIXED = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # echo_server.c: bytes 0x00..0x1f


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default=os.environ.get("KMS_BUILD_DIR")
                    or os.path.join(SRC, "build", "release"))
    ap.add_argument("--clients", default="8,32,64")
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--base-port", type=int, default=27400)
    ap.add_argument("--blobs", type=int, default=64, help="distinct sealed blobs")
    ap.add_argument("--echo-only", action="store_true")
    ap.add_argument("--transports", default="grpc,h2",
                    help="kmsd talos.transport values to measure, in this order (the "
                         "cluster's nodes are restarted between them)")
    ap.add_argument("--json", help="write raw results here")
    return ap.parse_args()


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def throwaway_pki(d):
    """CA + node certificate for 127.0.0.1 (P-256), for --echo-only."""
    ca, cakey = os.path.join(d, "ca.pem"), os.path.join(d, "ca-key.pem")
    cert, key, csr = (os.path.join(d, n) for n in ("node1.pem", "node1-key.pem", "n.csr"))
    ext = os.path.join(d, "ext.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", cakey, "-out", ca, "-days", "2", "-subj", "/CN=bench-ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", csr, "-subj", "/CN=node1")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", cakey, "-set_serial", "1",
            "-days", "2", "-extfile", ext, "-out", cert)
    return ca, cert, key


def start_echo(echo_bin, ports, cert, key, logdir):
    procs = []
    for p in ports:
        log = open(os.path.join(logdir, f"{os.path.basename(echo_bin)}-{p}.log"), "w")
        pr = subprocess.Popen([echo_bin, "--listen", f"127.0.0.1:{p}", "--cert", cert,
                               "--key", key], stdout=subprocess.PIPE, stderr=log, text=True)
        line = pr.stdout.readline()
        if not line.startswith("listening"):
            raise RuntimeError(f"{echo_bin} on {p} did not start (see {log.name})")
        procs.append(pr)
    return procs


def switch_transport(cluster, transport):
    """Restarts the three replicas one at a time with talos.transport set
    (the data and keys stay), waiting for each Talos port to serve again."""
    import kmslib
    cluster.env["KMSD_TALOS_TRANSPORT"] = transport
    for i in range(1, 4):
        cluster.local("stop-node", str(i))
        cluster.local("start-node", str(i))
        end = time.time() + 30
        while not kmslib.port_open(cluster.port(i, 0)) and time.time() < end:
            time.sleep(0.1)
        if not kmslib.port_open(cluster.port(i, 0)):
            raise RuntimeError(f"node {i} did not serve Talos after the switch to {transport}")
    time.sleep(1)


def stop(procs):
    for pr in procs:
        pr.terminate()
    for pr in procs:
        try:
            pr.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pr.kill()


def cpu_ticks(pids):
    t = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            t += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return t


def openssl_handshake(cert, key, ca, port, duration):
    """Server CPU per handshake of a bare `openssl s_server` (TLS 1.3, same
    key type) under `openssl s_time -new`: the floor for a new-connection
    Unseal."""
    srv = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", cert,
                            "-key", key, "-tls1_3", "-num_tickets", "0", "-naccept", "1000000",
                            "-quiet"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 20
        while time.time() < end:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        t0 = cpu_ticks([srv.pid])
        p = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
                            "-time", str(int(float(duration.rstrip("s")))), "-CAfile", ca],
                           capture_output=True, text=True, timeout=120)
        ticks = cpu_ticks([srv.pid]) - t0
        n = 0
        for line in p.stdout.splitlines():
            if "connections in" in line and "real seconds" in line:
                n = int(line.split()[0])
        return {"connections": n, "server_cpu_ms_per_op":
                1000.0 * ticks / os.sysconf("SC_CLK_TCK") / n if n else 0.0}
    finally:
        srv.stdin.close()  # s_server stops at EOF on stdin
        srv.terminate()
        srv.wait(timeout=10)


def warm(kmsbench, ca, endpoints, clients, duration, blobs, pids=()):
    """Unseals over warm connections (bench/kmsbench: one connection per
    client, kept), for the warm-connection ceiling ratio."""
    t0 = cpu_ticks(pids)
    p = subprocess.run([kmsbench, "-op", "unseal", "-ca", ca, "-endpoints", endpoints,
                        "-clients", str(clients), "-duration", duration, "-warmup", "0s",
                        "-blobs", blobs], capture_output=True, text=True, timeout=600)
    ticks = cpu_ticks(pids) - t0
    rep = json.loads(p.stdout)
    rep["server_cpu_ms_per_op"] = (1000.0 * ticks / os.sysconf("SC_CLK_TCK") / rep["ok"]
                                   if rep["ok"] else 0.0)
    return rep


def load(talos, ca, endpoints, clients, duration, blobs, pids=()):
    t0 = cpu_ticks(pids)
    p = subprocess.run([talos, "load", "-ca", ca, "-endpoints", endpoints, "-rotate",
                        "-clients", str(clients), "-duration", duration, "-blobs", blobs],
                       capture_output=True, text=True, timeout=600)
    ticks = cpu_ticks(pids) - t0
    try:
        rep = json.loads(p.stdout)
    except ValueError:
        raise RuntimeError(f"talosclient load failed rc={p.returncode}: {p.stderr[-500:]}")
    secs = float(duration.rstrip("s"))
    total = rep["total"] or 1
    fails = sum(rep.get("failures", {}).values())
    return {"clients": clients, "ok": rep["ok"], "total": rep["total"], "failures": fails,
            "failure_codes": rep.get("failures", {}), "wrong_bytes": rep.get("wrong_bytes", 0),
            "per_s": rep["ok"] / secs, "p50_ms": rep["p50_ms"], "p99_ms": rep["p99_ms"],
            "max_ms": rep["max_latency_ms"],
            "server_cpu_ms_per_op": 1000.0 * ticks / os.sysconf("SC_CLK_TCK") / total}


def main():
    a = parse_args()
    build = os.path.abspath(a.build_dir)
    talos = os.path.join(build, "tests", "integration", "talosclient", "talosclient")
    echo_bin = os.path.join(build, "bench", "kms-echo-server")
    h2_bin = os.path.join(build, "bench", "kms-h2-echo-server")
    if not os.access(h2_bin, os.X_OK):
        print(f"bench_unseal: {h2_bin} not built (libnghttp2-dev missing): "
              "h2 ceiling rows SKIPPED", file=sys.stderr)
        h2_bin = None
    for b in (talos, echo_bin):
        if not os.access(b, os.X_OK):
            sys.exit(f"bench_unseal: {b} not built")
    clients = [int(x) for x in a.clients.split(",")]
    echo_ports = [a.base_port + 40 + k for k in range(3)]
    echo_eps = ",".join(f"127.0.0.1:{p}" for p in echo_ports)
    h2_ports = [a.base_port + 50 + k for k in range(3)]
    h2_eps = ",".join(f"127.0.0.1:{p}" for p in h2_ports)
    work = tempfile.mkdtemp(prefix="kmsd-bench-unseal-")
    cluster = None
    procs = []
    transports = [t for t in a.transports.split(",") if t]
    if not transports or any(t not in ("grpc", "h2") for t in transports):
        sys.exit("bench_unseal: --transports takes grpc and/or h2")
    # kmsd rows per transport: "kmsd" (grpc) and "kmsd_h2"
    kkey = {"grpc": "kmsd", "h2": "kmsd_h2"}
    results = {"kmsd": [], "kmsd_h2": [], "echo": [], "h2": [], "kmsd_warm": [],
               "kmsd_h2_warm": [], "echo_warm": [], "h2_warm": []}
    kmsbench = os.path.join(build, "bench", "kmsbench", "kmsbench")
    try:
        if a.echo_only:
            ca, cert, key = throwaway_pki(work)
            kblobs = None
        else:
            sys.path.insert(0, os.path.join(SRC, "tests", "integration"))
            os.environ["KMS_BUILD_DIR"], os.environ["KMS_SOURCE_DIR"] = build, SRC
            import kmslib
            # The warm-connection rows carry many calls per connection.
            os.environ["KMSD_LIMITS_TALOS_CONNECTION_BYTES"] = "0"
            os.environ["KMSD_TALOS_TRANSPORT"] = transports[0]
            cluster = kmslib.Cluster(nodes=3, base=a.base_port)
            cluster.up()
            cluster.init()
            for i in range(1, 4):
                end = time.time() + 15
                while not kmslib.port_open(cluster.port(i, 0)) and time.time() < end:
                    time.sleep(0.1)
            ca = cluster.ca()
            pki = os.path.join(cluster.dir, "pki")
            cert, key = os.path.join(pki, "node1.pem"), os.path.join(pki, "node1-key.pem")
            kblobs = os.path.join(work, "kmsd-blobs.jsonl")
            per_uuid = 4
            with open(kblobs, "w") as f:
                for _ in range(max(1, a.blobs // per_uuid)):
                    p = subprocess.run([talos, "seal", "-ca", ca, "-endpoints",
                                        cluster.endpoints(), "-uuid", str(uuidlib.uuid4()),
                                        "-n", str(per_uuid)],
                                       capture_output=True, text=True, timeout=60)
                    if p.returncode != 0:
                        raise RuntimeError(f"seal failed: {p.stderr}")
                    f.write(p.stdout)
        # The echo server answers the same 32 bytes to everything: same
        # requests (blob sizes), verified against its fixed answer.
        eblobs = os.path.join(work, "echo-blobs.jsonl")
        with open(eblobs, "w") as f:
            src = open(kblobs).read().splitlines() if kblobs else []
            for k in range(a.blobs):
                s = json.loads(src[k % len(src)]) if src else {
                    "uuid": str(uuidlib.uuid4()), "blob": "AQ" + "A" * 62 + "=="}
                f.write(json.dumps({"uuid": s["uuid"], "blob": s["blob"], "data": FIXED}) + "\n")
        procs = start_echo(echo_bin, echo_ports, cert, key, work)
        epids = [pr.pid for pr in procs]
        hpids = []
        if h2_bin:
            h2procs = start_echo(h2_bin, h2_ports, cert, key, work)
            hpids = [pr.pid for pr in h2procs]
            procs += h2procs
        for t in transports if kblobs else []:
            if t != transports[0]:
                switch_transport(cluster, t)
            kpids = [cluster.pid(i) for i in range(1, 4)]
            for n in clients:
                results[kkey[t]].append(load(talos, ca, cluster.endpoints(), n, a.duration,
                                             kblobs, kpids))
                if os.access(kmsbench, os.X_OK):
                    results[kkey[t] + "_warm"].append(warm(kmsbench, ca, cluster.endpoints(), n,
                                                           a.duration, kblobs, kpids))
        for n in clients:
            results["echo"].append(load(talos, ca, echo_eps, n, a.duration, eblobs, epids))
            if hpids:
                results["h2"].append(load(talos, ca, h2_eps, n, a.duration, eblobs, hpids))
            if os.access(kmsbench, os.X_OK):
                results["echo_warm"].append(warm(kmsbench, ca, echo_eps, n, a.duration, eblobs,
                                                 epids))
                if hpids:
                    results["h2_warm"].append(warm(kmsbench, ca, h2_eps, n, a.duration, eblobs,
                                                   hpids))
        results["openssl"] = openssl_handshake(cert, key, ca, a.base_port + 45, a.duration)
    finally:
        stop(procs)
        if cluster is not None:
            cluster.down()
        shutil.rmtree(work, ignore_errors=True)

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\nUnseal burst, {a.duration} per row, new TLS connection per RPC, 3 endpoints "
          f"rotated per client; {os.cpu_count()} CPUs ({cpu}), {platform.release()}\n")
    print("| clients | server | unseals/s | % of ceiling | p50 ms | p99 ms | max ms | failures | "
          "server CPU ms/Unseal |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for k, n in enumerate(clients):
        e = results["echo"][k]
        rows = []
        if results["kmsd"]:
            rows.append(("kmsd, grpc transport (3 nodes)", results["kmsd"][k]))
        if results["kmsd_h2"]:
            rows.append(("kmsd, h2 transport (3 nodes)", results["kmsd_h2"][k]))
        rows.append(("echo ceiling (3 procs)", e))
        if results["h2"]:
            rows.append(("h2 echo, no gRPC core (3 procs)", results["h2"][k]))
        for name, r in rows:
            pct = 100.0 * r["per_s"] / e["per_s"] if e["per_s"] else 0
            fl = str(r["failures"]) + (f" {r['failure_codes']}" if r["failures"] else "")
            print(f"| {n} | {name} | {r['per_s']:.0f} | {pct:.0f}% | {r['p50_ms']:.1f} | "
                  f"{r['p99_ms']:.1f} | {r['max_ms']:.1f} | {fl} | "
                  f"{r['server_cpu_ms_per_op']:.3f} |")
    if results["echo_warm"]:
        print("\nWarm connections (bench/kmsbench, one kept connection per client):\n")
        print("| clients | server | unseals/s | % of ceiling | p50 ms | p99 ms | "
              "server CPU ms/Unseal |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for k, n in enumerate(clients):
            e = results["echo_warm"][k]
            rows = [("kmsd, grpc transport (3 nodes)", results["kmsd_warm"][k])] \
                if results["kmsd_warm"] else []
            if results["kmsd_h2_warm"]:
                rows.append(("kmsd, h2 transport (3 nodes)", results["kmsd_h2_warm"][k]))
            rows.append(("echo ceiling (3 procs)", e))
            if results["h2_warm"]:
                rows.append(("h2 echo, no gRPC core (3 procs)", results["h2_warm"][k]))
            for name, r in rows:
                pct = 100.0 * r["per_s"] / e["per_s"] if e["per_s"] else 0
                print(f"| {n} | {name} | {r['per_s']:.0f} | {pct:.0f}% | {r['p50_ms']:.1f} | "
                      f"{r['p99_ms']:.1f} | {r['server_cpu_ms_per_op']:.3f} |")
    o = results["openssl"]
    print(f"\nbare openssl s_server (TLS 1.3, no tickets) under s_time -new: {o['connections']} "
          f"handshakes, {o['server_cpu_ms_per_op']:.3f} ms server CPU per handshake")
    if o["server_cpu_ms_per_op"]:
        for k, n in enumerate(clients):
            parts = [f"{name} {results[key][k]['server_cpu_ms_per_op'] / o['server_cpu_ms_per_op']:.2f}x"
                     for key, name in (("kmsd", "kmsd grpc"), ("kmsd_h2", "kmsd h2"),
                                       ("echo", "gRPC echo"), ("h2", "h2 echo"))
                     if results[key]]
            print(f"server CPU per new-connection Unseal / bare handshake, {n} clients: "
                  + ", ".join(parts))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    if results["h2"]:
        print("(h2 echo: % of ceiling is against the gRPC echo server)")
    bad = any(r["wrong_bytes"] for k in ("kmsd", "kmsd_h2", "echo", "h2") for r in results[k])
    sys.exit(100 if bad else 0)


if __name__ == "__main__":
    main()
