#!/usr/bin/python3
"""kmsd Jepsen runner.

  tests/jepsen/run.py --scenario NAME --seed N [--nodes 3|5] [--duration S] [--keep]
  tests/jepsen/run.py --list

Builds the topology (net.py), re-execs itself inside the client namespace,
bootstraps real kmsd nodes (init 5 shares / threshold 3, unseal each),
starts the workload (client.py, niced), runs the scenario's nemesis during
the fault window, heals, recovers every node, unseals every acked seal via
every node (final phase), lists the keys, and runs checker.py.

Output: RUN_DIR (default build/jepsen/<scenario>-n<nodes>-s<seed>) with
history.jsonl, nemesis.jsonl, final.jsonl, keys.json, result.json and the
node logs. Exit: 0 pass, 1 property violated, 2 harness error, 77 skipped
(the reason is printed). The run dir is removed on pass unless --keep.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import net  # noqa: E402
import cluster  # noqa: E402
import checker  # noqa: E402

PY = "/usr/bin/python3"
SKIP = 77


class Skip(Exception):
    pass


# ----------------------------------------------------------------- context
class Ctx:
    def __init__(self, args, run_dir):
        self.args = args
        self.dir = run_dir
        self.rng = random.Random(args.seed)
        self.n = args.nodes
        self.extra = {}          # scenario-specific figures
        self.checks = []         # (name, ok, detail) scenario-specific assertions
        self.helpers = []        # Popen of strace etc. we started
        self.nem = open(os.path.join(run_dir, "nemesis.jsonl"), "a", buffering=1)
        self.members = list(range(1, self.n + 1))
        self.n_ns = self.n + (1 if args.scenario == "membership" else 0)
        self.c = cluster.Cluster(run_dir, self.n_ns, self.members, election_ms=args.election_ms,
                                 log=self.log)
        self.final_nodes = None  # default: current members
        self.skewed = {}

    def log(self, kind, **kw):
        kw.update(t=time.monotonic_ns(), kind=kind)
        self.nem.write(json.dumps(kw) + "\n")
        print(f"  [{(time.monotonic_ns() - T0) / 1e9:7.2f}s] {kind} "
              f"{' '.join(f'{k}={v}' for k, v in kw.items() if k not in ('t', 'kind'))}", flush=True)

    def check(self, name, ok, detail=""):
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        self.log("check", name=name, ok=bool(ok), detail=detail)

    def sleep(self, s):
        time.sleep(max(0.0, s))

    def leader(self, among=None):
        return self.c.wait_leader(among or self.members, timeout=15)

    def window(self, phase):
        self.log("window", phase=phase)

    def restart(self, i, wrapper=(), env=None):
        """Start node i (if down) and unseal it; returns unseal time ns."""
        if i in self.skewed and env is None:
            env = self.skewed[i]
            wrapper = ()
        self.c.start(i, wrapper=wrapper, env=env)
        return self.c.unseal(i, timeout=60)


T0 = time.monotonic_ns()


# --------------------------------------------------------------- scenarios
# Each takes ctx and the fault-window length; it must leave no fault behind
# except what ctx.recover() undoes (heal, SIGCONT, restart of dead nodes).

def sc_baseline(x, win):
    x.window("start")
    x.sleep(win)
    x.window("end")


def _partition_loop(x, win, pick):
    x.window("start")
    end = time.monotonic() + win
    rounds = 0
    while time.monotonic() < end - 2 and rounds < 50:
        rounds += 1
        groups = pick()
        if groups:
            x.log("partition", groups=groups)
            net.partition(groups, x.n)
        x.sleep(min(x.rng.uniform(3, 6), end - time.monotonic()))
        net.heal()
        x.log("heal")
        x.sleep(min(x.rng.uniform(1, 2.5), max(0, end - time.monotonic())))
    x.window("end")


def sc_isolate_leader(x, win):
    def pick():
        l = x.c.leader(x.members) or x.rng.choice(x.members)
        return [[l], [m for m in x.members if m != l]]
    _partition_loop(x, win, pick)


def sc_isolate_follower(x, win):
    def pick():
        l = x.c.leader(x.members)
        fs = [m for m in x.members if m != l]
        f = x.rng.choice(fs)
        return [[f], [m for m in x.members if m != f]]
    _partition_loop(x, win, pick)


def sc_split(x, win):
    def pick():
        ms = x.members[:]
        x.rng.shuffle(ms)
        k = len(ms) // 2
        return [sorted(ms[:k]), sorted(ms[k:])]
    _partition_loop(x, win, pick)


def sc_leader_f1(x, win):
    if x.n != 5:
        raise Skip("leader-f1 needs --nodes 5")

    def pick():
        l = x.c.leader(x.members) or x.rng.choice(x.members)
        fs = [m for m in x.members if m != l]
        x.rng.shuffle(fs)
        return [sorted([l, fs[0]]), sorted(fs[1:])]
    _partition_loop(x, win, pick)


def sc_bridge(x, win):
    """Non-transitive: two sides that cannot talk, one node that sees both."""
    def pick():
        l = x.c.leader(x.members) or x.rng.choice(x.members)
        fs = [m for m in x.members if m != l]
        x.rng.shuffle(fs)
        mid = fs[0]
        rest = fs[1:]
        k = len(rest) // 2
        a = sorted([l] + rest[:k])
        b = sorted(rest[k:])
        x.log("bridge", bridge=mid)
        return [a, b]          # mid is in no group: connected to everyone
    _partition_loop(x, win, pick)


def sc_kill(x, win):
    x.window("start")
    end = time.monotonic() + win
    k = 0
    while time.monotonic() < end - 3 and k < 20:
        k += 1
        l = x.c.leader(x.members)
        v = l if (l and x.rng.random() < 0.5) else x.rng.choice(x.members)
        x.c.kill9(v)
        x.sleep(x.rng.uniform(0.5, 3))
        x.restart(v)
        x.sleep(x.rng.uniform(1, 3))
    x.window("end")


def sc_kill_all(x, win):
    """Every node SIGKILLed at once, restarted from its data dir."""
    x.window("start")
    end = time.monotonic() + win
    k = 0
    while time.monotonic() < end - 6 and k < 5:
        k += 1
        x.sleep(x.rng.uniform(1, 3))
        x.log("kill-all")
        for i in x.members:
            x.c.signal(i, signal.SIGKILL)
        for i in x.members:
            x.c._reap(i, 10)
        x.sleep(x.rng.uniform(0.2, 1.5))
        for i in x.members:
            x.c.start(i)
        for i in x.members:
            x.c.unseal(i, timeout=60)
    x.window("end")


def sc_powerloss(x, win):
    """Every node SIGKILLed at once; each store loses what RocksDB had not
    fsynced (synclog.so + powerloss.py, seeded torn tails); restart, unseal."""
    import powerloss
    x.window("start")
    end = time.monotonic() + win
    k = 0
    while time.monotonic() < end - 6 and k < 4:
        k += 1
        x.sleep(x.rng.uniform(1.5, 3.5))
        x.log("power-cut")
        for i in x.members:
            x.c.signal(i, signal.SIGKILL)
        for i in x.members:
            x.c._reap(i, 10)
        for i in x.members:
            cuts = powerloss.powerloss(x.c.data_dir(i), os.path.join(x.c.node_dir(i), "synclog.txt"),
                                       x.rng.randrange(1 << 30))
            x.log("powerloss", node=i, cut_files=len(cuts),
                  lost_bytes=sum(c["size"] - c["kept"] for c in cuts))
        for i in x.members:
            x.c.start(i)
        for i in x.members:
            x.c.unseal(i, timeout=60)
    x.window("end")


def sc_pause_leader(x, win):
    x.window("start")
    end = time.monotonic() + win
    k = 0
    et = x.args.election_ms / 1000
    while time.monotonic() < end - 2 and k < 20:
        k += 1
        l = x.c.leader(x.members)
        if not l:
            x.sleep(1)
            continue
        d = x.rng.uniform(1.5, 3.5) * et
        x.c.pause(l)
        x.log("paused", node=l, seconds=round(d, 2))
        x.sleep(d)
        x.c.resume(l)
        x.sleep(x.rng.uniform(2, 4))
    x.window("end")


def sc_loss(x, win):
    x.window("start")
    pct = x.rng.randint(20, 30)
    x.log("loss", percent=pct, nodes=x.members)
    net.loss(x.members, pct)
    x.sleep(win)
    net.heal()
    x.log("heal")
    x.window("end")


def _probe_serves(x, i, blob_entry, timeout=10):
    """Time from now until node i alone answers an Unseal OK."""
    import talos
    import base64
    cl = talos.Talos(os.path.join(x.c.pki, "ca.pem"), timeout=2)
    uuid, blob, data = blob_entry
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        code, out, _ = cl.call([f"{net.ip_of(i)}:4050"], talos.UNSEAL, uuid, base64.b64decode(blob))
        if code == "OK" and out.hex() == data:
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def _own_seal(x):
    """Seal one key of the harness's own (used to probe serving)."""
    import talos
    import base64
    cl = talos.Talos(os.path.join(x.c.pki, "ca.pem"))
    data = os.urandom(32)
    uuid = f"jp-probe-{x.args.seed}"
    eps = [f"{net.ip_of(i)}:4050" for i in x.members]
    for _ in range(20):
        code, out, _ = cl.call(eps, talos.SEAL, uuid, data)
        if code == "OK":
            x.probe_uuids.add(uuid)
            return (uuid, base64.b64encode(out).decode(), data.hex())
        time.sleep(0.5)
    raise RuntimeError("could not seal the probe key")


def sc_rolling_restart(x, win):
    probe = _own_seal(x)
    x.window("start")
    l = x.c.leader(x.members)
    order = [m for m in x.members if m != l] + [l]
    serve = {}
    for i in order:
        x.c.stop(i)
        x.sleep(0.5)
        t_unsealed = x.restart(i)
        lag = (time.monotonic_ns() - t_unsealed) / 1e9
        s = _probe_serves(x, i, probe)
        serve[i] = None if s is None else round(s + lag, 3)
        x.log("serving", node=i, seconds_after_unseal=serve[i])
        x.sleep(1.0)
    x.window("end")
    x.extra["serve_after_unseal_s"] = serve
    worst = max((v if v is not None else 99) for v in serve.values())
    x.extra["serve_after_unseal_max_s"] = worst
    x.check("every replica serves Talos within 2 s of being unsealed", worst <= 2.0,
            f"max {worst} s: {serve}")
    x.want_zero_failed_unseals = True


def sc_membership(x, win):
    """Add node N+1 and remove a node, during a lossy network and an isolated follower."""
    new = x.n + 1
    x.c.write_config(new, initial=False)
    x.window("start")
    l = x.c.leader(x.members)
    fs = [m for m in x.members if m != l]
    iso = x.rng.choice(fs)
    net.loss([m for m in x.members if m != iso], 10)
    net.partition([[iso], [m for m in x.members if m != iso] + [new]], x.n_ns)
    x.log("faults", loss_percent=10, isolated=iso)
    x.c.start(new)
    x.c.wait_api(new)
    added = False
    end = time.monotonic() + 30
    while not added and time.monotonic() < end:
        tgt = x.rng.choice([m for m in x.members if m != iso])
        x.log("members-add", node=new, via=tgt)
        p = x.c.ctl(tgt, "operator", "members", "add", "--id", str(new), "--raft-address",
                    f"{net.ip_of(new)}:4052", "--cluster-address", f"{net.ip_of(new)}:4051",
                    "--talos-address", f"{net.ip_of(new)}:4050", "-o", "json", timeout=20)
        x.log("members-add-result", rc=p.returncode, err=p.stderr.strip()[-160:])
        x.extra.setdefault("member_cmds", []).append(
            {"cmd": f"add {new}", "via": tgt, "rc": p.returncode, "err": p.stderr.strip()[-120:]})
        added = p.returncode == 0
        if not added:
            x.sleep(1)
    x.check("members add during faults succeeds", added)
    if added:
        x.members.append(new)
        x.c.unseal(new, timeout=60)
    x.sleep(2)
    # remove the isolated follower while it is cut off
    removed = False
    end = time.monotonic() + 30
    while not removed and time.monotonic() < end:
        tgt = x.rng.choice([m for m in x.members if m != iso])
        x.log("members-remove", node=iso, via=tgt)
        p = x.c.ctl(tgt, "operator", "members", "remove", "--id", str(iso), "-o", "json", timeout=20)
        x.log("members-remove-result", rc=p.returncode, err=p.stderr.strip()[-160:])
        x.extra.setdefault("member_cmds", []).append(
            {"cmd": f"remove {iso}", "via": tgt, "rc": p.returncode, "err": p.stderr.strip()[-120:]})
        removed = p.returncode == 0
        if not removed:
            x.sleep(1)
    x.check("members remove during faults succeeds", removed)
    if removed:
        x.members.remove(iso)
    x.sleep(max(1, win - 8))
    net.heal()
    x.log("heal")
    if removed:
        x.c.stop(iso)
        x.removed = iso
    x.window("end")
    x.sleep(2)
    p = x.c.ctl(x.members[0], "operator", "members", "list", "-o", "json")
    try:
        ids = sorted(m["id"] for m in json.loads(p.stdout)["members"])
    except (ValueError, KeyError):
        ids = None
    x.extra["members_after"] = ids
    x.check("member list after the change", ids == sorted(x.members), f"{ids} vs {sorted(x.members)}")


def sc_clock_skew(x, win):
    """Leader's CLOCK_MONOTONIC runs slow (its lease lasts longer in real
    time), one follower's runs fast (it times out early); the leader is then
    isolated repeatedly while revocations continue."""
    so = os.path.join(x.dir, "..", "clockrate.so")
    slow, fast = x.args.clock_slow, x.args.clock_fast
    l = x.c.leader(x.members)
    f = x.rng.choice([m for m in x.members if m != l])
    for node, rate in ((l, slow), (f, fast)):
        x.skewed[node] = {"LD_PRELOAD": os.path.abspath(so), "JP_CLOCK_RATE": str(rate)}
        x.c.stop(node)
        x.restart(node)
        x.log("clock-rate", node=node, rate=rate)
    x.extra["clock"] = {str(l): slow, str(f): fast}
    # make the slow node the leader
    for _ in range(5):
        cur = x.c.leader(x.members)
        if cur == l:
            break
        x.c.ctl(cur, "operator", "members", "transfer-leader", "--id", str(l), "-o", "json")
        x.sleep(1.5)
    x.log("leader", node=x.c.leader(x.members), slow=l)

    def pick():
        cur = x.c.leader(x.members) or l
        return [[cur], [m for m in x.members if m != cur]]
    _partition_loop(x, win, pick)


def _strace_attach(x, node, spec):
    pids = [p for p in x.c.kmsd_pids(node)]
    if not pids:
        return None
    cmd = ["strace", "-f", "-qq", "-o", os.path.join(x.dir, f"strace-n{node}.txt"),
           "-e", "trace=fsync,fdatasync,io_submit,pwrite64,pwritev2,write",
           *sum((["-e", s] for s in spec), []), "-p", str(pids[0])]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    x.helpers.append(p)
    x.sleep(0.5)
    return p


def sc_disk_eio(x, win):
    """The leader's fsync/fdatasync and raft's AIO writes (io_submit) fail
    with EIO: it must crash or refuse, never ack; the cluster must go on."""
    x.window("start")
    x.sleep(1)
    l = x.c.leader(x.members)
    x.log("disk-eio", node=l, calls="fsync,fdatasync,io_submit")
    p = _strace_attach(x, l, ["inject=fsync,fdatasync,io_submit:error=EIO:when=1+"])
    end = time.monotonic() + win - 2
    while time.monotonic() < end and x.c.running(l):
        x.sleep(0.2)
    crashed = not x.c.running(l)
    x.log("disk-eio-state", node=l, crashed=crashed, rc=x.c.exit_code(l))
    x.sleep(max(0, end - time.monotonic()))
    if p and p.poll() is None:
        p.send_signal(signal.SIGINT)       # detach
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    x.extra["eio_node_crashed"] = crashed
    x.extra["eio_node_rc"] = x.c.exit_code(l)
    st = x.c.status(l) if not crashed else None
    x.extra["eio_node_status"] = st and {k: st.get(k) for k in ("role", "lease", "sealed", "applied_index")}
    x.window("end")
    # a node that survived EIO keeps running (checked in the final phase);
    # a crashed node is restarted by recover().


def sc_enospc(x, win):
    """One follower's dataDir is a small loop-mounted ext4 that is filled."""
    mnt = x.loop_mnt
    if not mnt:
        raise Skip("loop device unavailable")
    victim = x.loop_node
    x.window("start")
    x.sleep(1)
    filler = os.path.join(mnt, "filler")
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "status=none"],
                   capture_output=True)
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}2", "bs=4k", "status=none"],
                   capture_output=True)
    df = subprocess.run(["df", "-k", mnt], capture_output=True, text=True).stdout.split("\n")[1]
    x.log("enospc", node=victim, df=df)
    # make the victim the leader for part of the window if it is alive
    x.sleep(win / 3)
    if x.c.running(victim):
        cur = x.c.leader(x.members)
        if cur and cur != victim:
            x.c.ctl(cur, "operator", "members", "transfer-leader", "--id", str(victim), "-o", "json")
            x.log("transfer-leader", to=victim)
    x.sleep(win / 3)
    crashed = not x.c.running(victim)
    # raft segments and the RocksDB WAL are preallocated, so a running node
    # may not hit ENOSPC within the window: also restart it on the full disk
    x.c.kill9(victim)
    x.c.start(victim)
    try:
        x.c.unseal(victim, timeout=8)
        unsealed = True
    except RuntimeError:
        unsealed = False
    x.sleep(2)
    x.extra["enospc_restart"] = {"running": x.c.running(victim), "rc": x.c.exit_code(victim),
                                 "unsealed": unsealed, "talos_open": x.c.talos_open(victim)}
    x.log("enospc-restart", **x.extra["enospc_restart"])
    x.sleep(max(0, win / 3 - 3))
    x.extra["enospc_node_crashed"] = crashed
    x.extra["enospc_node_rc"] = x.c.exit_code(victim)
    for f in (filler, filler + "2"):
        try:
            os.unlink(f)
        except OSError:
            pass
    x.log("enospc-end", node=victim, crashed=crashed)
    x.window("end")


def sc_mixed(x, win):
    """A seeded random mix: partitions (any graph), kills, pauses, loss."""
    x.window("start")
    end = time.monotonic() + win
    k = 0
    et = x.args.election_ms / 1000
    while time.monotonic() < end - 3 and k < 30:
        k += 1
        kind = x.rng.choice(["isolate", "split", "bridge", "kill", "pause", "loss"])
        l = x.c.leader(x.members) or x.rng.choice(x.members)
        ms = x.members[:]
        x.rng.shuffle(ms)
        if kind == "isolate":
            net.partition([[l], [m for m in x.members if m != l]], x.n)
        elif kind == "split":
            h = len(ms) // 2
            net.partition([sorted(ms[:h]), sorted(ms[h:])], x.n)
        elif kind == "bridge":
            rest = [m for m in ms[1:]]
            h = len(rest) // 2
            net.partition([sorted(rest[:h]), sorted(rest[h:])], x.n)
        elif kind == "loss":
            net.loss(x.members, x.rng.randint(20, 30))
        x.log("mixed", fault=kind, leader=l, order=ms)
        if kind == "kill":
            x.c.kill9(ms[0])
            x.sleep(x.rng.uniform(0.5, 2))
            x.restart(ms[0])
        elif kind == "pause":
            x.c.pause(l)
            x.sleep(x.rng.uniform(1.5, 3) * et)
            x.c.resume(l)
        else:
            x.sleep(x.rng.uniform(2, 5))
        net.heal()
        x.log("heal")
        x.sleep(x.rng.uniform(1, 2))
    x.window("end")


SCENARIOS = {
    # name: (function, default nodes, default window seconds)
    "baseline": (sc_baseline, 3, 8),
    "isolate-leader": (sc_isolate_leader, 3, 15),
    "isolate-follower": (sc_isolate_follower, 3, 12),
    "split": (sc_split, 5, 15),
    "leader-f1": (sc_leader_f1, 5, 15),
    "bridge": (sc_bridge, 5, 15),
    "kill": (sc_kill, 3, 15),
    "kill-all": (sc_kill_all, 3, 15),
    "powerloss": (sc_powerloss, 3, 15),
    "pause-leader": (sc_pause_leader, 3, 15),
    "loss": (sc_loss, 3, 12),
    "rolling-restart": (sc_rolling_restart, 3, 0),
    "membership": (sc_membership, 3, 14),
    "clock-skew": (sc_clock_skew, 3, 15),
    "disk-eio": (sc_disk_eio, 3, 10),
    "enospc": (sc_enospc, 3, 12),
    "mixed": (sc_mixed, 5, 25),
}


# ------------------------------------------------------------ final phase
def last_log_line(x, i):
    try:
        with open(os.path.join(x.c.node_dir(i), "kmsd.log"), errors="replace") as f:
            lines = [l.strip() for l in f if l.strip()]
        return lines[-1][:300] if lines else ""
    except OSError:
        return ""


def recover(x):
    """Heal everything, restart dead nodes, wait until every member serves."""
    net.heal()
    for i in x.c.procs:
        x.c.resume(i)
    for p in x.helpers:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    t_heal = time.monotonic()
    x.log("recover-start")
    for i in x.members:
        if not x.c.running(i):
            for attempt in range(3):
                x.log("restart-dead", node=i, rc=x.c.exit_code(i), attempt=attempt)
                try:
                    x.restart(i)
                    break
                except RuntimeError as e:
                    x.log("restart-failed", node=i, error=str(e), rc=x.c.exit_code(i))
                    x.c.kill9(i)
                    time.sleep(2)
            else:
                raise cluster.NoService(f"node {i} does not start after the fault was removed "
                                        f"(rc {x.c.exit_code(i)}): {last_log_line(x, i)}")
    for i in x.members:
        st = x.c.status(i)
        if st and st.get("sealed"):
            x.c.unseal(i, timeout=60)
    end = time.monotonic() + 40
    pending = set(x.members)
    while pending and time.monotonic() < end:
        for i in list(pending):
            if x.c.talos_open(i):
                pending.discard(i)
        time.sleep(0.1)
    for i in list(pending):
        # one more chance: a node stuck after a disk fault is restarted
        x.log("restart-stuck", node=i)
        x.c.kill9(i)
        x.restart(i)
        e2 = time.monotonic() + 20
        while not x.c.talos_open(i) and time.monotonic() < e2:
            time.sleep(0.1)
        if x.c.talos_open(i):
            pending.discard(i)
    x.extra["recovery_s"] = round(time.monotonic() - t_heal, 2)
    if pending:
        raise cluster.NoService(f"nodes {sorted(pending)} never served Talos after heal")
    # wait for replicas to catch up with the leader's commit index
    l = x.c.wait_leader(x.members, timeout=20)
    if not l:
        raise RuntimeError("no leader after heal")
    lst = x.c.status(l)
    target = lst.get("commit_index", 0) if lst else 0
    end = time.monotonic() + 20
    while time.monotonic() < end:
        behind = [i for i in x.members
                  if (x.c.status(i) or {}).get("applied_index", 0) < target]
        if not behind:
            break
        time.sleep(0.3)
    x.extra["caught_up_s"] = round(time.monotonic() - t_heal, 2)
    x.log("recovered", seconds=x.extra["caught_up_s"])


def final_phase(x, hist_path):
    import grpc
    import talos
    import base64
    ops = checker.pair_ops(checker.load_jsonl(hist_path))
    seals = [op for op in ops if op["f"] == "seal" and op["type"] == "ok"]
    out = open(os.path.join(x.dir, "final.jsonl"), "w", buffering=1)
    lock = threading.Lock()
    with open(os.path.join(x.c.pki, "ca.pem"), "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    nodes = x.final_nodes or x.members

    def emit(**e):
        e["t"] = time.monotonic_ns()
        with lock:
            out.write(json.dumps(e) + "\n")

    def per_node(n):
        ch = grpc.secure_channel(f"{net.ip_of(n)}:4050", creds,
                                 options=[("grpc.ssl_target_name_override", "localhost"),
                                          ("grpc.enable_retries", 0)])
        fn = ch.unary_unary(talos.UNSEAL)
        pid = 1000 + n
        deadline = time.monotonic() + 90
        for s in seals:
            raw = base64.b64decode(s["blob"])
            for attempt in range(6):
                emit(type="invoke", f="final", process=pid, node=n, key_id=s["key_id"], uuid=s["uuid"])
                try:
                    r = fn(talos.encode_request(s["uuid"], raw), timeout=5)
                    emit(type="ok", f="final", process=pid, node=n, key_id=s["key_id"],
                         code="OK", data=talos.decode_response(r).hex())
                    break
                except grpc.RpcError as e:
                    code = e.code().name
                    if code in talos.DEFINITE:
                        emit(type="ok", f="final", process=pid, node=n, key_id=s["key_id"], code=code)
                        break
                    emit(type="info", f="final", process=pid, node=n, key_id=s["key_id"], code=code,
                         detail=(e.details() or "")[:120])
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                    ch.close()
                    ch = grpc.secure_channel(f"{net.ip_of(n)}:4050", creds,
                                             options=[("grpc.ssl_target_name_override", "localhost")])
                    fn = ch.unary_unary(talos.UNSEAL)
        ch.close()

    t0 = time.monotonic()
    ts = [threading.Thread(target=per_node, args=(n,)) for n in nodes]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.close()
    x.extra["final_s"] = round(time.monotonic() - t0, 2)
    # keys list, for duplicates and missing records
    for n in nodes:
        p = x.c.ctl(n, "keys", "list", "-o", "json", timeout=30)
        if p.returncode == 0:
            try:
                keys = json.loads(p.stdout)
            except ValueError:
                continue
            keys["keys"] = [k for k in keys.get("keys", []) if k.get("node_uuid") not in x.probe_uuids]
            with open(os.path.join(x.dir, "keys.json"), "w") as f:
                json.dump(keys, f)
            return
    x.log("keys-list-failed")


# ------------------------------------------------------------------- inner
def status_poller(x, stop):
    """Every 0.5 s: each node's kmsctl status -> status.jsonl (role, term,
    leader, commit/applied index, lease), for split-brain checks and for
    explaining a violation."""
    out = open(os.path.join(x.dir, "status.jsonl"), "a", buffering=1)
    n = 0
    while not stop.is_set() and n < 100000:
        n += 1
        for i in range(1, x.n_ns + 1):
            if stop.is_set() or i not in x.c.procs or not x.c.running(i):
                continue
            t = time.monotonic_ns()
            st = x.c.status(i, timeout=2)
            if st:
                out.write(json.dumps({"t": t, "t_done": time.monotonic_ns(), "node": i,
                                      **{k: st.get(k) for k in ("role", "term", "leader_id",
                                                                "commit_index", "applied_index",
                                                                "lease", "sealed")}}) + "\n")
        stop.wait(0.5)
    out.close()


def inner(args):
    run_dir = args.run_dir
    x = Ctx(args, run_dir)
    x.probe_uuids = set()
    x.want_zero_failed_unseals = False
    x.loop_mnt = None
    x.removed = None
    fn, _, default_win = SCENARIOS[args.scenario]
    win = args.duration if args.duration is not None else default_win
    result = {"scenario": args.scenario, "seed": args.seed, "nodes": args.nodes,
              "window_s": win, "election_ms": args.election_ms,
              "lease_bound_ms": args.lease_bound_ms}
    client = None
    try:
        if args.scenario == "leader-f1" and args.nodes != 5:
            raise Skip("leader-f1 needs --nodes 5")
        if args.scenario == "powerloss":
            so = os.path.abspath(os.path.join(run_dir, "..", "synclog.so"))
            for i in x.members:
                x.c.node_env[i] = {"LD_PRELOAD": so,
                                   "JP_SYNC_LOG": os.path.join(x.c.node_dir(i), "synclog.txt")}
        if args.scenario == "enospc":
            x.loop_node = 1 + (args.seed % args.nodes)
            x.loop_mnt = args.loop_mnt or None
            if not x.loop_mnt:
                raise Skip("no loop mount prepared")
            x.c.data_override[x.loop_node] = os.path.join(x.loop_mnt, "data")
        try:
            x.c.bootstrap()
        except cluster.NoService as e:
            # kmsd came up and unsealed but never served Talos: a liveness
            # failure of kmsd, not of the harness
            x.check("every node serves Talos within 20 s of being unsealed", False, str(e))
            raise
        x.log("bootstrapped", leader=x.c.leader(x.members))
        poll_stop = threading.Event()
        poller = threading.Thread(target=status_poller, args=(x, poll_stop), daemon=True)
        poller.start()
        hist = os.path.join(run_dir, "history.jsonl")
        eps = ",".join(f"{net.ip_of(i)}:4050" for i in range(1, x.n_ns + 1))
        ops_nodes = ",".join(net.ip_of(i) for i in range(1, x.n_ns + 1))
        stop_file = os.path.join(run_dir, "client.stop")
        warm, rec = args.warmup, args.recovery
        dur = warm + max(win, 1) + rec + (60 if args.scenario == "rolling-restart" else 0) + \
            (25 if args.scenario in ("clock-skew", "membership") else 0)
        clog = open(os.path.join(run_dir, "client.log"), "w")
        client = subprocess.Popen(
            ["nice", "-n", "10", PY, os.path.join(HERE, "client.py"), "--history", hist,
             "--endpoints", eps, "--operator-nodes", ops_nodes,
             "--ca", os.path.join(x.c.pki, "ca.pem"), "--pki", x.c.pki, "--kmsctl", cluster.KMSCTL,
             "--seed", str(args.seed), "--duration", str(dur), "--workers", str(args.workers),
             "--rate", str(args.rate), "--stop-file", stop_file,
             "--revoke-every", str(args.revoke_every), "--rotate-every", str(args.rotate_every)],
            stdout=clog, stderr=subprocess.STDOUT)
        x.log("client-start", pid=client.pid, duration=dur)
        x.sleep(warm)
        fn(x, win)
        recover(x)
        x.sleep(rec)
        open(stop_file, "w").close()
        try:
            client.wait(timeout=40)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
        x.log("client-end", rc=client.returncode)
        if client.returncode != 0:
            raise RuntimeError(f"client exited {client.returncode} (see client.log)")
        # nodes must still be serving after the recovery window
        recover(x)
        poll_stop.set()
        final_phase(x, hist)
        r = checker.check_dir(run_dir, args.lease_bound_ms)
        result.update(r)
        if r["final_unverified"]:
            x.check("final phase answered for every (seal, node)", False,
                    f"{r['final_unverified']} unanswered: {r['final_unverified_sample'][:3]}")
        if r["acked_seals"] == 0:
            x.check("at least one acked seal", False)
        if x.want_zero_failed_unseals:
            x.check("0 failed unseals for a multi-endpoint client", r["failed_unseals"] == 0,
                    f"{r['failed_unseals']}: {r['failed_unseal_codes']}")
        result["extra"] = x.extra
        result["checks"] = x.checks
        failed_checks = [c for c in x.checks if not c["ok"]]
        result["status"] = "pass" if r["valid"] and not failed_checks else "fail"
        rc = 0 if result["status"] == "pass" else 1
    except cluster.NoService as e:
        st = {i: x.c.status(i) for i in x.members}
        result.update(status="fail", error=str(e), checks=x.checks, extra=x.extra,
                      counts={}, status_at_failure={i: s and {k: s.get(k) for k in (
                          "role", "term", "lease", "sealed", "applied_index")} for i, s in st.items()})
        rc = 1
    except Skip as e:
        result.update(status="skip", reason=str(e))
        rc = SKIP
    except Exception as e:  # noqa: BLE001
        result.update(status="error", error=f"{type(e).__name__}: {e}",
                      trace=traceback.format_exc(), extra=x.extra, checks=x.checks)
        rc = 2
    finally:
        if client and client.poll() is None:
            client.kill()
            client.wait()
        for p in x.helpers:
            if p.poll() is None:
                p.kill()
                p.wait()
        x.c.stop_all()
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return rc


# ------------------------------------------------------------------- outer
def build_tools(out):
    os.makedirs(out, exist_ok=True)
    for name in ("clockrate", "synclog"):
        so = os.path.join(out, f"{name}.so")
        src = os.path.join(HERE, f"{name}.c")
        if not os.path.exists(so) or os.path.getmtime(so) < os.path.getmtime(src):
            subprocess.run(["gcc", "-O2", "-Wall", "-Wno-nonnull-compare", "-shared", "-fPIC", "-o",
                            so, src, "-ldl", "-lpthread"], check=True)


def summary_line(res):
    c = res.get("counts", {})
    return (f"{res['scenario']} n={res['nodes']} seed={res['seed']}: {res['status'].upper()} "
            f"ops={res.get('ops')} acked={res.get('acked_seals')} lost={c.get('lost_seals')} "
            f"wrong={c.get('wrong_unseals')} stale={c.get('stale_revoked')} dup={c.get('duplicates')} "
            f"denied={c.get('spurious_denied')} false_fail={c.get('false_failures')} avail={res.get('availability')}% "
            f"gap={res.get('seal_gap_s')}s failed_unseals={res.get('failed_unseals')}")


def setup_loop(run_dir):
    img = os.path.join(run_dir, "enospc.img")
    mnt = os.path.join(run_dir, "enospc-mnt")
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["truncate", "-s", "320M", img], check=True)
    loop = subprocess.run(["losetup", "-f", "--show", img], capture_output=True, text=True)
    if loop.returncode != 0:
        return None, None
    dev = loop.stdout.strip()
    subprocess.run(["mkfs.ext4", "-q", dev], check=True, capture_output=True)
    subprocess.run(["mount", dev, mnt], check=True)
    return dev, mnt


def outer(args):
    if os.geteuid() != 0:
        print("SKIP: needs root (network namespaces, nftables)")
        return SKIP
    for tool in ("nft", "ip", "strace"):
        if not shutil.which(tool):
            print(f"SKIP: {tool} not installed")
            return SKIP
    for b in (cluster.KMSD, cluster.KMSCTL):
        if not os.path.exists(b):
            print(f"harness error: {b} not built")
            return 2
    base = args.out or os.path.join(cluster.SRC, "build", "jepsen")
    run_dir = os.path.join(base, f"{args.scenario}-n{args.nodes}-s{args.seed}")
    if os.path.isdir(run_dir):
        # never destroy the evidence of an earlier failing run
        try:
            with open(os.path.join(run_dir, "result.json")) as f:
                old_status = json.load(f).get("status")
        except (OSError, ValueError):
            old_status = None
        if old_status in (None, "pass", "skip"):
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            os.rename(run_dir, f"{run_dir}.{old_status}-{int(time.time())}")
    os.makedirs(run_dir)
    build_tools(base)
    n_ns = args.nodes + 1
    loop_dev = loop_mnt = None
    print(f"=== {args.scenario} nodes={args.nodes} seed={args.seed} dir={run_dir}", flush=True)
    t0 = time.time()
    rc = 2
    try:
        net.up(n_ns)
        if args.scenario == "enospc":
            loop_dev, loop_mnt = setup_loop(run_dir)
        cmd = ["ip", "netns", "exec", net.CL, PY, os.path.abspath(__file__), "--inner",
               "--run-dir", run_dir] + args.passthrough
        if loop_mnt:
            cmd += ["--loop-mnt", loop_mnt]
        p = subprocess.Popen(cmd)
        try:
            rc = p.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            print(f"harness error: run exceeded {args.timeout}s")
            rc = 2
    except KeyboardInterrupt:
        rc = 2
    finally:
        net.down(n_ns + 1)
        if loop_mnt:
            subprocess.run(["umount", "-l", loop_mnt], capture_output=True)
        if loop_dev:
            subprocess.run(["losetup", "-d", loop_dev], capture_output=True)
    res_path = os.path.join(run_dir, "result.json")
    res = {}
    if os.path.exists(res_path):
        with open(res_path) as f:
            res = json.load(f)
        res["wall_s"] = round(time.time() - t0, 1)
        with open(res_path, "w") as f:
            json.dump(res, f, indent=1)
    if res:
        # also outside the run dir, which is removed on pass
        with open(os.path.join(base, f"{args.scenario}-n{args.nodes}-s{args.seed}.result.json"), "w") as f:
            json.dump(res, f, indent=1)
    st = res.get("status")
    pt = [a for a in args.passthrough if a != "--keep"]
    if "--seed" not in pt:
        pt += ["--seed", str(args.seed)]
    repro = "tests/jepsen/run.py " + " ".join(pt)
    if st == "skip":
        print(f"SKIP {args.scenario}: {res.get('reason')}")
    elif st in ("pass", "fail"):
        print(summary_line(res) + f" wall={res['wall_s']}s")
        if res.get("error"):
            print(f"  kmsd failure: {res['error']}; node status: {json.dumps(res.get('status_at_failure'))}")
        for c in res.get("checks", []):
            if not c["ok"]:
                print(f"  check FAILED: {c['name']}: {c['detail']}")
        for k, lst in res.get("violations", {}).items():
            for item in lst[:3]:
                print(f"  VIOLATION {k}: {json.dumps(item)[:400]}")
    else:
        print(f"ERROR {args.scenario}: {res.get('error', 'no result (harness crashed)')}")
        if res.get("trace"):
            print(res["trace"])
    if st != "pass" or args.keep:
        print(f"kept: {run_dir}\nreproduce: {repro}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"pass": 0, "fail": 1, "skip": SKIP}.get(st, 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--nodes", type=int, choices=(3, 5))
    ap.add_argument("--duration", type=float, help="fault window seconds (default per scenario)")
    ap.add_argument("--keep", action="store_true", help="keep the run dir on pass too")
    ap.add_argument("--out", help="base dir for run dirs (default build/jepsen)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--election-ms", type=int, default=1000)
    ap.add_argument("--lease-bound-ms", type=float, default=None,
                    help="revocation staleness bound (default: the election timeout)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rate", type=float, default=60, help="Talos ops/s, all workers")
    ap.add_argument("--revoke-every", type=float, default=1.5)
    ap.add_argument("--rotate-every", type=float, default=6)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--recovery", type=float, default=4)
    ap.add_argument("--clock-slow", type=float, default=0.98)
    ap.add_argument("--clock-fast", type=float, default=1.02)
    ap.add_argument("--timeout", type=float, default=420, help="hard limit per run, seconds")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--loop-mnt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.list:
        for k, (_, n, w) in SCENARIOS.items():
            print(f"{k:18s} nodes={n} window={w}s")
        return 0
    if not args.scenario or args.scenario not in SCENARIOS:
        ap.error(f"--scenario is one of: {', '.join(SCENARIOS)}")
    if args.nodes is None:
        args.nodes = SCENARIOS[args.scenario][1]
    if args.lease_bound_ms is None:
        args.lease_bound_ms = args.election_ms
    if args.inner:
        return inner(args)
    args.passthrough = [a for a in sys.argv[1:] if a not in ("--keep",)]
    if "--nodes" not in args.passthrough:
        args.passthrough += ["--nodes", str(args.nodes)]
    return outer(args)


if __name__ == "__main__":
    sys.exit(main())
