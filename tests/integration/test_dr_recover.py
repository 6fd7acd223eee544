#!/usr/bin/python3
"""Lost-quorum recovery (issue 11): three real kmsd nodes; seal keys; kill -9
two nodes for good and delete their dataDirs; `kmsd recover` on the
survivor (refused without --yes-i-understand and while it runs); start and
unseal it with the old shares; every acknowledged key unseals to its exact
bytes; a Seal works; two fresh members (ids 4, 5, empty dataDirs) are
added with `members add`; every key unseals on all three. Ports 30100-30149."""
import os
import re
import shutil
import subprocess
import sys
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import Cluster, check, finish, port_open, KMSD, OK, SRC, wait  # noqa: E402

BASE = 30100


def main():
    c = Cluster(nodes=3, base=BASE)
    try:
        run(c)
    finally:
        c.nodes = max(c.nodes, 5)
        c.down()
        if failures_present():
            c.dump_logs()
    finish()


def failures_present():
    from kmslib import failures
    return bool(failures)


def recover(c, i, *extra, stdin=subprocess.DEVNULL):
    return subprocess.run([KMSD, "recover", "--config", os.path.join(c.dir, f"node{i}", "kmsd.yaml"),
                           *extra], capture_output=True, text=True, timeout=60, stdin=stdin)


def write_fresh_config(c, i):
    """Config for a fresh member i: node 1's config with i's ports, cert and
    dataDir, and no initialCluster (it waits to be added)."""
    with open(os.path.join(c.dir, "node1", "kmsd.yaml")) as f:
        text = f.read()
    text = text.split("initialCluster:")[0]
    text = text.replace("nodeId: 1", f"nodeId: {i}")
    text = text.replace(f"{c.dir}/node1/data", f"{c.dir}/node{i}/data")
    text = text.replace("pki/node1", f"pki/node{i}")
    for off in range(4):
        text = text.replace(f"127.0.0.1:{c.port(1, off)}", f"127.0.0.1:{c.port(i, off)}")
    os.makedirs(os.path.join(c.dir, f"node{i}", "data"), exist_ok=True)
    with open(os.path.join(c.dir, f"node{i}", "kmsd.yaml"), "w") as f:
        f.write(text)


def start_raw(c, i):
    log = open(os.path.join(c.dir, f"node{i}", "kmsd.log"), "a")
    p = subprocess.Popen([KMSD, "--config", os.path.join(c.dir, f"node{i}", "kmsd.yaml")],
                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    with open(os.path.join(c.dir, f"node{i}", "kmsd.pid"), "w") as f:
        f.write(str(p.pid))
    return p


def unseal_node(c, i):
    wait(lambda: (c.status(i) or {}).get("initialized") is True, 60)
    for s in c.shares[:3]:
        c.ctl(i, "operator", "unseal", s)
    st = wait(lambda: (lambda s: s if s and s.get("sealed") is False else None)(c.status(i)), 10)
    return st is not None


def voters(st):
    return sorted(m["id"] for m in (st or {}).get("members", []) if m.get("role") == "voter")


def run(c):
    c.up()
    c.init()
    for i in (1, 2, 3):
        wait(lambda: port_open(c.port(i, 0)), 10)

    keys = []
    for n in range(24):
        u = str(uuidlib.uuid4())
        rc, blob, data = c.seal(c.endpoints(), u)
        if rc == OK:
            keys.append((u, blob, data))
    check(len(keys) == 24, f"24 keys sealed before the loss ({len(keys)} acknowledged)")

    # All three converge so the survivor is a typical follower, not luck.
    def converged():
        sts = [c.status(i) for i in (1, 2, 3)]
        idx = {s["applied_index"] for s in sts if s}
        return len(idx) == 1 and len([s for s in sts if s]) == 3
    check(wait(converged, 20), "3 nodes converged on one applied index")
    leader = c.wait_leader()
    survivor = next(i for i in (1, 2, 3) if i != leader)
    lost = [i for i in (1, 2, 3) if i != survivor]
    print(f"leader {leader}; survivor {survivor}; lost for good: {lost}")

    # Recovery refuses to run on a live node.
    r = recover(c, survivor, "--yes-i-understand")
    check(r.returncode != 0 and "still running" in r.stderr,
          "recover refused while kmsd runs on the dataDir: " + r.stderr.strip()[-120:])

    for i in lost:
        c.kill9(i)
        shutil.rmtree(os.path.join(c.dir, f"node{i}", "data"))
    st = wait(lambda: (lambda s: s if s and s.get("role") != "leader" else None)(c.status(survivor)), 10)
    rc, _, _ = c.seal(c.talos(survivor), str(uuidlib.uuid4()))
    check(rc != OK, f"no quorum: a Seal on the survivor fails (rc {rc})")
    c.local("stop-node", str(survivor))

    # Without the confirmation flag and no terminal: refused, nothing changed.
    raft_dir = os.path.join(c.dir, f"node{survivor}", "data", "raft")
    before = sorted(os.listdir(raft_dir))
    r = recover(c, survivor)
    check(r.returncode == 1 and "refused" in r.stderr and "WARNING" in r.stderr,
          "recover without --yes-i-understand refused with warnings")
    check(sorted(os.listdir(raft_dir)) == before, "refused recover changed nothing in raft/")
    r = recover(c, survivor, "--members", f"{survivor},99", "--yes-i-understand")
    check(r.returncode == 1 and "no known raft address" in r.stderr,
          "recover with an unknown member id refused: " + r.stderr.strip()[-100:])
    empty = os.path.join(c.dir, "empty.yaml")
    with open(os.path.join(c.dir, f"node{survivor}", "kmsd.yaml")) as f:
        y = f.read()
    with open(empty, "w") as f:
        f.write(y.replace(f"{c.dir}/node{survivor}/data", f"{c.dir}/emptydata"))
    os.makedirs(os.path.join(c.dir, "emptydata"), exist_ok=True)
    r = subprocess.run([KMSD, "recover", "--config", empty, "--yes-i-understand"],
                       capture_output=True, text=True, timeout=60)
    check(r.returncode == 2 and "no raft state" in r.stderr,
          "recover of an empty dataDir refused: " + r.stderr.strip()[-100:])

    t0 = time.time()
    r = recover(c, survivor, "--yes-i-understand")
    check(r.returncode == 0, f"kmsd recover on node {survivor} succeeded "
          f"({time.time() - t0:.2f}s): " + (r.stdout + r.stderr).strip()[-200:])
    for w in ("LOST", "NEVER run this while", "WIPED"):
        check(w in r.stderr, f"recover warns: '{w}'")

    t0 = time.time()
    c.local("start-node", str(survivor))
    st = wait(lambda: (lambda s: s if s and s.get("role") == "leader" and s.get("sealed") is False
                       else None)(c.status(survivor)), 20)
    check(st is not None, f"recovered node {survivor} leads alone, unsealed with the old shares "
          f"({time.time() - t0:.1f}s)")
    check(voters(st) == [survivor], f"configuration is the survivor only: {voters(st)}")
    wait(lambda: port_open(c.port(survivor, 0)), 10)

    bad = 0
    for u, blob, data in keys:
        rc, out = c.unseal(c.talos(survivor), u, blob)
        if rc != OK or out != data:
            bad += 1
    check(bad == 0, f"all {len(keys)} acknowledged keys unseal to their exact bytes on the survivor")
    u = str(uuidlib.uuid4())
    rc, blob, data = c.seal(c.talos(survivor), u)
    check(rc == OK, "a Seal works after recovery")
    if rc == OK:
        keys.append((u, blob, data))

    # Two fresh members (new ids, empty dataDirs).
    subprocess.run([os.path.join(SRC, "deploy", "gen-pki.sh"), os.path.join(c.dir, "pki"),
                    "--nodes", "5"], check=True, capture_output=True)
    c.nodes = 5
    for i in (4, 5):
        write_fresh_config(c, i)
        start_raw(c, i)
        wait(lambda: (c.status(i) or {}).get("node_id") is not None, 20)
        t0 = time.time()
        a = c.ctl(survivor, "operator", "members", "add", "--id", str(i),
                  "--raft-address", f"127.0.0.1:{c.port(i, 2)}",
                  "--cluster-address", f"127.0.0.1:{c.port(i, 1)}",
                  "--talos-address", f"127.0.0.1:{c.port(i, 0)}", timeout=90)
        check(a.returncode == 0, f"members add {i} ({time.time() - t0:.1f}s) "
              + (a.stdout + a.stderr).strip()[-160:])
        check(unseal_node(c, i), f"fresh node {i} unsealed with the old shares")
    st = c.status(survivor)
    check(voters(st) == sorted([survivor, 4, 5]), f"3 voters again: {voters(st)}")

    for i in (survivor, 4, 5):
        wait(lambda: port_open(c.port(i, 0)), 15)
        bad = 0
        for u, blob, data in keys:
            rc, out = c.unseal(c.talos(i), u, blob)
            if rc != OK or out != data:
                bad += 1
        check(bad == 0, f"all {len(keys)} keys unseal to their exact bytes on node {i}")
    rc, _, _ = c.seal(c.talos(4), str(uuidlib.uuid4()))
    check(rc == OK, "a Seal through fresh node 4 works (forwarded to the leader)")
    c.kill9(survivor)
    nl = c.wait_leader(among=[4, 5], timeout=20)
    check(nl in (4, 5), f"with the recovered node killed, the fresh members elect node {nl}")


if __name__ == "__main__":
    main()
