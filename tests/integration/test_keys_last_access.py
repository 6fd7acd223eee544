#!/usr/bin/python3
"""Last access (issue 12): three real kmsd nodes with lastAccess.interval 2s.
A key unsealed through a follower and one through the leader show their last
access in `keys show` (table and JSON) on every node within the interval;
a key never unsealed shows '-'; `keys list --unused-since`, `--revoked`,
`--term` filter; bad filter values are refused. Under a burst of 64
Talos-like clients for 10 s each replica writes at most one last-access
batch per interval (measured from /metrics and the raft applied index).
Ports 31240-31269."""
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import Cluster, check, finish, port_open, OK, TALOS, wait  # noqa: E402

BASE = 31240
INTERVAL = 2.0


def key_id_of(c, uuid):
    p = c.ctl(1, "keys", "list", "-o", "json", "--node-uuid", uuid)
    try:
        keys = json.loads(p.stdout)["keys"]
        return keys[0]["key_id"] if len(keys) == 1 else None
    except (ValueError, KeyError, IndexError):
        return None


def show(c, i, kid):
    p = c.ctl(i, "keys", "show", kid, "-o", "json")
    try:
        return json.loads(p.stdout)
    except ValueError:
        return None


def listed(c, i, *filters):
    p = c.ctl(i, "keys", "list", "-o", "json", *filters)
    try:
        return sorted(k["key_id"] for k in json.loads(p.stdout)["keys"])
    except (ValueError, KeyError):
        return None


def metric(c, i, name):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{c.port(i, 3)}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return int(float(line.split()[1]))
    except OSError:
        return None
    return None


def run(c):
    t0 = time.time()
    c.env["KMSD_LAST_ACCESS_INTERVAL"] = f"{int(INTERVAL)}s"
    c.up()
    c.init()
    for i in (1, 2, 3):
        wait(lambda: port_open(c.port(i, 0)), 10)
    leader = c.wait_leader()
    follower = next(i for i in (1, 2, 3) if i != leader)

    uc, ua, ub = (str(uuidlib.uuid4()) for _ in range(3))
    rc, blob_c, _ = c.seal(c.endpoints(), uc)
    check(rc == OK, "key C sealed (never unsealed)")
    time.sleep(8)
    rc_a, blob_a, data_a = c.seal(c.endpoints(), ua)
    rc_b, blob_b, data_b = c.seal(c.endpoints(), ub)
    check(rc_a == OK and rc_b == OK, "keys A and B sealed")
    ka, kb, kc = key_id_of(c, ua), key_id_of(c, ub), key_id_of(c, uc)
    check(None not in (ka, kb, kc), "key ids listed")
    s = show(c, 1, ka)
    check(s is not None and s.get("last_access_at") is None,
          f"before any unseal: last_access_at null ({s and s.get('last_access_at')})")

    before = int(time.time() * 1000)
    check(c.unseal(c.talos(follower), ua, blob_a) == (OK, data_a),
          f"A unsealed through follower {follower}")
    check(c.unseal(c.talos(leader), ub, blob_b) == (OK, data_b),
          f"B unsealed through leader {leader}")
    after = int(time.time() * 1000)
    t_unseal = time.time()

    def visible():
        for i in (1, 2, 3):
            for k in (ka, kb):
                s = show(c, i, k)
                if not s or s.get("last_access_at") is None:
                    return False
        return True
    check(wait(visible, 4 * INTERVAL + 5), "last access of A and B shown on every node")
    print(f"FIGURE last access visible on 3 nodes {time.time() - t_unseal:.1f} s after the unseal "
          f"(interval {INTERVAL:.0f} s)")
    p = c.ctl(3, "keys", "show", ka)
    line = next((l for l in p.stdout.splitlines() if l.startswith("Last Access")), "")
    check(line.strip() != "" and not line.rstrip().endswith("-") and "20" in line,
          "table shows Last Access: " + line.strip())
    p = c.ctl(2, "keys", "list")
    row = next((l for l in p.stdout.splitlines() if l.startswith(kc)), "")
    check(row != "" and " - " in row, "never-unsealed key C shows '-' in LAST ACCESS: " + row[:110])

    # Filters.
    # An age between A/B's last access and C's creation (sealed 8 s before
    # them), whatever the machine's speed.
    age = f"{int(time.time() - t_unseal) + 3}s"
    got = listed(c, 2, "--unused-since", age)
    check(got == [kc], f"--unused-since {age} lists only C (never used, sealed 8 s earlier): {got}")
    got = listed(c, 2, "--unused-since", "90d")
    check(got == [], f"--unused-since 90d lists nothing: {got}")
    check(listed(c, 1, "--term", "1") == sorted([ka, kb, kc]), "--term 1 lists every key")
    check(listed(c, 1, "--term", "2") == [], "--term 2 lists nothing (no rotation)")
    p = c.ctl(1, "keys", "revoke", kc)
    check(p.returncode == 0, "C revoked")
    check(wait(lambda: listed(c, 3, "--revoked") == [kc], 5), "--revoked lists only C")
    check(listed(c, 3, "--revoked", "--term", "1", "--unused-since", "1s") == [kc],
          "filters combine")
    for bad in (("--unused-since", "5x"), ("--unused-since", "0d"), ("--term", "0")):
        p = c.ctl(1, "keys", "list", *bad)
        check(p.returncode != 0 and "Error" in p.stderr,
              f"keys list {' '.join(bad)} refused: " + p.stderr.strip()[:90])

    # Burst: 64 Talos-like clients for 10 s over 16 keys.
    keys = []
    for _ in range(2):
        u = str(uuidlib.uuid4())
        pr = c.client("seal", "-ca", c.ca(), "-endpoints", c.endpoints(), "-uuid", u, "-n", "8",
                      timeout=60)
        keys += [json.loads(l) for l in pr.stdout.splitlines() if l.strip()]
    check(len(keys) == 16, f"16 keys sealed for the burst ({len(keys)})")
    time.sleep(INTERVAL + 1)  # let pending batches go
    w0 = [metric(c, i, "kmsd_last_access_writes_total") for i in (1, 2, 3)]
    a0 = (c.status(leader) or {}).get("applied_index", 0)
    blobs = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    for k in keys:
        blobs.write(json.dumps(k) + "\n")
    blobs.close()
    tb = time.time()
    pr = subprocess.run([TALOS, "load", "-ca", c.ca(), "-endpoints", c.endpoints(),
                         "-clients", "64", "-duration", "10s", "-blobs", blobs.name, "-rotate"],
                        capture_output=True, text=True, timeout=120)
    dur = time.time() - tb
    os.unlink(blobs.name)
    time.sleep(INTERVAL + 1)  # the last batches
    w1 = [metric(c, i, "kmsd_last_access_writes_total") for i in (1, 2, 3)]
    a1 = (c.status(leader) or {}).get("applied_index", 0)
    try:
        res = json.loads(pr.stdout)
    except ValueError:
        res = {}
    ok = res.get("ok", 0)
    check(ok > 0 and not res.get("failures"), f"burst: {ok} unseals OK, failures {res.get('failures')}")
    writes = [b - a for a, b in zip(w0, w1)] if None not in w0 + w1 else None
    window = dur + INTERVAL + 1
    bound = int(window / INTERVAL) + 2
    print(f"FIGURE burst of 64 clients for {dur:.1f} s: {ok} unseals; last-access writes per "
          f"replica {writes} (bound {bound} each = one per {INTERVAL:.0f} s); raft entries "
          f"applied meanwhile {a1 - a0}")
    check(writes is not None and all(1 <= w <= bound for w in writes),
          f"each replica wrote 1..{bound} last-access batches during the burst: {writes}")
    # Each batch is one entry, and the leader may follow a commit with one
    # empty barrier entry that tells the followers the commit index at once
    # (src/raft/node_ops.c, commit_notify): at most two entries per batch.
    check(a1 - a0 <= 2 * 3 * bound + 5,
          f"replicated writes during the burst bounded: {a1 - a0} entries for {ok} unseals")
    print(f"FIGURE test time {time.time() - t0:.1f} s")


def main():
    c = Cluster(nodes=3, base=BASE)
    try:
        run(c)
    finally:
        from kmslib import failures
        if failures:
            c.dump_logs()
        c.down()
    finish()


if __name__ == "__main__":
    main()
