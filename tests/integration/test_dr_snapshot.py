#!/usr/bin/python3
"""Online snapshot and restore to a new cluster (issue 11). A 3-node cluster
(ports 30150-30173): seal keys, revoke one, `kmsctl operator snapshot save`
on a follower and on the leader under a Talos-like unseal load (0 failed
unseals), `snapshot inspect`, corrupt and truncated copies refused; then
every dataDir destroyed and `kmsd restore` builds a NEW 3-node cluster on
other ports (30174-30197, its own PKI), refusing a non-empty dataDir and a
dataDir of another cluster; the old shares unseal it; every key unseals to
its exact bytes on every node; the revoked key is refused; a Seal works."""
import base64
import json
import os
import shutil
import subprocess
import sys
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import (Cluster, check, finish, failures, port_open, KMSD, TALOS, OK,  # noqa: E402
                    PERMISSION_DENIED, wait)


def main():
    c = Cluster(nodes=3, base=30150)
    c2 = Cluster(nodes=3, base=30174)
    try:
        run(c, c2)
    finally:
        if failures:
            c.dump_logs()
            c2.dump_logs()
        c.down()
        c2.down()
    finish()


def inspect(c, path):
    p = c.ctl(1, "operator", "snapshot", "inspect", "-o", "json", path)
    try:
        return p.returncode, json.loads(p.stdout), p.stderr
    except ValueError:
        return p.returncode, None, p.stderr


def restore(cfg, snap, *extra):
    return subprocess.run([KMSD, "restore", "--snapshot", snap, "--config", cfg, *extra],
                          capture_output=True, text=True, timeout=120)


def run(c, c2):
    c.up()
    c.init()
    for i in (1, 2, 3):
        wait(lambda: port_open(c.port(i, 0)), 10)
    keys = []
    for n in range(40):
        u = str(uuidlib.uuid4())
        rc, blob, data = c.seal(c.endpoints(), u)
        if rc == OK:
            keys.append((u, blob, data))
    check(len(keys) == 40, f"40 keys sealed ({len(keys)})")
    ru, rblob, _ = keys.pop(0)
    kid = base64.b64decode(rblob)[1:17].hex()
    check(c.ctl(1, "keys", "revoke", kid).returncode == 0, "one key revoked")

    blobs = os.path.join(c.dir, "blobs.jsonl")
    with open(blobs, "w") as f:
        for (u, b, d) in keys:
            f.write(json.dumps({"uuid": u, "blob": b, "data": d}) + "\n")
    leader = c.wait_leader()
    follower = next(i for i in (1, 2, 3) if i != leader)
    load = subprocess.Popen([TALOS, "load", "-ca", c.ca(), "-endpoints", c.endpoints(),
                             "-clients", "8", "-duration", "8s", "-blobs", blobs],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    snap = os.path.join(c.dir, "backup.kmssnap")
    saves = []
    t_end = time.time() + 5
    n = 0
    while time.time() < t_end and n < 20:
        node = follower if n % 2 == 0 else leader
        t0 = time.time()
        p = c.ctl(node, "operator", "snapshot", "save", "-o", "json", snap + f".{n}")
        saves.append((p.returncode, time.time() - t0, node, p.stdout + p.stderr))
        n += 1
    out, err = load.communicate(timeout=60)
    check(all(s[0] == 0 for s in saves),
          f"{len(saves)} snapshot saves (follower {follower} and leader {leader}) under load "
          f"succeeded; slowest {max(s[1] for s in saves):.2f}s "
          + " ".join(s[3].strip()[:160] for s in saves if s[0] != 0))
    try:
        res = json.loads(out)
    except ValueError:
        res = None
        print(out, err)
    if res:
        print(f"FIGURE unseal load during {len(saves)} saves: {res.get('total')} unseals, "
              f"failures {res.get('failures')}, max latency {res.get('max_latency_ms')} ms")
    check(res is not None and res.get("total", 0) > 0 and not res.get("failures")
          and res.get("wrong_bytes", 1) == 0, "0 failed unseals during the snapshot saves")
    shutil.copy(snap + ".0", snap)
    size = os.path.getsize(snap)

    rc, info, e = inspect(c, snap)
    check(rc == 0 and info and info["records"] == 40 and info["revoked"] == 1
          and info["checksum"] == "ok" and info["index"] > 0 and len(info["cluster_id"]) == 32
          and info["threshold"] == 3 and info["shares"] == 5,
          f"inspect: {info} ({size} bytes) {e.strip()}")
    st = c.status(1)
    check(info and st and info["cluster_id"] == st.get("cluster_id"),
          "snapshot cluster id is the cluster's")
    with open(snap, "rb") as f:
        head = f.read(600).decode(errors="replace")
    check("USELESS without k" in head, "the header says it is useless without k shares")

    bad = snap + ".altered"
    data = bytearray(open(snap, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(bad, "wb").write(bytes(data))
    rc, _, e = inspect(c, bad)
    check(rc == 1 and "checksum mismatch" in e, "an altered copy is refused: " + e.strip())
    trunc = snap + ".truncated"
    open(trunc, "wb").write(bytes(data[: len(data) - 100]))
    rc, _, e = inspect(c, trunc)
    check(rc == 1 and "truncated" in e, "a truncated copy is refused: " + e.strip())
    junk = snap + ".junk"
    open(junk, "wb").write(b"hello world" * 20)
    rc, _, e = inspect(c, junk)
    check(rc == 1 and "not a kmsd snapshot" in e, "a non-snapshot file is refused: " + e.strip())

    # --- lose everything (local-cluster.sh down keeps the temp dir)
    c.local("down")
    for i in (1, 2, 3):
        shutil.rmtree(os.path.join(c.dir, f"node{i}", "data"))

    # --- a new cluster on other ports; first as ANOTHER cluster (own init)
    c2.up()
    c2.init()
    other = c2.status(1)["cluster_id"]
    c2.local("down")
    cfg = [os.path.join(c2.dir, f"node{i}", "kmsd.yaml") for i in (1, 2, 3)]
    r = restore(cfg[0], snap)
    check(r.returncode == 1 and "not empty" in r.stderr,
          "restore into a non-empty dataDir refused: " + r.stderr.strip()[-120:])
    r = restore(cfg[0], snap, "--force")
    check(r.returncode == 1 and other in r.stderr and "another" not in r.stdout
          and "holds cluster" in r.stderr,
          "restore into a dataDir of another cluster refused even with --force: "
          + r.stderr.strip()[-160:])
    r = restore(cfg[0], bad, "--force")
    check(r.returncode == 1 and "checksum" in r.stderr, "restore of an altered file refused")
    for i in (1, 2, 3):
        shutil.rmtree(os.path.join(c2.dir, f"node{i}", "data"))
    t0 = time.time()
    for i in (1, 2, 3):
        r = restore(cfg[i - 1], snap)
        check(r.returncode == 0, f"kmsd restore of node {i} ({time.time() - t0:.2f}s) "
              + (r.stdout + r.stderr).strip()[-160:])
    r = restore(cfg[0], snap, "--force")
    check(r.returncode == 0, "restore --force over the same cluster's dataDir works")

    c2.shares = c.shares  # the OLD shares
    env = dict(c2.env, KMSD_NO_UNSEAL="1")
    for i in (1, 2, 3):
        subprocess.run([c2_local(), "start-node", str(i)], env=env, capture_output=True,
                       text=True, timeout=60)
    for i in (1, 2, 3):
        st = c2.status(i)
        check(st and st.get("initialized") is True and st.get("sealed") is True
              and st.get("cluster_id") == info["cluster_id"],
              f"restored node {i} starts sealed with the old cluster id")
        for s in c.shares[:3]:
            c2.ctl(i, "operator", "unseal", s)
        st = wait(lambda: (lambda s: s if s and s.get("sealed") is False else None)(c2.status(i)),
                  10)
        check(st is not None, f"restored node {i} unsealed with the OLD shares")
    check(c2.wait_leader() is not None, "the new cluster elects a leader")
    for i in (1, 2, 3):
        wait(lambda: port_open(c2.port(i, 0)), 15)
        badn = 0
        for u, blob, d in keys:
            rc, o = c2.unseal(c2.talos(i), u, blob)
            if rc != OK or o != d:
                badn += 1
        check(badn == 0, f"all {len(keys)} keys unseal to their exact bytes on new node {i}")
        rc, _ = c2.unseal(c2.talos(i), ru, rblob)
        check(rc == PERMISSION_DENIED, f"the revoked key stays refused on new node {i} ({rc})")
    u = str(uuidlib.uuid4())
    rc, blob, d = c2.seal(c2.endpoints(), u)
    check(rc == OK, "a Seal works on the restored cluster")
    rc, o = c2.unseal(c2.talos(3), u, blob)
    check(rc == OK and o == d, "and the new key unseals on node 3")
    print(f"FIGURE snapshot of {len(keys) + 1} records: {size} bytes")


def c2_local():
    from kmslib import LOCAL
    return LOCAL


if __name__ == "__main__":
    main()
