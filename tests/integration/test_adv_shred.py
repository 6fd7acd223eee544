#!/usr/bin/python3
"""Revocation shreds (docs/security.md "Revocation"): after a revoke (by key
id and by node UUID) and the documented bound, no copy of the revoked
records' nonce+ciphertext remains in any file of any node's data directory
(raft segments, raft snapshots, RocksDB SST/WAL/MANIFEST), while unrevoked
keys still unseal to their exact bytes, also after a full restart.
Three real kmsd nodes on ports 29400-29439."""
import base64
import os
import signal
import sys
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import Cluster, check, finish, port_open, OK, PERMISSION_DENIED  # noqa: E402

# The bound docs/security.md promises for a healthy cluster (leader reachable).
SHRED_BOUND_S = 10.0


def varint(b, i):
    v = s = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return v, i


def record_secret(buf, kid):
    """Finds the packed kmsd.v1.SealedRecord of key id kid in buf and returns
    nonce+ciphertext (the bytes revocation must shred), or None."""
    pat = b"\x12\x10" + kid
    pos = buf.find(pat)
    while pos >= 0:
        i, fields = pos, {}
        try:
            while i < len(buf) and len(fields) < 10:
                key, i = varint(buf, i)
                num, wt = key >> 3, key & 7
                if wt == 0:
                    _, i = varint(buf, i)
                elif wt == 2:
                    n, i = varint(buf, i)
                    fields[num] = buf[i:i + n]
                    i += n
                else:
                    break
                if 5 in fields and 6 in fields:
                    if len(fields[5]) == 12 and len(fields[6]) >= 16:
                        return fields[5], fields[6]
                    break
        except IndexError:
            pass
        pos = buf.find(pat, pos + 1)
    return None


def node_files(c, i):
    root = os.path.join(c.dir, f"node{i}", "data")
    for d, _, files in os.walk(root):
        for f in files:
            yield os.path.join(d, f)


def find_secret(c, kid):
    for i in range(1, c.nodes + 1):
        for p in node_files(c, i):
            try:
                with open(p, "rb") as f:
                    sec = record_secret(f.read(), kid)
            except OSError:
                continue
            if sec:
                return sec
    return None


def copies(c, needles):
    """(node, file, needle index) of every file holding a needle."""
    hits = []
    for i in range(1, c.nodes + 1):
        for p in node_files(c, i):
            try:
                with open(p, "rb") as f:
                    b = f.read()
            except OSError:
                continue
            for k, n in enumerate(needles):
                if n in b:
                    hits.append((i, os.path.relpath(p, c.dir), k))
    return hits


def stop_all(c):
    for i in range(1, c.nodes + 1):
        pid = c.pid(i)
        if pid:
            os.kill(pid, signal.SIGTERM)
    for i in range(1, c.nodes + 1):
        pid = c.pid(i)
        end = time.time() + 15
        while pid and time.time() < end:
            try:
                os.kill(pid, 0)
                time.sleep(0.05)
            except ProcessLookupError:
                break
        try:
            os.unlink(os.path.join(c.dir, f"node{i}", "kmsd.pid"))
        except OSError:
            pass


def start_all(c):
    env = dict(c.env, KMSD_NO_UNSEAL="1")
    saved, c.env = c.env, env
    try:
        for i in range(1, c.nodes + 1):
            c.local("start-node", str(i))
    finally:
        c.env = saved
    for i in range(1, c.nodes + 1):
        for s in c.shares[:3]:
            c.ctl(i, "operator", "unseal", s)
    for i in range(1, c.nodes + 1):
        end = time.time() + 15
        while not port_open(c.port(i, 0)) and time.time() < end:
            time.sleep(0.1)


def main():
    c = Cluster(nodes=3, base=29400)
    try:
        run(c)
    finally:
        c.down()
    finish()


def run(c):
    c.up()
    c.init()
    for i in range(1, 4):
        end = time.time() + 15
        while not port_open(c.port(i, 0)) and time.time() < end:
            time.sleep(0.1)
        check(port_open(c.port(i, 0)), f"Talos port of node {i} open")

    keys = []  # (uuid, blob, data, kid)
    for k in range(8):
        u = str(uuidlib.uuid4())
        rc, blob, data = c.seal(c.talos(k % 3 + 1), u)
        check(rc == OK, f"seal {k}")
        keys.append((u, blob, data, base64.b64decode(blob)[1:17]))
    # two more keys of one node UUID, revoked by UUID
    nu = str(uuidlib.uuid4())
    for _ in range(2):
        rc, blob, data = c.seal(c.endpoints(), nu)
        check(rc == OK, "seal for the UUID to revoke")
        keys.append((nu, blob, data, base64.b64decode(blob)[1:17]))
    time.sleep(0.5)  # followers apply

    revoked = [keys[0], keys[3], keys[8], keys[9]]
    kept = [k for k in keys if k not in revoked]
    secrets = []
    for (_, _, _, kid) in revoked:
        sec = find_secret(c, kid)
        check(sec is not None, f"ciphertext of key {kid.hex()[:8]} found on disk before the revoke")
        if sec:
            secrets.append(sec[0] + sec[1])  # nonce || ciphertext, as in the record
            secrets.append(sec[1])
    before = copies(c, secrets)
    print(f"FIGURE before revoke: {len(before)} file copies of the revoked ciphertexts")
    check(len(before) > 0, "the ciphertexts are on disk before the revoke (the search works)")

    p = c.ctl(2, "keys", "revoke", revoked[0][3].hex())
    check(p.returncode == 0, "keys revoke KEY_ID: " + (p.stdout + p.stderr).strip()[:100])
    p = c.ctl(3, "keys", "revoke", revoked[1][3].hex())
    check(p.returncode == 0, "keys revoke KEY_ID (second key)")
    p = c.ctl(1, "keys", "revoke", "--node-uuid", nu)
    check(p.returncode == 0, "keys revoke --node-uuid")
    t0 = time.time()
    left = copies(c, secrets)
    while left and time.time() - t0 < SHRED_BOUND_S:
        time.sleep(0.25)
        left = copies(c, secrets)
    took = time.time() - t0
    print(f"FIGURE after revoke: {len(left)} copies left after {took:.1f}s "
          f"(bound {SHRED_BOUND_S:.0f}s)")
    check(not left, f"no copy of a revoked ciphertext on any node within {SHRED_BOUND_S:.0f}s"
          + (f" (left: {left[:6]})" if left else ""))

    for (u, blob, data, kid) in revoked:
        rc, _ = c.unseal(c.talos(1), u, blob)
        check(rc == PERMISSION_DENIED, f"revoked {kid.hex()[:8]} -> PERMISSION_DENIED (got {rc})")
    p = c.ctl(1, "keys", "show", revoked[0][3].hex(), "-o", "json")
    check(p.returncode == 0 and '"revoked_at"' in p.stdout and nu not in p.stdout
          and keys[0][0] in p.stdout, "the revoked record's metadata stays for audit")
    for (u, blob, data, kid) in kept:
        for j in range(1, 4):
            check(c.unseal(c.talos(j), u, blob) == (OK, data),
                  f"kept key {kid.hex()[:8]} unseals to its bytes on node {j}")

    stop_all(c)
    left = copies(c, secrets)
    check(not left, f"no copy after a clean stop of every node (left: {left[:6]})")
    start_all(c)
    for (u, blob, data, kid) in kept:
        ok = False
        end = time.time() + 10
        while not ok and time.time() < end:
            ok = c.unseal(c.endpoints(), u, blob) == (OK, data)
        check(ok, f"after a full restart kept key {kid.hex()[:8]} unseals to its bytes")
    for (u, blob, data, kid) in revoked:
        rc, _ = c.unseal(c.endpoints(), u, blob)
        check(rc == PERMISSION_DENIED, f"after restart revoked {kid.hex()[:8]} stays refused")
    time.sleep(2)
    left = copies(c, secrets)
    check(not left, f"no copy after the restart either (left: {left[:6]})")

    # --- a node that is down during the revoke shreds when it comes back
    pid = c.pid(3)
    os.kill(pid, signal.SIGTERM)
    end = time.time() + 15
    while time.time() < end:
        try:
            os.kill(pid, 0)
            time.sleep(0.05)
        except ProcessLookupError:
            break
    os.unlink(os.path.join(c.dir, "node3", "kmsd.pid"))
    old_u, old_blob, old_data, old_kid = kept[0]  # node 3 holds this one on disk
    sec = find_secret(c, old_kid)
    late = [sec[0] + sec[1], sec[1]] if sec else []
    check(bool(copies(c, late)) and any(h[0] == 3 for h in copies(c, late)),
          "node 3 (down) still holds the key revoked next")
    ok = False
    end = time.time() + 10
    while not ok and time.time() < end:
        ok = c.ctl(1, "keys", "revoke", old_kid.hex()).returncode == 0
    check(ok, "revoke while node 3 is down")
    env = dict(c.env, KMSD_NO_UNSEAL="1")
    saved, c.env = c.env, env
    try:
        c.local("start-node", "3")
    finally:
        c.env = saved
    t0 = time.time()
    left = copies(c, late)
    while left and time.time() - t0 < SHRED_BOUND_S:
        time.sleep(0.25)
        left = copies(c, late)
    print(f"FIGURE node down during the revoke: {len(left)} copies left {time.time() - t0:.1f}s "
          "after it restarted (sealed)")
    check(not left, f"the restarted node shreds too, within {SHRED_BOUND_S:.0f}s (left: {left[:6]})")
    for (u, blob, data, kid) in kept[1:]:
        check(c.unseal(c.talos(1), u, blob) == (OK, data),
              f"kept key {kid.hex()[:8]} still unseals after the second revoke")


if __name__ == "__main__":
    main()
