#!/usr/bin/python3
"""Opt-in peer unseal (unseal.peer: true; docs/security.md "Peer unseal").

A real 3-node cluster with KMSD_UNSEAL_PEER=true on every member, on ports
32000-32023. The operator CA file is a bundle of the cluster CA and a
second ("foreign") CA, as with a separate operator CA: a node certificate
from that CA passes the TLS handshake and must be refused by kmsd itself.

  rolling   every node restarted in turn (no shares given: start-node with
            KMSD_NO_UNSEAL=1) under a Talos-like unseal load over all
            endpoints: each comes back unsealed by a peer, no wrong bytes, 0
            failed unseals (the client retries once, as Talos does)
  foreign   node 3 restarted with a CN=kmsd-node-3 certificate from the
            foreign CA: stays sealed, the peers log and audit the refusal
  peer-off  node 3 restarted with unseal.peer: false: asks nobody, stays
            sealed until given shares (the time to unsealed with shares is
            the comparison figure)
  seal      an operator seal of node 2 closes the replicated gate (every
            node reports it); node 2 stays sealed, a restarted node 1 stays
            sealed; k shares on node 2 reopen it and node 1 then unseals
            from a peer by itself
  removed   node 3 stopped, removed (members remove), started again: the
            peers refuse it (not a member), logged and audited; it stays
            sealed
"""
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kmslib  # noqa: E402
from kmslib import TALOS, Cluster, check, finish  # noqa: E402

BASE = 32000
for exe in (kmslib.KMSD, kmslib.KMSCTL, TALOS):
    if not os.path.exists(exe):
        print(f"SKIP: {exe} not built")
        sys.exit(77)


def wait(pred, timeout, step=0.1):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def sealed(c, i):
    st = c.status(i)
    return st is None or st.get("sealed", True)


def serving(c, i):
    st = c.status(i)
    return bool(st) and st.get("serving") is True


def log_text(c, i):
    try:
        with open(os.path.join(c.dir, f"node{i}", "kmsd.log"), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def log_lines(c, i, since=0):
    return [json.loads(l) for l in log_text(c, i)[since:].splitlines()
            if l.startswith("{")]


def log_size(c, i):
    return len(log_text(c, i))


def start(c, i, **env):
    """start-node without shares; returns the time the process was started."""
    e = dict(c.env, KMSD_NO_UNSEAL="1", **env)
    t0 = time.time()
    p = subprocess.run([kmslib.LOCAL, "start-node", str(i)], env=e, capture_output=True,
                       text=True, timeout=60)
    if p.returncode != 0:
        print(p.stdout, p.stderr, file=sys.stderr)
    return t0


def start_raw(c, i, **env):
    """Starts node i's kmsd directly (as local-cluster.sh does), without
    waiting for its cluster API: with a foreign server certificate kmsctl
    cannot talk to it."""
    e = {k: v for k, v in c.env.items()
         if k not in ("KMSD_CLUSTER_DIR", "KMSD_BASE_PORT", "KMSD_BIN_DIR")}
    e.update(env)
    node = os.path.join(c.dir, f"node{i}")
    with open(os.path.join(node, "kmsd.log"), "a") as log:
        p = subprocess.Popen([kmslib.KMSD, "--config", os.path.join(node, "kmsd.yaml")],
                             env=e, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    with open(os.path.join(node, "kmsd.pid"), "w") as f:
        f.write(str(p.pid))
    return p


def stop(c, i):
    c.local("stop-node", str(i))


class LoadLoop(threading.Thread):
    """Talos-like unseal load over all endpoints (4 clients, new connection
    per call) in 5 s runs of the Go client, until finish(): the restarts
    take as long as they take (much longer under ASan)."""

    def __init__(self, c, blobs):
        super().__init__(daemon=True)
        self.c, self.blobs, self.stop = c, blobs, threading.Event()
        self.res = {"total": 0, "ok": 0, "failures": {}, "wrong_bytes": 0, "retried": 0,
                    "runs_ok": True}

    def run(self):
        for _ in range(60):  # bounded: at most 5 minutes
            if self.stop.is_set():
                break
            p = subprocess.run([TALOS, "load", "-ca", self.c.ca(), "-endpoints",
                                self.c.endpoints(), "-clients", "4", "-duration", "5s",
                                "-retry-unavailable", "1",
                                "-blobs", self.blobs], capture_output=True, text=True,
                               timeout=120)
            try:
                r = json.loads(p.stdout)
            except ValueError:
                print(p.stdout, p.stderr, file=sys.stderr)
                self.res["runs_ok"] = False
                continue
            self.res["total"] += r.get("total", 0)
            self.res["ok"] += r.get("ok", 0)
            self.res["wrong_bytes"] += r.get("wrong_bytes", 0)
            self.res["retried"] += r.get("retried", 0)
            for k, v in (r.get("failures") or {}).items():
                self.res["failures"][k] = self.res["failures"].get(k, 0) + v

    def finish(self):
        self.stop.set()
        self.join(timeout=150)
        return self.res


def refusals(c, nodes, since, requester):
    """Serving-side refusal audit lines for requester since offsets."""
    out = []
    for i in nodes:
        for ln in log_lines(c, i, since.get(i, 0)):
            if ln.get("mod") == "audit" and ln.get("op") == "peer-unseal-serve" and \
                    ln.get("outcome") == "refused" and ln.get("requester") == str(requester):
                out.append((i, ln.get("reason", "")))
    return out


def warn_refusals(c, nodes, since):
    return [ln for i in nodes for ln in log_lines(c, i, since.get(i, 0))
            if ln.get("mod") == "peer" and ln.get("msg") == "peer unseal refused"]


def main():
    c = Cluster(nodes=3, base=BASE)
    pki = os.path.join(c.dir, "pki")
    t_start = time.time()
    try:
        subprocess.run([os.path.join(kmslib.SRC, "deploy", "gen-pki.sh"), pki, "--nodes", "3"],
                       check=True, timeout=60)
        bundle = os.path.join(pki, "operator-bundle.pem")
        with open(bundle, "w") as out:
            for f in ("ca.pem", "foreign-ca.pem"):
                with open(os.path.join(pki, f)) as inp:
                    out.write(inp.read())
        # A node certificate for node 3 from the foreign CA (same CN, same SAN).
        ext = os.path.join(pki, "foreign3.ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyAgreement\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n"
                    "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        fk, fc = os.path.join(pki, "foreign3-key.pem"), os.path.join(pki, "foreign3.pem")
        for cmd in (["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                     "-out", fk],
                    ["openssl", "req", "-new", "-key", fk, "-subj", "/CN=kmsd-node-3",
                     "-out", fc + ".csr"],
                    ["openssl", "x509", "-req", "-in", fc + ".csr", "-CA",
                     os.path.join(pki, "foreign-ca.pem"), "-CAkey",
                     os.path.join(pki, "foreign-ca-key.pem"), "-CAcreateserial", "-days", "30",
                     "-sha256", "-extfile", ext, "-out", fc]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=30)
        c.env["KMSD_UNSEAL_PEER"] = "true"
        c.env["KMSD_TLS_OPERATOR_CA_FILE"] = bundle
        c.up()
        c.init()
        print(f"PHASE cluster up and unsealed at {time.time() - t_start:.0f} s", flush=True)
        check(all(c.status(i).get("peer_unseal") is True for i in (1, 2, 3)),
              "every node reports peer_unseal: true")
        check(all(c.status(i).get("peer_unseal_gate") == "open" for i in (1, 2, 3)),
              "the peer unseal gate is open after init")

        # ---- rolling restart under a Talos-like load ----------------------
        blobs = os.path.join(c.dir, "blobs.jsonl")
        p = c.client("seal", "-ca", c.ca(), "-endpoints", c.endpoints(), "-uuid",
                     "peer-unseal-test-node", "-n", "8")
        check(p.returncode == 0, "8 seals before the rolling restart")
        with open(blobs, "w") as f:
            f.write(p.stdout)
        load = LoadLoop(c, blobs)
        load.start()
        t_load = time.time()
        times = []
        for i in (1, 2, 3):
            before = log_size(c, i)
            stop(c, i)
            t0 = start(c, i)
            ok = wait(lambda: not sealed(c, i), 20)
            dt = time.time() - t0
            times.append(dt)
            check(ok, f"rolling: node {i} unsealed without shares ({dt:.2f} s after start)")
            txt = log_text(c, i)[before:]
            check('"unsealed by a peer"' in txt and '"via":"peer unseal from node' in txt,
                  f"rolling: node {i} was unsealed by a peer (log)")
            check('"via":"key shares"' not in txt, f"rolling: node {i} got no shares")
            check(wait(lambda: serving(c, i), 15), f"rolling: node {i} serves again")
        res = load.finish()
        fails = res["failures"]
        print(f"FIGURE rolling restart load: {res['ok']}/{res['total']} OK, failures {fails}, "
              f"retried once like Talos {res.get('retried', 0)}", flush=True)
        # The client retries an UNAVAILABLE/CANCELLED unseal once on a new
        # connection, as Talos retries: a call racing a replica's SIGTERM.
        check(res["total"] > 0 and res["wrong_bytes"] == 0 and res["runs_ok"] and not fails,
              "rolling: 0 failed unseals (Talos-like single retry), no wrong bytes")
        print(f"FIGURE peer unseal after restart: " +
              ", ".join(f"{t:.2f} s" for t in times) + " (process start to unsealed)")

        print(f"PHASE done at {time.time() - t_start:.0f} s", flush=True)
        # ---- a node certificate from another CA is refused -----------------
        stop(c, 3)
        since = {i: log_size(c, i) for i in (1, 2)}
        b3 = log_size(c, 3)
        proc = start_raw(c, 3, KMSD_TLS_NODE_CERT_FILE=fc, KMSD_TLS_NODE_KEY_FILE=fk)
        t0 = time.time()
        got = wait(lambda: refusals(c, (1, 2), since, 3), 15)
        reasons = refusals(c, (1, 2), since, 3)
        check(got and all("not a cluster node certificate" in r for _, r in reasons),
              f"foreign CA: the peers refused and audited it after {time.time() - t0:.1f} s "
              f"({reasons[:2]})")
        check(len(warn_refusals(c, (1, 2), since)) > 0,
              "foreign CA: the refusal is logged at warn level")
        check(proc.poll() is None and '"unsealed"' not in log_text(c, 3)[b3:] and
              not kmslib.port_open(c.port(3, 0)),
              "foreign CA: node 3 stays sealed (Talos port closed)")
        # This process is our child (a zombie once it exits): stop it here.
        proc.terminate()
        proc.wait(timeout=15)
        os.unlink(os.path.join(c.dir, "node3", "kmsd.pid"))

        print(f"PHASE done at {time.time() - t_start:.0f} s", flush=True)
        # ---- peer: false: nothing changes ---------------------------------
        since = {i: log_size(c, i) for i in (1, 2)}
        b3 = log_size(c, 3)
        start(c, 3, KMSD_UNSEAL_PEER="false")
        time.sleep(2)
        check(sealed(c, 3), "peer: false: node 3 stays sealed after a restart")
        st = c.status(3) or {}
        check(st.get("peer_unseal") is False and st.get("peer_unseal_gate") == "",
              "peer: false: status says peer unseal is off")
        asked = [ln for i in (1, 2) for ln in log_lines(c, i, since[i])
                 if ln.get("op") == "peer-unseal-serve" and ln.get("requester") == "3"]
        check(not asked, "peer: false: node 3 asked no peer")
        check('"mod":"peer"' not in log_text(c, 3)[b3:],
              "peer: false: no peer unseal activity in node 3's log")
        stop(c, 3)
        e = dict(c.env, KMSD_UNSEAL_PEER="false")
        t0 = time.time()
        p = subprocess.run([kmslib.LOCAL, "start-node", "3"], env=e, capture_output=True,
                           text=True, timeout=90)
        dt_shares = time.time() - t0
        check(p.returncode == 0 and not sealed(c, 3),
              f"peer: false: node 3 unsealed with 3 shares ({dt_shares:.2f} s)")
        print(f"FIGURE unseal after restart with shares (script enters 3 shares at once): "
              f"{dt_shares:.2f} s")
        stop(c, 3)
        start(c, 3)
        check(wait(lambda: not sealed(c, 3), 20), "node 3 back with peer unseal")
        check(wait(lambda: serving(c, 3), 15), "node 3 serves")

        print(f"PHASE done at {time.time() - t_start:.0f} s", flush=True)
        # ---- operator seal closes the gate ---------------------------------
        p = c.ctl(2, "operator", "seal")
        check(p.returncode == 0, f"operator seal of node 2 ({p.stderr.strip()})")
        check(wait(lambda: all((c.status(i) or {}).get("peer_unseal_gate") == "closed"
                               for i in (1, 2, 3)), 10),
              "seal: every node reports the gate closed (replicated)")
        time.sleep(1)
        check(sealed(c, 2), "seal: node 2 stays sealed (no peer unseal)")
        stop(c, 1)
        b1 = log_size(c, 1)
        start(c, 1)
        time.sleep(2)
        check(sealed(c, 1), "seal: restarted node 1 stays sealed while the gate is closed")
        check("administratively sealed" in log_text(c, 1)[b1:],
              "seal: node 1 says why it does not ask")
        for s in c.shares[:3]:
            c.ctl(2, "operator", "unseal", s)
        check(not sealed(c, 2), "seal: node 2 unsealed with 3 shares")
        check(wait(lambda: (c.status(3) or {}).get("peer_unseal_gate") == "open", 10),
              "seal: the k-share unseal reopened the gate")
        t0 = time.time()
        check(wait(lambda: not sealed(c, 1), 20),
              f"seal: node 1 then unsealed from a peer by itself "
              f"({time.time() - t0:.2f} s after the shares)")
        check('"unsealed by a peer"' in log_text(c, 1)[b1:], "seal: node 1 by a peer (log)")

        print(f"PHASE done at {time.time() - t_start:.0f} s", flush=True)
        # ---- a removed member is refused -----------------------------------
        stop(c, 3)
        leader = c.wait_leader(among=(1, 2))
        p = c.ctl(leader or 1, "operator", "members", "remove", "--id", "3")
        check(p.returncode == 0, f"members remove 3 ({p.stderr.strip()})")
        since = {i: log_size(c, i) for i in (1, 2)}
        b3 = log_size(c, 3)
        start(c, 3)
        # Two outcomes keep the key from a removed member: the peers refuse
        # (and audit) its request, or it learns first that it was removed
        # (the others say so) and exits with status 4 before it asks.
        exited = '"stopped: this node is no longer a member of the cluster' in log_text(c, 3)[b3:]
        got = exited or wait(lambda: refusals(c, (1, 2), since, 3)
                             or '"this node was removed' in log_text(c, 3)[b3:], 15)
        reasons = refusals(c, (1, 2), since, 3)
        left = '"this node was removed' in log_text(c, 3)[b3:]
        check(got and (left or (reasons and all("not a member" in r for _, r in reasons))),
              f"removed: the peers refused and audited node 3 ({reasons[:2]}), or it found out "
              f"it was removed and left (exit 4: {left})")
        check('"unsealed by a peer"' not in log_text(c, 3)[b3:],
              "removed: node 3 never got the root key from a peer")
        check(sealed(c, 3), "removed: node 3 stays sealed")
        print(f"FIGURE test wall time {time.time() - t_start:.0f} s")
    finally:
        c.down()
    finish()


if __name__ == "__main__":
    main()
