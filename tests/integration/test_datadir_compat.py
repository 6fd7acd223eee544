#!/usr/bin/python3
"""A dataDir written by kmsd 0.1 (commit 26ffd98, canonical libraft 0.15)
opens under this build (cowsql/raft 0.22): tests/integration/fixtures/
datadir-0.1-raft0.15.tar.gz holds the old release's data of a one-node and a
three-node cluster, each stopped cleanly (SIGTERM) and killed (kill -9); see
fixtures/README.md for how it was made. For each, the new kmsd must start,
unseal with the fixture's shares, unseal every known blob to its exact bytes,
refuse the revoked one, seal and unseal anew, carry on the raft term and
applied index, take a snapshot with the new library, and start again.

Ports 28000-28033: the raft addresses are stored in the old raft log, so the
fixture's ports are reused as they are."""
import json
import os
import shutil
import signal
import sys
import tarfile
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import Cluster, check, finish, port_open, OK, PERMISSION_DENIED  # noqa: E402

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TGZ = os.path.join(FIX, "datadir-0.1-raft0.15.tar.gz")
META = os.path.join(FIX, "datadir-0.1-raft0.15.json")

# Low thresholds so that the new library also takes snapshots of its own.
os.environ["KMSD_RAFT_SNAPSHOT_THRESHOLD"] = "16"
os.environ["KMSD_RAFT_SNAPSHOT_TRAILING"] = "4"


def wait(cond, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    return cond()


def extract(name, dest):
    """Extracts scenario NAME (NAME/nodeI/data/...) into DEST/nodeI/data."""
    with tarfile.open(TGZ) as t:
        members = []
        for m in t.getmembers():
            parts = m.name.split("/", 1)
            if parts[0] != name or len(parts) < 2:
                continue
            if m.issym() or m.islnk() or ".." in parts[1].split("/"):
                raise RuntimeError(f"unexpected tar member {m.name}")
            m.name = parts[1]
            members.append(m)
        t.extractall(dest, members=members)
    return len(members)


def unseal_node(c, i, shares, what):
    ok = wait(lambda: (c.status(i) or {}).get("initialized") is True)
    check(ok, f"{what}: node {i} is initialised (sealed) from the old dataDir")
    st = c.status(i) or {}
    check(st.get("sealed") is True, f"{what}: node {i} starts sealed")
    for s in shares:
        p = c.ctl(i, "operator", "unseal", s)
        if p.returncode != 0:
            print(p.stdout, p.stderr)
    ok = wait(lambda: (c.status(i) or {}).get("sealed") is False)
    check(ok, f"{what}: node {i} unsealed with {len(shares)} of the fixture's shares")
    ok = wait(lambda: port_open(c.port(i, 0)))
    check(ok, f"{what}: node {i} Talos port open")


def stop_all(c):
    for i in range(1, c.nodes + 1):
        pid = c.pid(i)
        if pid:
            os.kill(pid, signal.SIGTERM)
    for i in range(1, c.nodes + 1):
        pid = c.pid(i)
        if not pid:
            continue
        end = time.time() + 20
        while time.time() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            check(False, f"node {i} exits on SIGTERM")
            os.kill(pid, signal.SIGKILL)
        os.unlink(os.path.join(c.dir, f"node{i}", "kmsd.pid"))


def start_all(c):
    env = dict(c.env, KMSD_NO_UNSEAL="1")
    saved, c.env = c.env, env
    try:
        for i in range(1, c.nodes + 1):
            c.local("start-node", str(i))
    finally:
        c.env = saved


def check_blobs(c, what, blobs, revoked):
    bad = []
    n = 0
    for k, b in enumerate(blobs):
        if b["tag"] == "revoked":
            continue
        node = k % c.nodes + 1
        rc, out = c.unseal(c.talos(node), b["uuid"], b["blob"])
        n += 1
        if rc != OK or out != b["data"]:
            bad.append((b["uuid"], b["tag"], rc))
    check(not bad, f"{what}: all {n} known blobs unseal to their exact plaintext"
          + (f" (bad: {bad[:5]})" if bad else ""))
    for b in revoked:
        for i in range(1, c.nodes + 1):
            rc, _ = c.unseal(c.talos(i), b["uuid"], b["blob"])
            check(rc == PERMISSION_DENIED,
                  f"{what}: revoked key {b['uuid']} -> PERMISSION_DENIED on node {i} (got {rc})")


def raft_files(c, i):
    return sorted(os.listdir(os.path.join(c.dir, f"node{i}", "data", "raft")))


def run(name, m, drop_store=False):
    what = name + (" without store/" if drop_store else "")
    c = Cluster(nodes=m["nodes"], base=m["base_port"])
    try:
        n = extract(name, c.dir)
        check(n > 0, f"{what}: extracted {n} fixture files ({m['stop']} stop, "
              f"{m['nodes']} node(s))")
        if drop_store:
            # Everything must then come from the old raft snapshot + old log
            # entries as the new library reads them.
            for i in range(1, c.nodes + 1):
                shutil.rmtree(os.path.join(c.dir, f"node{i}", "data", "store"))
        before = {i: raft_files(c, i) for i in range(1, c.nodes + 1)}
        c.up()
        shares = m["shares"][:m["threshold"]]
        for i in range(1, c.nodes + 1):
            unseal_node(c, i, shares, what)
        check(wait(lambda: c.leader() is not None), f"{what}: a leader is elected")
        for i in range(1, c.nodes + 1):
            old = m["status_at_stop"][str(i)]
            st = c.status(i) or {}
            check(st.get("cluster_id") == m["cluster_id"],
                  f"{what}: node {i} keeps cluster id {m['cluster_id'][:16]}")
            check(st.get("active_term") == old["active_term"],
                  f"{what}: node {i} keyring term {st.get('active_term')} == "
                  f"{old['active_term']} (the rotation carried over)")
            check(st.get("term", 0) >= old["term"],
                  f"{what}: node {i} raft term carries on: {old['term']} at stop -> "
                  f"{st.get('term')} now")
            check(st.get("applied_index", 0) >= old["applied_index"],
                  f"{what}: node {i} applied index carries on: {old['applied_index']} at stop"
                  f" -> {st.get('applied_index')} now")
            print(f"  node {i}: old raft files {before[i]}")
        blobs = m["blobs"]
        revoked = [b for b in blobs if b["tag"] == "revoked"]
        check(len(revoked) == 1, f"{what}: the fixture has one revoked blob")
        check_blobs(c, what, blobs, revoked)

        # New seals under the new library, enough to make it snapshot.
        fresh = []
        for k in range(3):
            u = str(uuidlib.uuid4())
            rc, blob, data = c.seal(c.talos(k % c.nodes + 1), u)
            check(rc == OK and blob, f"{what}: new seal {k + 1} on node {k % c.nodes + 1}")
            if rc == OK:
                fresh.append({"uuid": u, "blob": blob, "data": data, "tag": "new"})
        for b in fresh:
            rc, out = c.unseal(c.talos(c.nodes), b["uuid"], b["blob"])
            check(rc == OK and out == b["data"], f"{what}: new blob {b['uuid'][:8]} unseals")
        # four machines, five seals each (rateLimit.sealsPerNodePerMinute: 10)
        ps = [c.client("seal", "-ca", c.ca(), "-endpoints", c.endpoints(), "-uuid",
                       str(uuidlib.uuid4()), "-n", "5", timeout=120) for _ in range(4)]
        check([p.returncode for p in ps] == [0] * 4,
              f"{what}: 20 more seals (past the snapshot threshold) "
              f"{[p.returncode for p in ps]}")
        for p in ps:
            for line in p.stdout.splitlines():
                o = json.loads(line)
                fresh.append({"uuid": o["uuid"], "blob": o["blob"], "data": o["data"],
                              "tag": "new"})
        leader = c.wait_leader()
        lst = c.status(leader) or {}
        ok = wait(lambda: all((c.status(i) or {}).get("applied_index", 0) >=
                              lst.get("commit_index", 1 << 62) for i in range(1, c.nodes + 1)))
        check(ok, f"{what}: every node applied up to the leader's commit "
              f"{lst.get('commit_index')}")
        mid = {i: c.status(i) or {} for i in range(1, c.nodes + 1)}
        old_snaps = {i: {f for f in before[i] if f.startswith("snapshot-")}
                     for i in range(1, c.nodes + 1)}
        for i in range(1, c.nodes + 1):
            new_snaps = wait(lambda: {f for f in raft_files(c, i)
                                      if f.startswith("snapshot-")} - old_snaps[i], timeout=10)
            check(new_snaps, f"{what}: node {i} took a snapshot under the new library "
                  f"({sorted(new_snaps)})")

        # Restart on what the new library wrote (old segments, new snapshots).
        stop_all(c)
        start_all(c)
        for i in range(1, c.nodes + 1):
            unseal_node(c, i, shares, what + " after restart")
        check(wait(lambda: c.leader() is not None), f"{what}: a leader after restart")
        for i in range(1, c.nodes + 1):
            st = c.status(i) or {}
            check(st.get("term", 0) >= mid[i].get("term", 1 << 62) and
                  st.get("applied_index", 0) >= mid[i].get("applied_index", 1 << 62),
                  f"{what}: node {i} after restart: term {mid[i].get('term')} -> "
                  f"{st.get('term')}, applied {mid[i].get('applied_index')} -> "
                  f"{st.get('applied_index')}")
        check_blobs(c, what + " after restart", blobs + fresh, revoked)
        u = str(uuidlib.uuid4())
        rc, blob, data = c.seal(c.endpoints(), u)
        check(rc == OK and c.unseal(c.talos(1), u, blob) == (OK, data),
              f"{what}: seal + unseal after restart")
    finally:
        c.down()


def main():
    with open(META) as f:
        meta = json.load(f)
    only = os.environ.get("KMS_COMPAT_SCENARIOS")
    # NAME, or NAME/no-store: the same with every store/ (RocksDB) removed.
    names = only.split(",") if only else list(meta["scenarios"]) + [
        "single/no-store", "three-k9/no-store"]
    for name in names:
        print(f"--- scenario {name}", flush=True)
        base, _, variant = name.partition("/")
        run(base, meta["scenarios"][base], drop_store=variant == "no-store")
    finish()


if __name__ == "__main__":
    main()
