#!/usr/bin/python3
"""Memory and file hygiene of a real kmsd (ports 29600-29609, one node):

- no unseal share ever appears in any /proc/*/cmdline while
  deploy/local-cluster.sh initialises and unseals (polled, with a positive
  control that proves the poller sees short-lived processes);
- dataDir is 0700 and nothing under it is accessible to group or others
  (local-cluster.sh creates it 0755: kmsd fixes it and says so);
- mlockall is on: VmLck in /proc/PID/status is non-zero;
- an unknown KMSD_* variable is warned about (daemon log, --check-config);
- Seal and Unseal with a 4,000-character node UUID get INVALID_ARGUMENT, a
  UUID full of JSON syntax is accepted and logged, and every line of the log
  parses as JSON;
- with talos.tls12 on, the Talos port accepts TLS 1.2 but the cluster API
  refuses it (openssl s_client -tls1_2 with a valid client certificate);
- SIGHUP reloads the operator CA bundle: a client certificate from a new CA
  is refused before and accepted after; a broken CA file is reported (log,
  kmsd_tls_reload_failed metric) and the old CAs keep working.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import (Cluster, INVALID_ARGUMENT, OK, KMSCTL, check, finish,  # noqa: E402
                    port_open, SRC)

BASE = 29600
SHARE_RE = re.compile(rb"kms1-[0-9]{3}-[0-9a-f]{8,}")


class CmdlinePoller(threading.Thread):
    """Reads every /proc/*/cmdline in a loop; records what matches."""

    def __init__(self, pattern):
        super().__init__(daemon=True)
        self.pattern = pattern
        self.hits = []
        self.scans = 0
        self.stop = threading.Event()

    def run(self):
        me = str(os.getpid())
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid == me:
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if self.pattern.search(cmd):
                    self.hits.append(cmd.replace(b"\0", b" ")[:200])
            self.scans += 1


def kmsd_log(c):
    with open(os.path.join(c.dir, "node1", "kmsd.log"), "rb") as f:
        return f.read().decode("utf-8", errors="strict")


def metrics(c):
    with urllib.request.urlopen(f"http://127.0.0.1:{c.port(1, 3)}/metrics", timeout=5) as r:
        return r.read().decode()


def ctl_as(c, cert, key, *args):
    env = dict(os.environ, KMSCTL_ENDPOINT=f"127.0.0.1:{c.port(1, 1)}",
               KMSCTL_CACERT=os.path.join(c.dir, "pki", "ca.pem"),
               KMSCTL_CERT=cert, KMSCTL_KEY=key, KMSCTL_TIMEOUT="5s")
    return subprocess.run([KMSCTL, *args], env=env, capture_output=True, text=True, timeout=30)


def s_client(port, version, cert=None, key=None):
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", version, "-brief", "-alpn", "h2"]
    if cert:
        cmd += ["-cert", cert, "-key", key]
    p = subprocess.run(cmd, input=b"", capture_output=True, timeout=15)
    return p.returncode, (p.stdout + p.stderr).decode(errors="replace")


def wait_for(pred, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def main():
    # A private parent directory: nothing else on the machine sweeps it.
    tempfile.tempdir = tempfile.mkdtemp(prefix="kmsd-hyg-")
    c = Cluster(nodes=1, base=BASE)
    pki = os.path.join(c.dir, "pki")
    subprocess.run([os.path.join(SRC, "deploy", "gen-pki.sh"), pki, "--nodes", "1"],
                   check=True)
    opca = os.path.join(pki, "operator-ca.pem")
    shutil.copy(os.path.join(pki, "ca.pem"), opca)
    c.env.update(KMSD_TALOS_TLS12="true", KMSD_TLS_OPERATOR_CA_FILE=opca,
                 KMSD_FOO_TYPO="1")
    pids = []
    try:
        run(c, pki, opca, pids)
    finally:
        c.down()
        for pid in pids:  # in case the pid file went away
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tempfile.tempdir, ignore_errors=True)
    finish()


def run(c, pki, opca, pids):
    # --- shares never on a command line ---------------------------------
    poller = CmdlinePoller(re.compile(rb"kms1-[0-9]{3}-[0-9a-f]{8,}|kms1-control"))
    poller.start()
    ctrl = subprocess.Popen(["/bin/sh", "-c", "sleep 0.05", "kms1-control"])
    ctrl.wait()
    time.sleep(0.05)
    seen_control = any(b"kms1-control" in h for h in poller.hits)
    t0 = time.time()
    c.up()
    pids.append(c.pid(1))
    c.init()
    poller.stop.set()
    poller.join()
    # Only this cluster's shares count (other clusters may run on the machine).
    mine = [s.encode() for s in c.shares]
    leaked = [h for h in poller.hits if any(s in h for s in mine)]
    check(seen_control, "the /proc poller sees a 50 ms process's argv (positive control)")
    check(not leaked, f"no share in any /proc/*/cmdline during init+unseal "
          f"({poller.scans} scans in {time.time() - t0:.1f}s): {leaked[:1]}")

    # --- dataDir permissions ----------------------------------------------
    data = os.path.join(c.dir, "node1", "data")
    mode = os.stat(data).st_mode & 0o777
    check(mode == 0o700, f"dataDir is 0700 (is {mode:o})")
    loose = []
    for root, dirs, files in os.walk(data):
        for n in dirs + files:
            p = os.path.join(root, n)
            m = os.lstat(p).st_mode
            if (m & 0o077) != 0 and not os.path.islink(p):
                loose.append(f"{p} {m & 0o777:o}")
    check(not loose, f"nothing under dataDir is group/other accessible: {loose[:3]}")
    log = kmsd_log(c)
    check("dataDir was readable by group or others" in log,
          "kmsd says it fixed the 0755 dataDir local-cluster.sh created")

    # --- mlockall ---------------------------------------------------------
    pid = c.pid(1)
    with open(f"/proc/{pid}/status") as f:
        vmlck = [l.split()[1] for l in f if l.startswith("VmLck:")]
    if "sanitizer build: mlockall skipped" in log:
        print("[skip] VmLck: sanitizer build does not mlockall")
    else:
        check(vmlck and int(vmlck[0]) > 0, f"VmLck is non-zero with memoryLock on ({vmlck} kB)")

    # --- unknown KMSD_* ---------------------------------------------------
    check('"name":"KMSD_FOO_TYPO"' in log, "kmsd warns about the unknown KMSD_FOO_TYPO")
    p = subprocess.run([os.path.join(os.path.dirname(KMSCTL), "..", "server", "kmsd"),
                        "--check-config", "--config",
                        os.path.join(c.dir, "node1", "kmsd.yaml")],
                       env=dict(os.environ, KMSD_TALOS_LISTN="127.0.0.1:1"),
                       capture_output=True, text=True, timeout=30)
    check(p.returncode == 0 and "KMSD_TALOS_LISTN" in p.stderr,
          f"kmsd --check-config warns about KMSD_TALOS_LISTN: {p.stderr.strip()[:120]}")

    # --- node UUIDs and the log -------------------------------------------
    ep = c.talos(1)
    wait_for(lambda: port_open(c.port(1, 0)), 10)
    rc, blob, _ = c.seal(ep, "3f1c9a4e-7b2d-4c11-9e0a-5d6f7a8b9c0d")
    check(rc == OK, "Seal with a canonical UUID works")
    long_uuid = "A" * 4000
    rc, _ = c.unseal(ep, long_uuid, blob or "")
    check(rc == INVALID_ARGUMENT, f"Unseal with a 4,000-character UUID: INVALID_ARGUMENT (rc {rc})")
    rc, _, _ = c.seal(ep, long_uuid)
    check(rc == INVALID_ARGUMENT, f"Seal with a 4,000-character UUID: INVALID_ARGUMENT (rc {rc})")
    rc, _, _ = c.seal(ep, "bad\u00e9uuid")
    check(rc == INVALID_ARGUMENT, f"Seal with a non-ASCII UUID: INVALID_ARGUMENT (rc {rc})")
    hostile = '"},{"level":"error","x":"\\'
    rc, blob2, _ = c.seal(ep, hostile)
    check(rc == OK, "a UUID made of JSON syntax is a valid token and seals")
    rc, _ = c.unseal(ep, hostile, blob2 or "")
    check(rc == OK, "and unseals")
    time.sleep(0.3)
    bad_lines, n = [], 0
    for line in kmsd_log(c).splitlines():
        if not line.strip():
            continue
        n += 1
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError as e:
            bad_lines.append(f"{e}: {line[:120]}")
    check(n > 10 and not bad_lines, f"all {n} log lines are JSON objects: {bad_lines[:2]}")
    audit = [json.loads(l) for l in kmsd_log(c).splitlines()
             if '"audit"' in l and '"seal"' in l]
    check(any(a.get("node_uuid") == hostile for a in audit),
          "the hostile UUID is logged verbatim (escaped) in the seal audit line")

    # --- TLS 1.2 only on the Talos port -----------------------------------
    op_cert, op_key = os.path.join(pki, "operator.pem"), os.path.join(pki, "operator-key.pem")
    rc12t, out = s_client(c.port(1, 0), "-tls1_2")
    check(rc12t == 0 and "TLSv1.2" in out, f"talos.tls12: the Talos port accepts TLS 1.2 "
          f"(rc {rc12t} {out.strip()[-100:]})")
    rc13c, out13 = s_client(c.port(1, 1), "-tls1_3", op_cert, op_key)
    check(rc13c == 0 and "TLSv1.3" in out13,
          f"the cluster API accepts TLS 1.3 (rc {rc13c} {out13.strip()[-100:]})")
    rc12c, out = s_client(c.port(1, 1), "-tls1_2", op_cert, op_key)
    check(rc12c != 0 and "TLSv1.2" not in out.replace("-tls1_2", ""),
          f"the cluster API refuses TLS 1.2 with talos.tls12 on (rc {rc12c}: "
          f"{out.strip().splitlines()[-1][:100] if out.strip() else ''})")

    # --- SIGHUP reloads CA bundles ----------------------------------------
    # An operator certificate (a kmsd-node-* CN is never an operator) from a
    # CA the node does not trust yet.
    fcert = os.path.join(pki, "foreign-operator.pem")
    fkey = os.path.join(pki, "foreign-operator-key.pem")
    p = ctl_as(c, fcert, fkey, "status")
    check(p.returncode != 0, "a client certificate from an unknown CA is refused")
    with open(opca, "a") as f, open(os.path.join(pki, "foreign-ca.pem")) as g:
        f.write(g.read())
    os.kill(c.pid(1), signal.SIGHUP)
    ok = wait_for(lambda: 'kmsd_tls_reloads_total{result="ok"} 1' in metrics(c), 10)
    check(ok, "SIGHUP reload reported ok (kmsd_tls_reloads_total)")
    p = ctl_as(c, fcert, fkey, "status")
    check(p.returncode == 0, f"after SIGHUP the new CA's certificate is accepted "
          f"(rc {p.returncode} {p.stderr.strip()[:100]})")
    rc12c, out = s_client(c.port(1, 1), "-tls1_2", op_cert, op_key)
    check(rc12c != 0, f"after the reload the cluster API still refuses TLS 1.2 (rc {rc12c})")
    with open(opca, "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    os.kill(c.pid(1), signal.SIGHUP)
    # a whole sample line: the HELP text also reads "kmsd_tls_reload_failed 1 when ..."
    bad = wait_for(lambda: re.search(r"^kmsd_tls_reload_failed 1$", metrics(c), re.M), 10)
    check(bad, "a broken CA file: kmsd_tls_reload_failed 1")
    check('kmsd_tls_reloads_total{result="failed"} 1' in metrics(c),
          "counted in kmsd_tls_reloads_total{result=\"failed\"}")
    check("TLS reload failed" in kmsd_log(c), "and logged at error level")
    p = ctl_as(c, op_cert, op_key, "status")
    check(p.returncode == 0, "the old CAs keep working: the operator certificate is accepted")
    p = ctl_as(c, fcert, fkey, "status")
    check(p.returncode == 0, "and so does the CA loaded by the last good reload")
    rc, _ = c.unseal(ep, "3f1c9a4e-7b2d-4c11-9e0a-5d6f7a8b9c0d", blob or "")
    check(rc == OK, "Talos unseals still work after the failed reload")


if __name__ == "__main__":
    main()
