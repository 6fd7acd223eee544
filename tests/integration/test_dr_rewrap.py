#!/usr/bin/python3
"""Rewrap and retire-term (issue 11): three real kmsd nodes. Seal keys under
term 1, revoke one, rotate, seal more under term 2; retire-term of a term in
use and of the active term are refused with a clear error; rewrap under a
Talos-like unseal load, kill -9 of the leader in the middle (every record
still unseals, the rewrap finishes when run again); retire term 1: the term
is gone from every replica's keyring, every blob unseals on every node to
its exact bytes, the revoked key stays refused, the load saw 0 failed
unseals. Ports 31200-31239."""
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import (Cluster, check, finish, port_open, KMSCTL, OK,  # noqa: E402
                    PERMISSION_DENIED, TALOS, wait)

BASE = 31200


def ctl_env(c, nodes):
    return dict(os.environ,
                KMSCTL_ENDPOINTS=",".join(f"127.0.0.1:{c.port(i, 1)}" for i in nodes),
                KMSCTL_CACERT=os.path.join(c.dir, "pki", "ca.pem"),
                KMSCTL_CERT=os.path.join(c.dir, "pki", "operator.pem"),
                KMSCTL_KEY=os.path.join(c.dir, "pki", "operator-key.pem"))


def seal_many(c, uuids, per):
    keys = []
    for u in uuids:
        p = c.client("seal", "-ca", c.ca(), "-endpoints", c.endpoints(), "-uuid", u,
                     "-n", str(per), timeout=60)
        for line in p.stdout.splitlines():
            if line.strip():
                keys.append(json.loads(line))
    return keys


def keys_list(c, i, *filters):
    p = c.ctl(i, "keys", "list", "-o", "json", *filters)
    try:
        return json.loads(p.stdout)["keys"]
    except (ValueError, KeyError):
        return None


def unseal_all(c, keys, node):
    bad = 0
    for k in keys:
        rc, out = c.unseal(c.talos(node), k["uuid"], k["blob"])
        if rc != OK or out != k["data"]:
            bad += 1
    return bad


def run(c):
    t0 = time.time()
    c.up()
    c.init()
    for i in (1, 2, 3):
        wait(lambda: port_open(c.port(i, 0)), 10)

    old = seal_many(c, [str(uuidlib.uuid4()) for _ in range(6)], 10)
    check(len(old) == 60, f"60 keys sealed under term 1 ({len(old)})")
    # Revoke one machine's keys: revoked records are shredded (no
    # ciphertext), so they do not pin term 1.
    revoked = old[-1]
    p = c.ctl(1, "keys", "revoke", "--node-uuid", revoked["uuid"])
    check(p.returncode == 0 and "Revoked 10 keys" in p.stdout,
          "10 term-1 keys of one machine revoked: " + (p.stdout + p.stderr).strip()[-80:])
    old = [k for k in old if k["uuid"] != revoked["uuid"]]
    p = c.ctl(1, "operator", "rotate")
    check(p.returncode == 0, "rotate to term 2: " + (p.stdout + p.stderr).strip()[-80:])
    check(wait(lambda: all((c.status(i) or {}).get("active_term") == 2 for i in (1, 2, 3)), 10),
          "every replica uses active term 2")
    new = seal_many(c, [str(uuidlib.uuid4()) for _ in range(2)], 10)
    check(len(new) == 20, f"20 keys sealed under term 2 ({len(new)})")
    live = old + new
    n_old = len(keys_list(c, 2, "--term", "1") or [])
    live_old = [k for k in keys_list(c, 2, "--term", "1") or [] if not k["revoked"]]
    check(len(live_old) == len(old), f"keys list --term 1: {len(live_old)} live records on term 1"
          f" ({n_old} with the revoked ones)")

    # Refusals: a term still in use, the active term, a term that does not exist.
    p = c.ctl(2, "operator", "retire-term", "1")
    check(p.returncode != 0 and "still protects" in p.stderr and "rewrap" in p.stderr,
          "retire-term 1 refused while records use it: " + p.stderr.strip()[-140:])
    p = c.ctl(2, "operator", "retire-term", "2")
    check(p.returncode != 0 and "active term" in p.stderr,
          "retire-term of the active term refused: " + p.stderr.strip()[-120:])
    p = c.ctl(2, "operator", "retire-term", "7")
    check(p.returncode != 0 and "not in the keyring" in p.stderr,
          "retire-term of an unknown term refused: " + p.stderr.strip()[-120:])
    st = c.status(1)
    check(st and st.get("keyring_terms") == [1, 2], f"keyring still holds terms 1,2: {st and st.get('keyring_terms')}")

    # Talos-like load over every live blob during the rewrap and the crash,
    # on the two followers (an RPC in flight on the replica that is killed
    # fails whatever the rewrap does: Talos retries it; that is
    # test_e2e_cluster's subject, not this one's).
    leader = c.wait_leader()
    followers = [i for i in (1, 2, 3) if i != leader]
    blobs = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    for k in live:
        blobs.write(json.dumps(k) + "\n")
    blobs.close()
    load = subprocess.Popen([TALOS, "load", "-ca", c.ca(), "-endpoints", c.endpoints(followers),
                             "-clients", "8", "-duration", "25s", "-blobs", blobs.name,
                             "-rotate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(1)
    # First run: small batches, against the leader only, no retries, so the
    # kill -9 interrupts it half-way.
    r1 = subprocess.Popen([KMSCTL, "operator", "rewrap", "--batch", "4", "--pause-ms", "250",
                           "--retries", "0"], env=ctl_env(c, [leader]),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r1.stdout.readline()
    second = r1.stdout.readline()
    check("rewrapped to term 2" in second, "rewrap shows progress: " + second.strip())
    c.kill9(leader)
    out1, err1 = r1.communicate(timeout=30)
    check(r1.returncode != 0 and "run it again" in err1,
          "rewrap interrupted by kill -9 of the leader says how to resume: "
          + err1.strip()[-120:])
    survivors = [i for i in (1, 2, 3) if i != leader]
    check(wait(lambda: c.wait_leader(survivors, timeout=2), 15) is not None,
          "a survivor leads")
    lst = keys_list(c, survivors[0]) or []
    mixed = {k["term"] for k in lst if not k["revoked"]}
    check(mixed == {1, 2}, f"after the crash some records are rewrapped, some not: terms {sorted(mixed)}")
    for i in survivors:
        bad = unseal_all(c, live, i)
        check(bad == 0, f"mid-rewrap: every blob unseals on node {i} ({bad} failed)")

    # Resume: any replica (a follower forwards the operator to the leader),
    # with the leader still down; then bring it back.
    p = subprocess.run([KMSCTL, "operator", "rewrap", "--batch", "16"],
                       env=ctl_env(c, survivors), capture_output=True, text=True, timeout=60)
    check(p.returncode == 0 and "Success" in p.stdout,
          "rewrap run again completes: " + (p.stdout + p.stderr).strip()[-160:])
    c.local("start-node", str(leader))
    check(wait(lambda: (c.status(leader) or {}).get("sealed") is False, 30),
          f"node {leader} restarted and unsealed")

    left = [k for k in keys_list(c, survivors[0], "--term", "1") or [] if not k["revoked"]]
    check(left == [], f"no live record left on term 1 ({len(left)})")
    shown = keys_list(c, survivors[0], "--term", "2") or []
    rew = [k for k in shown if k.get("origin_term") == 1]
    check(len(rew) == len(old), f"{len(rew)} records show origin term 1, on term 2")
    p = c.ctl(survivors[0], "keys", "show", rew[0]["key_id"] if rew else "00")
    check("rewrapped from 1" in p.stdout, "keys show names the origin term: "
          + " ".join(l for l in p.stdout.splitlines() if "Term" in l))

    p = c.ctl(survivors[1], "operator", "retire-term", "1")
    check(p.returncode == 0 and "Retired term 1" in p.stdout,
          "retire-term 1 after the rewrap: " + (p.stdout + p.stderr).strip()[-120:])
    check(wait(lambda: all((c.status(i) or {}).get("keyring_terms") == [2] for i in (1, 2, 3)),
               15),
          "term 1's key is gone from every replica's keyring (status: terms [2])")

    out, _ = load.communicate(timeout=60)
    try:
        res = json.loads(out)
    except ValueError:
        res = None
    print(f"FIGURE load during rewrap + leader kill: {res and res.get('total')} unseals, "
          f"failures {res and res.get('failures')}, max {res and res.get('max_latency_ms')} ms")
    check(res is not None and res.get("total", 0) > 0 and not res.get("failures")
          and res.get("wrong_bytes", 1) == 0,
          "Talos-like load on the followers during rewrap and leader kill: 0 failed unseals, "
          "0 wrong bytes")
    os.unlink(blobs.name)

    for i in (1, 2, 3):
        bad = unseal_all(c, live, i)
        check(bad == 0, f"after retire: all {len(live)} blobs unseal on node {i} ({bad} failed)")
    rc, _ = c.unseal(c.endpoints(), revoked["uuid"], revoked["blob"])
    check(rc == PERMISSION_DENIED, f"revoked key still refused (code {rc})")
    u = str(uuidlib.uuid4())
    rc, blob, data = c.seal(c.endpoints(), u)
    check(rc == OK and c.unseal(c.endpoints(), u, blob) == (OK, data),
          "seal and unseal work after the retire")
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
