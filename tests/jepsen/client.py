#!/usr/bin/python3
"""Workload for the kmsd Jepsen suite: Talos-like clients and an operator.

Runs inside the client namespace under `nice`. Writes one JSON line per event
to --history: {"type": "invoke"|"ok"|"fail"|"info", "f", "process", "t"
(CLOCK_MONOTONIC ns, same clock as the harness), ...}. Completion types:
  ok    the server answered: "code" is OK or a definite application code
        (NOT_FOUND, PERMISSION_DENIED, INVALID_ARGUMENT, ...)
  fail  the op certainly did not execute (every connection refused;
        kmsctl said the call never reached a server)
  info  indeterminate (deadline, UNAVAILABLE after connecting, ...)
Ops: seal (unique node_uuid, random 32 bytes), unseal (an earlier acked
seal, biased to revoked keys), forged (unseal of a bit-flipped blob, must
never be OK), revoke (kmsctl keys revoke KEY_ID), rotate (kmsctl operator
rotate). Every loop is bounded by --duration and --max-ops.
"""
import argparse
import base64
import json
import os
import random
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import talos  # noqa: E402


class History:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def emit(self, **ev):
        ev["t"] = time.monotonic_ns()
        with self.lock:
            self.f.write(json.dumps(ev, separators=(",", ":")) + "\n")
        return ev["t"]


class Pool:
    """Acked seals (and revoke targets), shared by the workers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked = []       # (uuid, blob_b64, key_id)
        self.revoked = []     # entries whose revoke was invoked

    def add(self, e):
        with self.lock:
            self.acked.append(e)

    def pick(self, rng):
        with self.lock:
            if self.revoked and rng.random() < 0.3:
                return rng.choice(self.revoked[-20:])
            if not self.acked:
                return None
            if rng.random() < 0.5:
                return rng.choice(self.acked[-50:])
            return rng.choice(self.acked)

    def pick_revoke(self, rng):
        with self.lock:
            cands = [e for e in self.acked[-200:] if e not in self.revoked]
            if not cands:
                return None
            e = rng.choice(cands)
            self.revoked.append(e)
            return e


def key_id(blob):
    return blob[1:17].hex()


def talos_worker(args, wid, hist, pool, stop, deadline, counter):
    rng = random.Random(args.seed * 1000 + wid)
    cl = talos.Talos(args.ca, timeout=args.timeout)
    eps = args.endpoints.split(",")
    interval = args.workers / max(args.rate, 0.1)
    seq = 0
    next_t = time.monotonic()
    while not stop.is_set() and time.monotonic() < deadline:
        with counter["lock"]:
            if counter["n"] >= args.max_ops:
                return
            counter["n"] += 1
        next_t += interval * (0.5 + rng.random())
        delay = next_t - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        else:
            next_t = time.monotonic()
        order = eps[:]
        rng.shuffle(order)           # DNS round robin
        r = rng.random()
        target = pool.pick(rng) if r >= args.seal_fraction else None
        if target is None:
            seq += 1
            uuid = f"jp-{args.seed}-{wid}-{seq}"
            data = rng.randbytes(32)
            hist.emit(type="invoke", f="seal", process=wid, uuid=uuid, data=data.hex(),
                      endpoints=order)
            code, out, det = cl.call(order, talos.SEAL, uuid, data)
            if code == "OK":
                blob = base64.b64encode(out).decode()
                hist.emit(type="ok", f="seal", process=wid, uuid=uuid, code="OK", blob=blob,
                          key_id=key_id(out))
                pool.add((uuid, blob, key_id(out)))
            elif talos.connect_failed(code, det) or code in talos.DEFINITE:
                hist.emit(type="fail", f="seal", process=wid, uuid=uuid, code=code, detail=det)
            else:
                hist.emit(type="info", f="seal", process=wid, uuid=uuid, code=code, detail=det)
            continue
        uuid, blob, kid = target
        raw = base64.b64decode(blob)
        forged = rng.random() < args.forged_fraction
        f = "unseal"
        if forged:
            f = "forged"
            b = bytearray(raw)
            b[rng.randrange(17, len(b))] ^= 1 << rng.randrange(8)
            raw = bytes(b)
        hist.emit(type="invoke", f=f, process=wid, uuid=uuid, key_id=kid, endpoints=order)
        code, out, det = cl.call(order, talos.UNSEAL, uuid, raw)
        if code == "OK":
            hist.emit(type="ok", f=f, process=wid, uuid=uuid, key_id=kid, code="OK",
                      data=out.hex())
        elif code in talos.DEFINITE:
            hist.emit(type="ok", f=f, process=wid, uuid=uuid, key_id=kid, code=code)
        elif talos.connect_failed(code, det):
            hist.emit(type="fail", f=f, process=wid, uuid=uuid, key_id=kid, code=code, detail=det)
        else:
            hist.emit(type="info", f=f, process=wid, uuid=uuid, key_id=kid, code=code, detail=det)


def kmsctl(args, node_ip, *cmd):
    env = dict(os.environ, KMSCTL_ENDPOINT=f"{node_ip}:4051", KMSCTL_CACERT=args.ca,
               KMSCTL_CERT=os.path.join(args.pki, "operator.pem"),
               KMSCTL_KEY=os.path.join(args.pki, "operator-key.pem"), KMSCTL_TIMEOUT="10s")
    try:
        p = subprocess.run([args.kmsctl, *cmd, "-o", "json"], env=env, capture_output=True,
                           text=True, timeout=15)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        return 124, "", "timeout"


def classify_kmsctl(rc, err):
    if rc == 0:
        return "ok", "OK"
    code = "UNKNOWN"
    if "(code " in err:
        code = err.rsplit("(code ", 1)[1].split(")")[0]
    e = err.lower()
    if code == "Unavailable" and ("failed to connect" in e or "connection refused" in e):
        return "fail", code
    if code in ("NotFound", "InvalidArgument", "PermissionDenied", "AlreadyExists",
                "Unauthenticated"):
        return "fail", code
    if rc == 1:
        return "fail", "LOCAL"
    return "info", code


def operator(args, hist, pool, stop, deadline):
    rng = random.Random(args.seed * 1000 + 999)
    nodes = args.operator_nodes.split(",")
    pid = 900
    next_rot = time.monotonic() + args.rotate_every * (0.5 + rng.random())
    n = 0
    while not stop.is_set() and time.monotonic() < deadline and n < 10000:
        n += 1
        stop.wait(args.revoke_every * (0.5 + rng.random()))
        if stop.is_set() or time.monotonic() >= deadline:
            break
        node = rng.choice(nodes)
        if args.rotate_every > 0 and time.monotonic() >= next_rot:
            next_rot = time.monotonic() + args.rotate_every * (0.5 + rng.random())
            hist.emit(type="invoke", f="rotate", process=pid, node=node)
            rc, out, err = kmsctl(args, node, "operator", "rotate")
            typ, code = classify_kmsctl(rc, err)
            term = None
            try:
                term = json.loads(out).get("active_term") if rc == 0 else None
            except ValueError:
                pass
            hist.emit(type=typ, f="rotate", process=pid, node=node, code=code, term=term,
                      detail=err.strip()[-200:])
            continue
        if args.revoke_every <= 0:
            continue
        e = pool.pick_revoke(rng)
        if e is None:
            continue
        uuid, blob, kid = e
        hist.emit(type="invoke", f="revoke", process=pid, key_id=kid, uuid=uuid, node=node)
        rc, out, err = kmsctl(args, node, "keys", "revoke", kid)
        typ, code = classify_kmsctl(rc, err)
        hist.emit(type=typ, f="revoke", process=pid, key_id=kid, uuid=uuid, node=node, code=code,
                  detail=err.strip()[-200:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--history", required=True)
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--operator-nodes", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--pki", required=True)
    ap.add_argument("--kmsctl", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rate", type=float, default=60)
    ap.add_argument("--max-ops", type=int, default=20000)
    ap.add_argument("--timeout", type=float, default=10)
    ap.add_argument("--seal-fraction", type=float, default=0.4)
    ap.add_argument("--forged-fraction", type=float, default=0.05)
    ap.add_argument("--revoke-every", type=float, default=1.5)
    ap.add_argument("--rotate-every", type=float, default=6)
    ap.add_argument("--stop-file", default="")
    args = ap.parse_args()
    hist = History(args.history)
    pool = Pool()
    stop = threading.Event()
    deadline = time.monotonic() + args.duration
    counter = {"n": 0, "lock": threading.Lock()}
    ts = [threading.Thread(target=talos_worker, args=(args, w, hist, pool, stop, deadline, counter),
                           daemon=True) for w in range(args.workers)]
    ts.append(threading.Thread(target=operator, args=(args, hist, pool, stop, deadline),
                               daemon=True))
    for t in ts:
        t.start()
    while time.monotonic() < deadline:
        if args.stop_file and os.path.exists(args.stop_file):
            break
        time.sleep(0.2)
    stop.set()
    for t in ts:
        t.join(timeout=args.timeout + 8)
    hist.emit(type="end", f="client", process=-1)


if __name__ == "__main__":
    main()
