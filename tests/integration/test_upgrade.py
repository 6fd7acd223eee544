#!/usr/bin/python3
"""Rolling upgrade from the previous release (a git tag) to this tree, under
a Talos-like load, on real kmsd processes (three nodes, raft, RocksDB, TLS).
Ports 31400-31439.

The previous release is built from the tag PREV_TAG (KMS_UPGRADE_FROM
overrides it): `git archive` of the tag into build/upgrade-prev/<commit>/src
(beside KMS_BUILD_DIR, shared by the release and asan trees), then only the
kmsd and kmsctl targets (Release, -j2) in .../bin. A finished build is
reused (marker file), so only the first run pays for it. Without the tag (a shallow clone, a tarball): fails under
CI=true, skipped (77) otherwise.

What it checks:
  upgrade   a cluster initialised on the old binaries; one replica at a
            time: stop (SIGTERM), swap binary, start, unseal, wait until it
            serves. Meanwhile unseals from 4 clients that know every endpoint
            (rotated, as DNS round robin) and seals through every endpoint:
            0 failed unseals, 0 wrong bytes; the mixed cluster keeps sealing;
            every acknowledged seal unseals at the end on every node.
  gate      the leader emits raft entry version 1 while any member runs the
            old release, 2 once the last one is upgraded; v2 entries are
            applied on every node (their stores record it).
  downgrade the old release started on a data dir that applied v2 entries
            refuses them (halts applying, names the version), and never
            serves a record sealed after the upgrade.
Each figure is printed as a FIGURE line.
"""
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import (Cluster, check, finish, port_open, BUILD, SRC, TALOS, OK, wait)  # noqa: E402

PREV_TAG = os.environ.get("KMS_UPGRADE_FROM", "v0.1.0")
# The commit v0.1.0 names. A clone made without tags (CI's is one) still
# holds the commit, since it is an ancestor of main; the tag is only a name.
PREV_COMMITS = {"v0.1.0": "1186fb3623c99d4229c94b60ea28d3ec4af97c0e"}
BASE = 31400
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(why):
    if CI:
        print(f"FAIL: {why} (CI=true: the upgrade test must run)", file=sys.stderr)
        sys.exit(1)
    print(f"SKIP: {why}")
    sys.exit(77)


def git(*args):
    return subprocess.run(["git", "-C", SRC, *args], capture_output=True, text=True)


def resolve_commit(name):
    p = git("rev-parse", "--verify", "-q", name + "^{commit}")
    return p.stdout.strip() if p.returncode == 0 else ""


def resolve_previous():
    """The commit of PREV_TAG: by the tag, else by its pinned hash, else
    after deepening a shallow clone from its origin."""
    names = [PREV_TAG] + ([PREV_COMMITS[PREV_TAG]] if PREV_TAG in PREV_COMMITS else [])
    for name in names:
        c = resolve_commit(name)
        if c:
            return c
    if git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        r = git("fetch", "-q", "--unshallow", "origin")
        print(f"NOTE: shallow clone; git fetch --unshallow origin: rc {r.returncode} "
              f"{r.stderr.strip()[:200]}")
        for name in names:
            c = resolve_commit(name)
            if c:
                return c
    shallow = git("rev-parse", "--is-shallow-repository").stdout.strip()
    count = git("rev-list", "--count", "HEAD").stdout.strip()
    skip_or_fail(f"previous release {PREV_TAG} ({' or '.join(names)}) not found in {SRC} "
                 f"(shallow: {shallow}, commits: {count}; fetch it: git fetch --tags)")
    return ""


def build_previous():
    """Returns the build dir of PREV_TAG (src/server/kmsd, src/cli/kmsctl)
    and its source dir (for its deploy/ scripts)."""
    commit = resolve_previous()
    # Beside the build dir, so the release and asan runs share one build.
    top = os.path.join(os.path.dirname(os.path.abspath(BUILD)), "upgrade-prev")
    root = os.path.join(top, commit)
    src, bld = os.path.join(root, "src"), os.path.join(root, "bin")
    done = os.path.join(root, "built")
    os.makedirs(top, exist_ok=True)
    lock = open(os.path.join(top, "lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; released at exit
    if os.path.exists(done):
        print(f"FIGURE previous release {PREV_TAG} ({commit[:12]}): cached build in {root}")
        return bld, src
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(src)
    t0 = time.time()
    arch = subprocess.Popen(["git", "-C", SRC, "archive", "--format=tar", commit],
                            stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", src], stdin=arch.stdout, capture_output=True)
    arch.stdout.close()
    if arch.wait() != 0 or tar.returncode != 0:
        print(tar.stderr.decode(errors="replace"), file=sys.stderr)
        check(False, f"git archive {PREV_TAG} extracted")
        finish()
    logf = os.path.join(root, "build.log")
    with open(logf, "w") as log:
        for cmd in (["cmake", "-S", src, "-B", bld, "-DCMAKE_BUILD_TYPE=Release"],
                    ["cmake", "--build", bld, "-j2", "--target", "kmsd", "kmsctl"]):
            r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
            if r.returncode != 0:
                with open(logf) as f:
                    sys.stderr.write(f.read()[-4000:])
                check(False, f"previous release {PREV_TAG} builds ({' '.join(cmd[:2])})")
                finish()
    with open(done, "w") as f:
        f.write(commit + "\n")
    print(f"FIGURE previous release {PREV_TAG} ({commit[:12]}) built in "
          f"{time.time() - t0:.0f}s (kmsd, kmsctl only; cached in {root})")
    return bld, src


class Load:
    """Unseal load (talosclient load, 3 s rounds, 4 rotated clients over
    every endpoint) and a seal loop over every endpoint, until stop()."""

    def __init__(self, c, blobs):
        self.c, self.blobs = c, blobs
        self.stop_ev = threading.Event()
        self.unseal = {"total": 0, "ok": 0, "failures": {}, "wrong": 0, "max_ms": 0.0}
        self.sealed, self.seal_fail = [], {}
        self.threads = [threading.Thread(target=self.unseal_loop),
                        threading.Thread(target=self.seal_loop)]

    def start(self):
        for t in self.threads:
            t.start()

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=60)

    def unseal_loop(self):
        c = self.c
        while not self.stop_ev.is_set():
            p = subprocess.run([TALOS, "load", "-ca", c.ca(), "-endpoints", c.endpoints(),
                                "-rotate", "-clients", "4", "-duration", "3s",
                                "-blobs", self.blobs], capture_output=True, text=True,
                               timeout=60)
            try:
                r = json.loads(p.stdout)
            except ValueError:
                self.unseal["failures"]["no-report"] = self.unseal["failures"].get(
                    "no-report", 0) + 1
                print(p.stdout, p.stderr, file=sys.stderr)
                continue
            self.unseal["total"] += r.get("total", 0)
            self.unseal["ok"] += r.get("ok", 0)
            self.unseal["wrong"] += r.get("wrong_bytes", 0)
            self.unseal["max_ms"] = max(self.unseal["max_ms"], r.get("max_latency_ms", 0))
            for k, v in (r.get("failures") or {}).items():
                self.unseal["failures"][k] = self.unseal["failures"].get(k, 0) + v

    def seal_loop(self):
        c = self.c
        while not self.stop_ev.is_set():
            u = str(uuidlib.uuid4())
            rc, b, d = c.seal(c.endpoints(), u)
            if rc == OK:
                self.sealed.append((u, b, d))
            else:
                self.seal_fail[rc] = self.seal_fail.get(rc, 0) + 1
            time.sleep(0.05)


def status_ok(c, i):
    return c.ctl(i, "status").returncode == 0


def leader_status(c):
    ld = c.wait_leader(timeout=15)
    return (ld, c.status(ld)) if ld else (None, None)


def main():
    if not os.path.exists(TALOS):
        skip_or_fail(f"talosclient not built at {TALOS}")
    old_bin, old_src = build_previous()
    new_bin = BUILD
    c = Cluster(nodes=3, base=BASE)
    # One host drives hundreds of seals a minute: not what this test measures.
    c.env["KMSD_RATE_LIMIT_SEALS_PER_MINUTE"] = "0"
    old_local = os.path.join(old_src, "deploy", "local-cluster.sh")
    new_local = os.path.join(SRC, "deploy", "local-cluster.sh")

    def local(script, bindir, *args, extra=None):
        env = dict(c.env, KMSD_BIN_DIR=bindir, **(extra or {}))
        p = subprocess.run([script, *args], env=env, capture_output=True, text=True,
                           timeout=120)
        if p.returncode != 0:
            print(p.stdout, p.stderr, file=sys.stderr)
        return p

    try:
        t0 = time.time()
        # The old release's own scripts and binaries make the old cluster.
        check(local(old_local, old_bin, "up", "--nodes", "3").returncode == 0,
              f"three nodes up on {PREV_TAG}")
        p = local(old_local, old_bin, "init")
        check(p.returncode == 0, f"cluster initialised and unsealed on {PREV_TAG}")
        with open(os.path.join(c.dir, "shares.txt")) as f:
            c.shares = [ln.strip() for ln in f if ln.strip()]
        old_version = (c.status(1) or {}).get("version")
        print(f"FIGURE old cluster up in {time.time() - t0:.1f}s, version {old_version}")
        check(wait(lambda: all(status_ok(c, i) for i in (1, 2, 3)), 20),
              "every old node serves")
        ld, st = leader_status(c)
        check(st is not None and not st.get("entry_version_supported"),
              f"the old leader advertises no entry version (got {st and st.get('entry_version_supported')})")

        sealed = []
        for _ in range(6):
            u = str(uuidlib.uuid4())
            rc, b, d = c.seal(c.endpoints(), u)
            if check(rc == OK, "seal on the old cluster"):
                sealed.append((u, b, d))
        blobs = os.path.join(c.dir, "blobs.jsonl")
        with open(blobs, "w") as f:
            for (u, b, d) in sealed:
                f.write(json.dumps({"uuid": u, "blob": b, "data": d}) + "\n")

        load = Load(c, blobs)
        load.start()
        time.sleep(2)
        # A follower first; leadership then moves to it (a new leader with
        # old followers), and the old leader goes last.
        ld = c.wait_leader() or 1
        order = [i for i in (1, 2, 3) if i != ld] + [ld]
        emitted = []
        t_up = time.time()
        for n, i in enumerate(order, 1):
            t1 = time.time()
            check(local(new_local, new_bin, "stop-node", str(i)).returncode == 0,
                  f"node {i} stopped")
            p = local(new_local, new_bin, "start-node", str(i))
            check(p.returncode == 0, f"node {i} started on the new binary and unsealed")
            serving = wait(lambda: status_ok(c, i), 20)
            check(serving, f"upgraded node {i} serves")
            st = c.status(i) or {}
            check(st.get("entry_version_supported") == 2,
                  f"upgraded node {i} reports entry version 2 supported")
            print(f"FIGURE node {i} upgraded ({n}/3) in {time.time() - t1:.1f}s, "
                  f"version {st.get('version')}")
            # Writes in the mixed (or fully upgraded) cluster, through every
            # endpoint, and what the leader stamps on them.
            ok = 0
            for _ in range(3):
                rc, b, d = c.seal(c.endpoints(), str(uuidlib.uuid4()))
                ok += rc == OK
            check(ok == 3, f"seals commit after upgrading {n}/3 nodes ({ok}/3)")
            ld, lst = leader_status(c)
            if n < 3 and not (lst or {}).get("entry_version_supported"):
                # An old leader: hand leadership to an upgraded node (the
                # new leader then has old followers), through any replica.
                p = c.ctl(i, "operator", "members", "transfer-leader", "--id", str(i))
                check(p.returncode == 0, f"transfer-leader to upgraded node {i} "
                      f"(old leader {ld}): {p.stderr.strip()[:120]}")
                wait(lambda: c.leader() == i, 10)
                rc, b, d = c.seal(c.endpoints(), str(uuidlib.uuid4()))
                check(rc == OK, f"seal under new leader {i} with old followers")
                ld, lst = leader_status(c)
            ev = (lst or {}).get("entry_version_emitting")
            if n == 3:
                # The last member's stamps arrive within a heartbeat or two.
                def emits2():
                    _, s = leader_status(c)
                    return s and s.get("entry_version_emitting") == 2
                wait(emits2, 10)
                ld, lst = leader_status(c)
                ev = (lst or {}).get("entry_version_emitting")
            emitted.append((n, ld, ev))
            print(f"FIGURE after {n}/3 upgraded: leader {ld} "
                  f"(version {(lst or {}).get('version')}) emits entry version {ev}")
            if n < 3:
                check(ev == 1 and (lst or {}).get("entry_version_supported") == 2,
                      f"the upgraded leader {ld} emits entry version 1 while a member runs "
                      f"{PREV_TAG} (got {ev})")
                olds = [m["id"] for m in (lst or {}).get("members", [])
                        if m.get("entry_version", 0) < 2]
                check(len(olds) == 3 - n, f"the leader sees {3 - n} member(s) advertising no "
                      f"entry version 2: {olds}")
            else:
                check(ev == 2, f"leader emits entry version 2 once every member is upgraded (got {ev})")
        print(f"FIGURE rolling upgrade of 3 nodes under load: {time.time() - t_up:.1f}s")
        time.sleep(2)
        load.stop()
        u = load.unseal
        print(f"FIGURE unseals during the upgrade: {u['total']} total, {u['ok']} ok, "
              f"failures {u['failures']}, wrong bytes {u['wrong']}, max latency {u['max_ms']} ms")
        print(f"FIGURE seals during the upgrade: {len(load.sealed)} acknowledged, "
              f"failed {load.seal_fail}")
        check(u["total"] > 0 and u["ok"] == u["total"] and not u["failures"] and u["wrong"] == 0,
              "0 failed unseals during the rolling upgrade")
        check(len(load.sealed) > 0, "seals acknowledged during the rolling upgrade")

        # v2 entries: a few more writes, then every store has applied one.
        for _ in range(3):
            rc, b, d = c.seal(c.endpoints(), str(uuidlib.uuid4()))
        check(wait(lambda: all((c.status(i) or {}).get("entry_version_applied") == 2
                               for i in (1, 2, 3)), 10),
              "every node applied entry version 2 entries")

        # Every acknowledged seal unseals on every node: one talosclient load
        # -once per node unseals each of them exactly once, checking the bytes.
        everything = sealed + load.sealed
        allb = os.path.join(c.dir, "all-blobs.jsonl")
        with open(allb, "w") as f:
            for (uu, b, d) in everything:
                f.write(json.dumps({"uuid": uu, "blob": b, "data": d}) + "\n")
        lost = 0
        for i in (1, 2, 3):
            p = subprocess.run([TALOS, "load", "-ca", c.ca(), "-endpoints", c.talos(i),
                                "-clients", "4", "-once", "-blobs", allb],
                               capture_output=True, text=True, timeout=300)
            try:
                r = json.loads(p.stdout)
            except ValueError:
                r = {}
            bad = sum((r.get("failures") or {}).values())
            if bad or r.get("ok") != len(everything):
                print(f"  node {i}: {p.stdout[:600]} {p.stderr[:300]}", file=sys.stderr)
                lost += max(bad, len(everything) - r.get("ok", 0))
        print(f"FIGURE acknowledged seals checked: {len(everything)} on each of 3 nodes, "
              f"{lost} failed or wrong")
        check(lost == 0, "0 lost seals: every acknowledged seal unseals on every node")

        downgrade(c, old_bin, new_local)
    finally:
        c.down()
    finish()


def downgrade(c, old_bin, new_local):
    """Node 3 back on the old release, on a data dir that applied v2 entries."""
    ld = c.wait_leader() or 1
    victim = 3 if ld != 3 else 2
    env = dict(c.env, KMSD_BIN_DIR=old_bin)
    subprocess.run([new_local, "stop-node", str(victim)], env=env, capture_output=True,
                   timeout=60)
    log = os.path.join(c.dir, f"node{victim}", "kmsd.log")
    mark = os.path.getsize(log)
    subprocess.run([new_local, "start-node", str(victim)], env=dict(env, KMSD_NO_UNSEAL="1"),
                   capture_output=True, timeout=60)
    # A write after the downgrade: the leader still emits version 2.
    u = str(uuidlib.uuid4())
    rc, b, d = c.seal(",".join(c.talos(i) for i in (1, 2, 3) if i != victim), u)
    check(rc == OK, "the upgraded majority seals with one node downgraded")
    _, lst = leader_status(c)
    check(lst is not None and lst.get("entry_version_emitting") == 2,
          "the leader keeps emitting entry version 2 after a member was downgraded")
    for s in c.shares[:3]:
        c.ctl(victim, "operator", "unseal", s)

    def refused():
        with open(log, errors="replace") as f:
            f.seek(mark)
            tail = f.read()
        return "entry version 2 is not supported" in tail and tail
    tail = wait(refused, 20)
    line = ""
    if tail:
        line = next((ln for ln in tail.splitlines() if "entry version 2 is not supported" in ln), "")
    print(f"FIGURE downgraded node {victim} ({PREV_TAG}) says: {line[:400]}")
    check(bool(tail), f"{PREV_TAG} on a data dir with v2 entries refuses them, naming the version")
    rc, out = c.unseal(c.talos(victim), u, b) if b else (None, None)
    check(rc != OK, f"the downgraded node never serves a record of a v2 entry (rc={rc})")


if __name__ == "__main__":
    main()
