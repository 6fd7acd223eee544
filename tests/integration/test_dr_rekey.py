#!/usr/bin/python3
"""Rekey (issue 11): `kmsctl operator rekey` from 5 shares / threshold 3 to
4 / 2 on a 3-node cluster (ports 31000-31023; a 1-node cluster on
31100-31103 only provides another cluster's shares). Checked: status with no
rekey, an update without a rekey, a second init refused, a wrong nonce,
cancel, another cluster's shares (progress reset), too few shares (nothing
changes); then the rekey commits under a Talos-like unseal load with 0
failed unseals; every unsealed replica switches without a restart (a
rotation afterwards is readable everywhere); a leader change cancels a
rekey in progress; the entry is shredded from the
raft log on every node; old shares are refused on a sealed replica and the
new ones unseal it; a kill -9'd replica restarted unseals with the new
shares and serves every key."""
import base64
import json
import os
import subprocess
import sys
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import (Cluster, check, finish, failures, port_open, KMSCTL, LOCAL, TALOS, OK, wait)  # noqa: E402


def rk(c, i, *args, share=None):
    """kmsctl against node i; a share goes on stdin ('-'), never argv."""
    env = dict(os.environ,
               KMSCTL_ENDPOINT=f"127.0.0.1:{c.port(i, 1)}",
               KMSCTL_CACERT=os.path.join(c.dir, "pki", "ca.pem"),
               KMSCTL_CERT=os.path.join(c.dir, "pki", "operator.pem"),
               KMSCTL_KEY=os.path.join(c.dir, "pki", "operator-key.pem"))
    argv = [KMSCTL, *args] + (["-"] if share is not None else [])
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30,
                       input=(share + "\n") if share is not None else None)
    try:
        out = json.loads(p.stdout)
    except ValueError:
        out = None
    return p.returncode, out, p.stderr.strip()


def update(c, i, nonce, share):
    return rk(c, i, "operator", "rekey", "update", "--nonce", nonce, "-o", "json", share=share)


def unseal_with(c, i, shares):
    last = None
    for s in shares:
        last = rk(c, i, "operator", "unseal", "-o", "json", share=s)
        if last[0] != 0:
            return last
    return last


def openssl(*args):
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)


def share_recipients(o):
    """operator init --share-recipients on the 1-node cluster, unseal with
    --share-key; returns its 5 plain shares (decrypted with openssl
    pkeyutl, as a holder without kmsctl would)."""
    o.up()
    keys = []
    for i in range(6):
        k = os.path.join(o.dir, f"holder{i}.pem")
        bits = "1024" if i == 5 else "2048"
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}", "-out", k)
        openssl("pkey", "-in", k, "-pubout", "-out", k + ".pub")
        keys.append(k)
    def recipients(name, idx):
        path = os.path.join(o.dir, name)
        with open(path, "w") as f:
            for i in idx:
                f.write(open(keys[i] + ".pub").read())
        return path
    rc, _, e = rk(o, 1, "operator", "init", "--share-recipients", recipients("four.pem", range(4)))
    check(rc == 1 and "has 4 keys for --key-shares 5" in e, "4 recipients for 5 shares: " + e)
    rc, _, e = rk(o, 1, "operator", "init", "--share-recipients",
                  recipients("weak.pem", [0, 1, 2, 3, 5]))
    check(rc == 1 and "key 5" in e and "1024 bits" in e, "a 1024-bit recipient refused: " + e)
    st = o.status(1)
    check(st and st.get("initialized") is False, "nothing was initialised by the refusals")
    rc, out, e = rk(o, 1, "operator", "init", "--key-shares", "5", "--key-threshold", "3",
                    "--share-recipients", recipients("ok.pem", range(5)), "-o", "json")
    enc = (out or {}).get("encrypted_shares", [])
    check(rc == 0 and len(enc) == 5 and "shares" not in out
          and all(x.startswith("kmsenc1-") for x in enc) and "kms1-" not in json.dumps(out),
          "init --share-recipients: 5 encrypted shares, none in the clear")
    rc, _, e = rk(o, 1, "operator", "unseal", "--share-key", keys[1], share=enc[0] if enc else "")
    check(rc == 1 and "cannot decrypt" in e, "another holder's key cannot open a share: " + e)
    for i in range(3):
        rc, st, e = rk(o, 1, "operator", "unseal", "--share-key", keys[i], "-o", "json",
                       share=enc[i] if enc else "")
    check(rc == 0 and st and st["sealed"] is False, "unsealed with 3 shares opened by "
          "--share-key " + e)
    plain = []
    for i, x in enumerate(enc):
        ct = os.path.join(o.dir, f"share{i}.bin")
        with open(ct, "wb") as f:
            f.write(base64.b64decode(x[len("kmsenc1-"):]))
        p = openssl("pkeyutl", "-decrypt", "-inkey", keys[i], "-in", ct, "-pkeyopt",
                    "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt",
                    "rsa_mgf1_md:sha256")
        os.unlink(ct)
        plain.append(p.stdout.strip())
    check(len(plain) == 5 and all(x.startswith("kms1-") for x in plain),
          "each holder can also open their share with openssl pkeyutl")
    return plain


def main():
    c = Cluster(nodes=3, base=31000)
    other = Cluster(nodes=1, base=31100)
    try:
        run(c, other)
    finally:
        if failures:
            c.dump_logs()
        c.down()
        other.down()
    finish()


def run(c, other):
    t_start = time.time()
    other_shares = share_recipients(other)
    other.down()
    c.up()
    c.init()
    for i in (1, 2, 3):
        wait(lambda: port_open(c.port(i, 0)), 10)
    old = c.shares
    check(len(old) == 5 and len(other_shares) == 5, "two clusters initialised with 5/3")
    keys = []
    for _ in range(30):
        u = str(uuidlib.uuid4())
        rc, blob, data = c.seal(c.endpoints(), u)
        if rc == OK:
            keys.append((u, blob, data))
    check(len(keys) == 30, f"30 keys sealed ({len(keys)})")
    leader = c.wait_leader()
    fol = next(i for i in (1, 2, 3) if i != leader)

    # --- no rekey yet
    rc, st, e = rk(c, fol, "operator", "rekey", "status", "-o", "json")
    check(rc == 0 and st and st["started"] is False and st["required"] == 3,
          f"status without a rekey (asked a follower): {st} {e}")
    rc, _, e = update(c, leader, "0" * 32, old[0])
    check(rc == 2 and "no rekey in progress" in e, "update without a rekey refused: " + e)
    rc, _, e = rk(c, leader, "operator", "rekey", "init", "--key-shares", "4",
                  "--key-threshold", "1")
    check(rc == 1 and "threshold" in e, "threshold 1 refused locally: " + e)

    # --- init, second init refused, wrong nonce, cancel
    rc, st, e = rk(c, fol, "operator", "rekey", "init", "--key-shares", "4",
                   "--key-threshold", "2", "-o", "json")
    check(rc == 0 and st and st["started"] and len(st["nonce"]) == 32 and st["progress"] == 0
          and st["new_shares"] == 4 and st["new_threshold"] == 2,
          f"rekey init through a follower (followed to the leader): {st} {e}")
    n1 = st["nonce"] if st else ""
    rc, _, e = rk(c, leader, "operator", "rekey", "init", "--key-shares", "4",
                  "--key-threshold", "2")
    check(rc == 2 and "already in progress" in e, "a second init is refused: " + e)
    rc, _, e = update(c, leader, "f" * 32, old[0])
    check(rc == 2 and "wrong rekey nonce" in e, "a wrong nonce is refused: " + e)
    rc, _, e = rk(c, leader, "operator", "rekey", "cancel", "--nonce", n1)
    check(rc == 0, "cancel " + e)
    rc, _, e = update(c, leader, n1, old[0])
    check(rc == 2 and "no rekey in progress" in e, "the cancelled nonce is refused: " + e)

    # --- a leader change cancels a rekey in progress (cleanly: nothing changed)
    rc, st, e = rk(c, leader, "operator", "rekey", "init", "--key-shares", "4",
                   "--key-threshold", "2", "-o", "json")
    n0 = st["nonce"] if st else ""
    check(rc == 0 and update(c, leader, n0, old[0])[0] == 0, "rekey begun, 1 share given")
    check(rk(c, leader, "operator", "step-down")[0] == 0, f"leader {leader} steps down")
    leader = wait(lambda: (lambda l: l if l and l != leader else None)(c.leader()), 15)
    check(leader is not None, f"new leader {leader}")
    rc, st, e = rk(c, leader, "operator", "rekey", "status", "-o", "json")
    check(rc == 0 and st and st["started"] is False, f"no rekey on the new leader: {st}")
    rc, _, e = update(c, leader, n0, old[1])
    check(rc == 2 and "leader change cancels" in e, "the old nonce is refused: " + e)
    fol = next(i for i in (1, 2, 3) if i != leader)

    # --- another cluster's shares: progress reset, the rekey stays open
    rc, st, e = rk(c, leader, "operator", "rekey", "init", "--key-shares", "4",
                   "--key-threshold", "2", "-o", "json")
    n2 = st["nonce"] if st else ""
    check(rc == 0 and n2 and n2 != n1, "a new rekey gets a new nonce")
    r1 = update(c, leader, n2, other_shares[0])
    r2 = update(c, leader, n2, other_shares[1])
    r3 = update(c, leader, n2, other_shares[2])
    check(r1[0] == 0 and r1[1]["progress"] == 1 and r2[1]["progress"] == 2 and r3[0] == 2
          and "do not reconstruct" in r3[2], "another cluster's shares refused: " + r3[2])
    rc, st, e = rk(c, leader, "operator", "rekey", "status", "-o", "json")
    check(rc == 0 and st["started"] and st["nonce"] == n2 and st["progress"] == 0,
          f"progress reset, rekey still open: {st}")
    rc, _, e = update(c, leader, n2, old[0])
    rc2, _, e2 = update(c, leader, n2, old[0])
    check(rc == 0 and rc2 == 2 and "already given" in e2, "the same share twice refused: " + e2)

    # --- too few shares: nothing changes
    rc, st, e = update(c, leader, n2, old[1])
    check(rc == 0 and st["progress"] == 2 and st["required"] == 3 and not st["complete"]
          and not st["shares"], f"2 of 3 shares: no new shares yet: {st}")
    s = c.status(fol)
    check(s and s["shares"] == 5 and s["threshold"] == 3, "keyring unchanged (5/3)")

    # --- the last share under load
    blobs = os.path.join(c.dir, "blobs.jsonl")
    with open(blobs, "w") as f:
        for (u, b, d) in keys:
            f.write(json.dumps({"uuid": u, "blob": b, "data": d}) + "\n")
    load = subprocess.Popen([TALOS, "load", "-ca", c.ca(), "-endpoints", c.endpoints(),
                             "-clients", "8", "-duration", "6s", "-blobs", blobs],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    t0 = time.time()
    rc, st, e = update(c, leader, n2, old[2])
    t_commit = time.time() - t0
    new = st["shares"] if st else []
    check(rc == 0 and st["complete"] and len(new) == 4 and st["threshold"] == 2
          and "shown only once" in e, f"third share commits the rekey in {t_commit:.2f}s: "
          f"{len(new)} new shares, threshold {st and st.get('threshold')}")
    check(len(set(new)) == 4 and not set(new) & set(old), "the new shares are new")
    out, err = load.communicate(timeout=60)
    try:
        res = json.loads(out)
    except ValueError:
        res = None
        print(out, err)
    if res:
        print(f"FIGURE unseal load during the rekey: {res.get('total')} unseals, "
              f"failures {res.get('failures')}, max latency {res.get('max_latency_ms')} ms")
    check(res is not None and res.get("total", 0) > 0 and not res.get("failures")
          and res.get("wrong_bytes", 1) == 0, "0 failed unseals during the rekey")

    # --- every unsealed replica switched without a restart
    def switched():
        sts = [c.status(i) for i in (1, 2, 3)]
        return all(x and x["shares"] == 4 and x["threshold"] == 2 and not x["sealed"]
                   and not x.get("keyring_error") for x in sts) and sts
    check(wait(switched, 10), "every replica shows 4/2, unsealed, no keyring error")
    rc, _, e = rk(c, leader, "operator", "rotate")
    check(rc == 0, "rotate after the rekey (leader holds the new root key) " + e)

    def rotated():
        sts = [c.status(i) for i in (1, 2, 3)]
        return all(x and x["active_term"] == 2 and not x.get("keyring_error")
                   for x in sts) and sts
    check(wait(rotated, 10), "the rotated keyring (under the new root key) is read on every "
          "replica: the followers switched root keys without a restart")

    # --- the entry (new root key wrapped under the old) left every raft log
    def shredded(i):
        with open(os.path.join(c.dir, f"node{i}", "kmsd.log"), errors="replace") as f:
            return "removed from the raft log" in f.read()
    check(wait(lambda: all(shredded(i) for i in (1, 2, 3)), 15),
          "shred (snapshots + log compaction) done on every node after the rekey")

    # --- old shares refused on a sealed replica, the new ones unseal it
    check(rk(c, fol, "operator", "seal")[0] == 0, f"node {fol} sealed")
    rc, _, e = unseal_with(c, fol, old[3:5])
    check(rc == 2 and "do not reconstruct" in e and "rekey" in e,
          "old shares refused after the rekey: " + e)
    rc, st, e = unseal_with(c, fol, new[:2])
    check(rc == 0 and st and st["sealed"] is False, f"2 new shares unseal node {fol} " + e)

    # --- a restarted replica unseals with the new shares only
    victim = next(i for i in (1, 2, 3) if i != leader and i != fol)
    c.kill9(victim)
    with open(os.path.join(c.dir, "shares.txt"), "w") as f:
        f.write("\n".join(new) + "\n")
    env = dict(c.env, KMSD_NO_UNSEAL="1")
    subprocess.run([LOCAL, "start-node", str(victim)], env=env, capture_output=True, text=True,
                   timeout=60)
    rc, _, e = unseal_with(c, victim, old[:2])
    check(rc == 2 and "do not reconstruct" in e, f"restarted node {victim}: old shares refused")
    rc, st, e = unseal_with(c, victim, new[2:4])
    check(rc == 0 and st and st["sealed"] is False,
          f"restarted node {victim} unsealed with 2 new shares " + e)
    wait(lambda: port_open(c.port(victim, 0)), 15)
    time.sleep(0.5)
    bad = 0
    for u, blob, d in keys:
        rc, o = c.unseal(c.talos(victim), u, blob)
        if rc != OK or o != d:
            bad += 1
    check(bad == 0, f"all {len(keys)} keys unseal on the restarted node {victim}")
    u = str(uuidlib.uuid4())
    rc, blob, d = c.seal(c.endpoints(), u)
    check(rc == OK and c.unseal(c.talos(fol), u, blob) == (OK, d), "a new Seal/Unseal works")
    print(f"FIGURE test_dr_rekey total {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    main()
