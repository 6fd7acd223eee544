#!/usr/bin/python3
"""Availability under faults, on real kmsd processes (three nodes, real raft,
RocksDB, TLS) with the Go Talos-like client (grpc-go, new connection per RPC,
10 s deadline). Faults are SIGSTOP/SIGCONT of whole processes. Ports
27100-27139 (cluster) and 27240 (a silent TCP listener for kmsctl).

Each phase prints FIGURE lines with what it measured. Bounds are generous:
the machine is shared (2 cores). What each phase pins down:
  kmsctl    --timeout bounds the connect attempt (not gRPC's 0.1 s backoff)
  notfound  an Unseal that cannot prove a miss fresh answers UNAVAILABLE,
            never NOT_FOUND
  forward   a follower forwarding Seals to a leader that stalls re-resolves
            the leader and commits within requestWait
  heal      a node whose peers were stopped closes its Talos listener
            without waiting for parked handlers and serves again soon after
            they resume; no CANCELLED reaches clients while it closes
  sealclose listener closes (operator seal) under unseal load: only OK,
            UNAVAILABLE or refused
  parking   Seals blocked without quorum do not delay Unseals that can be
            answered now (unsealReads: local on the serving node)
"""
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import (Cluster, check, finish, port_open, KMSCTL, LOCAL, TALOS,  # noqa: E402
                    OK, NOT_FOUND, UNAVAILABLE)

BASE = 27100
SILENT_PORT = 27240


def main():
    phase_kmsctl_timeout()
    c = Cluster(nodes=3, base=BASE)
    # The seal phases drive a load from one host (hundreds of seals per
    # replica per minute): the per-address seal quota is not what this test
    # measures (test_adv_policy does).
    c.env["KMSD_RATE_LIMIT_SEALS_PER_MINUTE"] = "0"
    try:
        run(c)
    finally:
        for i in range(1, 4):
            cont(c, i)
        c.down()
    finish()


def stop(c, i):
    pid = c.pid(i)
    if pid:
        os.kill(pid, signal.SIGSTOP)


def cont(c, i):
    pid = c.pid(i)
    if pid:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def wait_port(port, want=True, timeout=10.0, step=0.02):
    end = time.time() + timeout
    while time.time() < end:
        if port_open(port) == want:
            return True
        time.sleep(step)
    return port_open(port) == want


def unseal_ok(c, i, u, blob, data, timeout=10.0):
    """Retries an unseal on node i until it returns the sealed bytes."""
    end = time.time() + timeout
    while time.time() < end:
        rc, out = c.unseal(c.talos(i), u, blob)
        if rc == OK and out == data:
            return True
        time.sleep(0.05)
    return False


def talos_seal(c, endpoints, u):
    t0 = time.time()
    p = c.client("seal", "-ca", c.ca(), "-endpoints", endpoints, "-uuid", u, timeout=30)
    dt = time.time() - t0
    if p.returncode != 0:
        return p.returncode, None, None, dt
    out = json.loads(p.stdout)
    return 0, out["blob"], out["data"], dt


def start_load(c, endpoints, blobs_file, clients=8, duration="10s"):
    return subprocess.Popen([TALOS, "load", "-ca", c.ca(), "-endpoints", endpoints,
                             "-clients", str(clients), "-duration", duration,
                             "-blobs", blobs_file],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def load_result(p):
    out, err = p.communicate(timeout=120)
    try:
        return json.loads(out)
    except ValueError:
        print(out, err)
        return None


def only_ok_or_unavailable(res):
    if not res:
        return False
    bad = {k: v for k, v in (res.get("failures") or {}).items() if k != "Unavailable"}
    return not bad and res.get("wrong_bytes", 1) == 0


# --- kmsctl: connect timeout honours --timeout --------------------------------

def phase_kmsctl_timeout():
    """An endpoint that accepts TCP and never answers the TLS handshake (a
    slow or lossy link looks the same to the client): kmsctl must keep trying
    for --timeout, not give up after gRPC's 0.1 s reconnect backoff."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", SILENT_PORT))
    srv.listen(64)
    held = []
    stop_flag = threading.Event()

    def accept_loop():
        srv.settimeout(0.2)
        while not stop_flag.is_set():
            try:
                conn, _ = srv.accept()
                held.append(conn)
            except OSError:
                pass

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    try:
        for want in (4.0, 1.5):
            t0 = time.time()
            p = subprocess.run([KMSCTL, "--endpoint", f"127.0.0.1:{SILENT_PORT}",
                                "--timeout", f"{want}s", "status"],
                               capture_output=True, text=True, timeout=60)
            dt = time.time() - t0
            print(f"FIGURE kmsctl --timeout {want}s against a silent endpoint: gave up after "
                  f"{dt:.2f}s (rc {p.returncode}: {p.stderr.strip()[:100]})")
            check(p.returncode != 0, f"kmsctl fails against a silent endpoint (--timeout {want}s)")
            check(want * 0.8 <= dt <= want + 3.0,
                  f"kmsctl's connect attempt lasts about --timeout {want}s (took {dt:.2f}s)")
    finally:
        stop_flag.set()
        t.join()
        for conn in held:
            conn.close()
        srv.close()


# --- the cluster phases -------------------------------------------------------

def run(c):
    c.up()
    c.init()
    for i in range(1, 4):
        check(wait_port(c.port(i, 0), True, 20), f"Talos port of node {i} open after unseal")

    u, blob, data = None, None, None
    for _ in range(20):
        rc, blob, data, _ = talos_seal(c, c.endpoints(), str(uuidlib.uuid4()))
        if rc == OK:
            break
        time.sleep(0.2)
    check(rc == OK, "a first seal succeeds")
    u = None
    # keep the uuid of that seal: reseal with a known uuid for later checks
    u = str(uuidlib.uuid4())
    rc, blob, data, _ = talos_seal(c, c.endpoints(), u)
    check(rc == OK, "seal with a known UUID")
    keys = [(u, blob, data)]

    phase_notfound(c, u, blob)
    phase_forward(c, keys)
    phase_heal(c, keys)
    phase_sealclose(c, keys)
    phase_parking(c, keys)
    phase_lease_recheck(c, keys)
    phase_operator_parking(c)


def phase_notfound(c, u, blob):
    """A follower loses both peers (SIGSTOP, the leader among them) and is
    asked for a key id nobody has, while its lease is still valid: the miss
    cannot be proven fresh (the leader's commit index is unreachable), so the
    answer must be UNAVAILABLE - a NOT_FOUND may make Talos give up on the
    key slot. (A leader holding its lease may answer NOT_FOUND at once: its
    own commit index is authoritative.)"""
    raw = bytearray(base64.b64decode(blob))
    raw[5] ^= 0xFF
    unknown = base64.b64encode(bytes(raw)).decode()
    leader = c.wait_leader()
    check(leader is not None, f"a leader exists before the notfound phase (node {leader})")
    target = 3 if leader != 3 else 1
    others = [i for i in range(1, 4) if i != target]
    rc, _ = c.unseal(c.talos(target), u, unknown)
    check(rc == NOT_FOUND, f"healthy cluster: unknown key id -> NOT_FOUND (got {rc})")

    results = []
    for i in others:
        stop(c, i)
    try:
        # Several at once so at least one starts inside the lease window.
        threads = []
        for k in range(4):
            def one():
                t = time.time()
                rc, _ = c.unseal(c.talos(target), u, unknown)
                results.append((rc, time.time() - t))
            th = threading.Thread(target=one)
            th.start()
            threads.append(th)
            time.sleep(0.05)
        for th in threads:
            th.join()
    finally:
        for i in others:
            cont(c, i)
    codes = [r for r, _ in results]
    print(f"FIGURE unknown key on follower {target} that lost its peers: codes {codes}, "
          f"latencies {[round(d, 2) for _, d in results]} s")
    check(NOT_FOUND not in codes, "no NOT_FOUND when the miss cannot be proven fresh")
    check(all(rc == UNAVAILABLE for rc in codes),
          f"unknown key without quorum -> UNAVAILABLE (got {codes})")
    for i in range(1, 4):
        wait_port(c.port(i, 0), True, 15)
    end = time.time() + 15
    rc = None
    while time.time() < end:
        rc, _ = c.unseal(c.talos(target), u, unknown)
        if rc == NOT_FOUND:
            break
        time.sleep(0.2)
    check(rc == NOT_FOUND, f"after healing, the unknown key is NOT_FOUND again (got {rc})")


def phase_forward(c, keys):
    """Seals through a follower while the leader is SIGSTOPped: the follower
    must notice the new leader and commit there within requestWait (5 s),
    not spend the whole budget on the stalled one."""
    leader = c.wait_leader()
    check(leader is not None, f"a leader exists before the forward phase (node {leader})")
    if leader is None:
        return
    follower = [i for i in range(1, 4) if i != leader][0]
    results = []
    done = threading.Event()

    def sealer():
        while not done.is_set():
            uu = str(uuidlib.uuid4())
            t = time.time()
            rc, b, d, dt = talos_seal(c, c.talos(follower), uu)
            results.append((t, rc, dt, uu, b, d))

    threads = [threading.Thread(target=sealer) for _ in range(3)]
    for th in threads:
        th.start()
    time.sleep(1.5)
    t_stop = time.time()
    stop(c, leader)
    time.sleep(7.0)
    done.set()
    for th in threads:
        th.join()
    cont(c, leader)
    during = [r for r in results if r[0] + r[2] > t_stop]
    codes = [r[1] for r in during]
    worst = max((r[2] for r in during), default=0)
    print(f"FIGURE seals on follower {follower} around SIGSTOP of leader {leader}: "
          f"{len(during)} seals, codes {sorted(set(codes))}, "
          f"failed {sum(1 for x in codes if x != OK)}, slowest {worst:.2f}s")
    check(len(during) > 0 and all(x == OK for x in codes),
          "every seal in flight or started while the leader is stopped succeeds")
    check(worst < 5.0, f"slowest seal around the stall {worst:.2f}s < requestWait 5s")
    acked = [(r[3], r[4], r[5]) for r in results if r[1] == OK]
    keys.extend(acked[-3:])
    # nothing acknowledged is lost, once the old leader is back
    lost = 0
    for (uu, b, d) in acked:
        if not unseal_ok(c, follower, uu, b, d, timeout=10):
            lost += 1
    check(lost == 0, f"all {len(acked)} acknowledged seals unseal afterwards (lost {lost})")
    if leader:
        wait_port(c.port(leader, 0), True, 15)
        u, b, d = acked[-1] if acked else keys[0]
        check(unseal_ok(c, leader, u, b, d, timeout=15),
              f"the resumed old leader {leader} serves the last seal")


def write_blobs(c, keys, name):
    path = os.path.join(c.dir, name)
    with open(path, "w") as f:
        for (uu, b, d) in keys:
            f.write(json.dumps({"uuid": uu, "blob": b, "data": d}) + "\n")
    return path


def phase_heal(c, keys):
    """Node 3 (restarted with leaseGrace 1 s) is cut off: the leader and the
    other follower stop (SIGSTOP). Seals keep arriving at node 3: those
    forwarded to the leader before node 3 notices it is gone (about one
    election timeout) stay blocked on it - their budget is requestWait, 5 s.
    After leaseGrace node 3 closes its Talos port (about 2 s). As soon as it
    is closed we resume the other follower only (the old leader stays
    stopped, so those Seals stay blocked): node 3 and it elect a leader, node
    3's lease comes back, and it must serve again at once - the close must
    not have waited for the blocked handlers (it used to: about 4 s more).
    We measure from the resume until node 3 accepts and serves an unseal. An
    unseal load keeps unseals parked meanwhile; it must see only OK or
    UNAVAILABLE (refused connections included), never CANCELLED."""
    blobs = write_blobs(c, keys, "heal.jsonl")
    check(restart_node3(c, KMSD_LEASE_GRACE="1s"), "node 3 (leaseGrace 1 s) listens again")
    for i in range(1, 4):
        wait_port(c.port(i, 0), True, 15)
    leader = c.wait_leader()
    check(leader is not None, f"a leader exists before the heal phase (node {leader})")
    if leader is None:
        return
    if leader == 3:
        p = c.ctl(3, "operator", "step-down")
        time.sleep(2)
        leader = c.wait_leader()
    cut = 3
    other = [i for i in range(1, 4) if i not in (leader, cut)][0]
    load = start_load(c, c.talos(cut), blobs, clients=3, duration="16s")
    done = threading.Event()
    seal_codes = []

    def sealer():
        while not done.is_set():
            rc, _, _, _ = talos_seal(c, c.talos(cut), str(uuidlib.uuid4()))
            seal_codes.append(rc)
            if rc != OK:
                time.sleep(0.05)

    # Seals in flight when the leader stops (more sealers than gRPC workers).
    sealers = [threading.Thread(target=sealer) for _ in range(8)]
    for th in sealers:
        th.start()
    time.sleep(1.0)
    stop(c, leader)
    stop(c, other)
    t_stop = time.time()
    closed = wait_port(c.port(cut, 0), False, 12, step=0.01)
    t_closed = time.time()
    check(closed, f"node {cut} closes its Talos port after losing its peers "
                  f"({t_closed - t_stop:.2f}s after SIGSTOP)")
    cont(c, other)
    t_cont = time.time()
    reopened = wait_port(c.port(cut, 0), True, 20, step=0.01)
    t_open = time.time()
    u, b, d = keys[0]
    served = unseal_ok(c, cut, u, b, d, timeout=20)
    t_served = time.time()
    print(f"FIGURE heal: port closed {t_closed - t_stop:.2f}s after SIGSTOP of nodes "
          f"{leader} (leader) and {other}; after SIGCONT of {other}: port open in "
          f"{t_open - t_cont:.2f}s, unseal OK in {t_served - t_cont:.2f}s")
    check(reopened and served, f"node {cut} serves again after node {other} resumes")
    check(t_served - t_cont < 2.5,
          f"node {cut} serves again within 2.5 s of node {other} resuming "
          f"({t_served - t_cont:.2f}s)")
    done.set()
    for th in sealers:
        th.join()
    cont(c, leader)
    res = load_result(load)
    if res:
        print(f"FIGURE heal load on node {cut}: {res.get('total')} unseals, "
              f"failures {res.get('failures')}, max latency {res.get('max_latency_ms')} ms")
    print(f"FIGURE heal: seals on node {cut} answered {sorted(set(seal_codes))} "
          f"x{len(seal_codes)}")
    check(only_ok_or_unavailable(res),
          f"unseal load while node {cut} loses its lease: only OK or UNAVAILABLE/refused, "
          f"never CANCELLED")
    check(all(x in (OK, UNAVAILABLE) for x in seal_codes),
          f"seals while node {cut} is cut off end OK or UNAVAILABLE (got {sorted(set(seal_codes))})")
    for i in range(1, 4):
        wait_port(c.port(i, 0), True, 15)


def phase_sealclose(c, keys):
    """Operator seal closes node 3's listener under an unseal load from 8
    clients, three times: no CANCELLED, only OK or UNAVAILABLE/refused."""
    blobs = write_blobs(c, keys, "seal.jsonl")
    wait_port(c.port(3, 0), True, 15)
    load = start_load(c, c.talos(3), blobs, clients=8, duration="12s")
    time.sleep(1.0)
    for k in range(3):
        p = c.ctl(3, "operator", "seal")
        check(p.returncode == 0, f"operator seal on node 3 (round {k + 1})")
        wait_port(c.port(3, 0), False, 5, step=0.01)
        time.sleep(0.5)
        for s in c.shares[:3]:
            c.ctl(3, "operator", "unseal", s)
        wait_port(c.port(3, 0), True, 10, step=0.01)
        time.sleep(1.0)
    res = load_result(load)
    if res:
        print(f"FIGURE seal/unseal x3 under load on node 3: {res.get('total')} unseals, "
              f"failures {res.get('failures')}, max latency {res.get('max_latency_ms')} ms")
    check(res is not None and res.get("ok", 0) > 0 and only_ok_or_unavailable(res),
          "listener closing under load: only OK or UNAVAILABLE/refused, never CANCELLED")


def phase_parking(c, keys):
    """Node 3 restarts with unsealReads: local (it may serve any applied
    state without a lease), then its peers stop: Seals on node 3 can only
    wait (no quorum) for requestWait, Unseals can be answered at once. With
    8 Seals parked at a time, Unseals must stay fast: a blocked Seal must not
    hold the gRPC worker an Unseal needs."""
    c.kill9(3)
    env = dict(c.env, KMSD_NO_UNSEAL="1", KMSD_UNSEAL_READS="local")
    subprocess.run([LOCAL, "start-node", "3"], env=env, capture_output=True, text=True,
                   timeout=60)
    end = time.time() + 20
    while time.time() < end and not c.status(3):
        time.sleep(0.2)
    for s in c.shares[:3]:
        c.ctl(3, "operator", "unseal", s)
    check(wait_port(c.port(3, 0), True, 20), "node 3 (unsealReads: local) listens again")
    u, b, d = keys[0]
    check(unseal_ok(c, 3, u, b, d, timeout=15), "node 3 serves before its peers stop")
    stop(c, 1)
    stop(c, 2)
    time.sleep(1.5)  # quorum gone
    done = threading.Event()
    seal_codes = []

    def sealer():
        while not done.is_set():
            rc, _, _, _ = talos_seal(c, c.talos(3), str(uuidlib.uuid4()))
            seal_codes.append(rc)

    sealers = [threading.Thread(target=sealer) for _ in range(8)]
    for th in sealers:
        th.start()
    time.sleep(1.0)
    lats, codes = [], []
    t_end = time.time() + 8.0
    while time.time() < t_end:
        t = time.time()
        rc, out = c.unseal(c.talos(3), u, b)
        lats.append(time.time() - t)
        codes.append(rc == OK and out == d)
    done.set()
    cont(c, 1)
    cont(c, 2)
    for th in sealers:
        th.join()
    lats.sort()
    worst = lats[-1] if lats else 0
    print(f"FIGURE parking: {len(lats)} unseals on node 3 while 8 seals wait without quorum: "
          f"ok {sum(codes)}/{len(codes)}, p50 {lats[len(lats) // 2]:.3f}s, max {worst:.3f}s; "
          f"seals answered {sorted(set(seal_codes))} x{len(seal_codes)}")
    check(len(codes) > 0 and all(codes), "every unseal is answered OK while seals are blocked")
    check(worst < 1.5, f"slowest unseal {worst:.3f}s < 1.5 s while seals are blocked")
    # (seals still parked when the peers resume may commit: OK is fine)
    check(UNAVAILABLE in seal_codes and all(x in (OK, UNAVAILABLE) for x in seal_codes),
          f"seals without quorum wait and answer UNAVAILABLE (got {sorted(set(seal_codes))})")


def restart_node3(c, **env_extra):
    c.kill9(3)
    env = dict(c.env, KMSD_NO_UNSEAL="1", **env_extra)
    subprocess.run([LOCAL, "start-node", "3"], env=env, capture_output=True, text=True,
                   timeout=60)
    end = time.time() + 20
    while time.time() < end and not c.status(3):
        time.sleep(0.2)
    for s in c.shares[:3]:
        c.ctl(3, "operator", "unseal", s)
    return wait_port(c.port(3, 0), True, 20)


def phase_lease_recheck(c, keys):
    """The lease deadline rule: a local read counts only if it finished
    before the deadline taken before it started. Node 3 restarts with a
    test fault hook that pauses every read for 1.5 s between its lease check
    and the RocksDB get (longer than any lease: electionTimeout 1 s), like a
    process descheduled at the worst moment. Every such read must be thrown
    away: UNAVAILABLE, never an answer from possibly stale state. Without
    the pause the same node serves the key."""
    check(restart_node3(c, KMSD_TEST_READ_PAUSE_MS="1500"),
          "node 3 (read pause 1.5 s) listens again")
    u, b, d = keys[0]
    t = time.time()
    rc, out = c.unseal(c.talos(3), u, b)
    dt = time.time() - t
    print(f"FIGURE lease re-check: unseal whose reads outlive the lease answered {rc} "
          f"after {dt:.2f}s")
    check(rc == UNAVAILABLE,
          f"a read that finished after its lease ended is not answered: UNAVAILABLE (got {rc})")
    check(restart_node3(c), "node 3 (no pause) listens again")
    check(unseal_ok(c, 3, u, b, d, timeout=15), "without the pause node 3 serves the key")


def phase_operator_parking(c):
    """Operator calls that block for long must not take the cluster API
    workers the leader needs for Forward. Node 3 restarts with one gRPC
    worker per server (talos.workers: 1) and is made leader; a `members add`
    of a node that does not exist blocks there (the leader waits up to a
    minute for it to catch up) while a follower seals through it. Every seal
    must still commit promptly. (Last phase: it leaves a spare member 9.)"""
    check(restart_node3(c, KMSD_TALOS_WORKERS="1"), "node 3 (one worker) listens again")
    leader = c.wait_leader()
    end = time.time() + 20
    while leader != 3 and time.time() < end:
        c.ctl(leader, "operator", "members", "transfer-leader", "--id", "3")
        time.sleep(1.0)
        leader = c.wait_leader()
    check(leader == 3, f"node 3 leads (node {leader})")
    if leader != 3:
        return
    follower = 1
    for i in range(1, 4):
        wait_port(c.port(i, 0), True, 15)
    rc, _, _, _ = talos_seal(c, c.talos(follower), str(uuidlib.uuid4()))
    check(rc == OK, "a seal through the follower before the operator call")
    env = dict(os.environ,
               KMSCTL_ENDPOINT=f"127.0.0.1:{c.port(leader, 1)}",
               KMSCTL_CACERT=os.path.join(c.dir, "pki", "ca.pem"),
               KMSCTL_CERT=os.path.join(c.dir, "pki", "operator.pem"),
               KMSCTL_KEY=os.path.join(c.dir, "pki", "operator-key.pem"))
    add = subprocess.Popen(
        [KMSCTL, "--timeout", "15s", "operator", "members", "add", "--id", "9",
         "--raft-address", f"127.0.0.1:{BASE + 39}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    blocked = add.poll() is None  # the seals below start while it blocks
    codes, lats = [], []
    for k in range(8):
        rc, _, _, dt = talos_seal(c, c.talos(follower), str(uuidlib.uuid4()))
        codes.append(rc)
        lats.append(dt)
    print(f"FIGURE operator parking: members add blocked on leader {leader} when the seals "
          f"started: {blocked}; "
          f"seals on follower {follower}: codes {sorted(set(codes))}, "
          f"slowest {max(lats):.2f}s")
    check(blocked, "the members add call is blocked when the seals start")
    check(all(x == OK for x in codes) and max(lats) < 3.0,
          f"seals forwarded to a leader busy with a blocked operator call commit promptly "
          f"(codes {sorted(set(codes))}, slowest {max(lats):.2f}s)")
    try:
        out, err = add.communicate(timeout=30)
        print(f"members add ended: rc {add.returncode}: {err.strip()[:120]}")
    except subprocess.TimeoutExpired:
        add.kill()


if __name__ == "__main__":
    main()
