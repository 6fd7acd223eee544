"""Helpers for kmsd integration tests: a local cluster of real kmsd
processes driven through deploy/local-cluster.sh, kmsctl and the Go
Talos-like client. Standard library only; run with /usr/bin/python3.

Environment: KMS_BUILD_DIR (build tree with kmsd, kmsctl, talosclient),
KMS_SOURCE_DIR (repository root).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

SRC = os.environ.get("KMS_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("KMS_BUILD_DIR") or os.path.join(SRC, "build", "release")
KMSD = os.path.join(BUILD, "src", "server", "kmsd")
KMSCTL = os.path.join(BUILD, "src", "cli", "kmsctl")
TALOS = os.path.join(BUILD, "tests", "integration", "talosclient", "talosclient")
LOCAL = os.path.join(SRC, "deploy", "local-cluster.sh")

# gRPC status codes as the Go client exits with them.
OK, INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, UNAVAILABLE = 0, 3, 5, 7, 14

failures = []


def check(cond, what):
    """Records an assertion; the test fails at the end if any failed."""
    status = "ok  " if cond else "FAIL"
    print(f"[{status}] {what}", flush=True)
    if not cond:
        failures.append(what)
    return cond


def finish():
    if failures:
        print(f"\n{len(failures)} check(s) failed:", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        sys.exit(1)
    print("\nall checks passed")
    sys.exit(0)


def share_to_stdin(args):
    """`operator unseal SHARE` -> `operator unseal -` with SHARE on stdin:
    a share on argv is readable by every local user in /proc/PID/cmdline."""
    args = list(args)
    if len(args) >= 3 and args[0] == "operator" and args[1] == "unseal":
        for j in range(2, len(args)):
            if not args[j].startswith("-"):
                share = args[j]
                args[j] = "-"
                return args, share + "\n"
    return args, None


def wait(pred, timeout, step=0.2):
    """Polls pred() every step seconds until it returns a true value (which
    is returned) or timeout seconds pass (then pred()'s last value)."""
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Cluster:
    """A local cluster in a temp dir on ports base+10(i-1)+{0,1,2,3}."""

    def __init__(self, nodes=3, base=27050, keep=False):
        self.nodes = nodes
        self.base = base
        self.dir = tempfile.mkdtemp(prefix="kmsd-it-")
        self.keep = keep or os.environ.get("KMS_KEEP") == "1"
        self.env = dict(os.environ, KMSD_CLUSTER_DIR=self.dir,
                        KMSD_BASE_PORT=str(base), KMSD_BIN_DIR=BUILD)
        self.shares = []

    def port(self, i, off):
        return self.base + 10 * (i - 1) + off

    def talos(self, i):
        return f"127.0.0.1:{self.port(i, 0)}"

    def endpoints(self, nodes=None):
        return ",".join(self.talos(i) for i in (nodes or range(1, self.nodes + 1)))

    def local(self, *args, check_rc=True, timeout=120):
        p = subprocess.run([LOCAL, *args], env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        if check_rc and p.returncode != 0:
            print(p.stdout, p.stderr, file=sys.stderr)
            self.dump_logs()
            raise RuntimeError(f"local-cluster.sh {' '.join(args)} failed: rc={p.returncode}")
        return p

    def up(self):
        self.local("up", "--nodes", str(self.nodes))

    def init(self):
        self.local("init")
        with open(os.path.join(self.dir, "shares.txt")) as f:
            self.shares = [l.strip() for l in f if l.strip()]

    def ctl(self, i, *args, timeout=30):
        env = dict(os.environ,
                   KMSCTL_ENDPOINT=f"127.0.0.1:{self.port(i, 1)}",
                   KMSCTL_CACERT=os.path.join(self.dir, "pki", "ca.pem"),
                   KMSCTL_CERT=os.path.join(self.dir, "pki", "operator.pem"),
                   KMSCTL_KEY=os.path.join(self.dir, "pki", "operator-key.pem"))
        args, stdin = share_to_stdin(args)
        return subprocess.run([KMSCTL, *args], env=env, capture_output=True, text=True,
                              timeout=timeout, input=stdin)

    def status(self, i):
        p = self.ctl(i, "status", "-o", "json")
        try:
            return json.loads(p.stdout)
        except ValueError:
            return None

    def leader(self, among=None):
        for i in among or range(1, self.nodes + 1):
            st = self.status(i)
            if st and st.get("role") == "leader":
                return i
        return None

    def wait_leader(self, among=None, timeout=15):
        end = time.time() + timeout
        while time.time() < end:
            l = self.leader(among)
            if l:
                return l
            time.sleep(0.1)
        return None

    def pid(self, i):
        try:
            with open(os.path.join(self.dir, f"node{i}", "kmsd.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def kill9(self, i):
        pid = self.pid(i)
        if pid:
            os.kill(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        try:
            os.unlink(os.path.join(self.dir, f"node{i}", "kmsd.pid"))
        except OSError:
            pass

    def client(self, *args, timeout=30):
        cmd = [TALOS, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def ca(self):
        return os.path.join(self.dir, "pki", "ca.pem")

    def seal(self, endpoints, uuid):
        p = self.client("seal", "-ca", self.ca(), "-endpoints", endpoints, "-uuid", uuid)
        if p.returncode != 0:
            return p.returncode, None, None
        out = json.loads(p.stdout)
        return 0, out["blob"], out["data"]

    def unseal(self, endpoints, uuid, blob):
        p = self.client("unseal", "-ca", self.ca(), "-endpoints", endpoints, "-uuid", uuid,
                        "-blob", blob)
        return p.returncode, p.stdout.strip()

    def dump_logs(self, lines=40):
        for i in range(1, self.nodes + 1):
            path = os.path.join(self.dir, f"node{i}", "kmsd.log")
            if os.path.exists(path):
                # Audit lines (one per request) would hide everything else.
                with open(path, errors="replace") as f:
                    tail = [ln for ln in f if '"mod":"audit"' not in ln][-lines:]
                print(f"--- node {i} log (last {lines} non-audit lines)", file=sys.stderr)
                sys.stderr.write("".join(tail))

    def down(self):
        for i in range(1, self.nodes + 1):
            pid = self.pid(i)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.time() + 10
        for i in range(1, self.nodes + 1):
            pid = self.pid(i)
            while pid and time.time() < end:
                try:
                    os.kill(pid, 0)
                    time.sleep(0.05)
                except ProcessLookupError:
                    break
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for i in range(1, self.nodes + 1):
            path = os.path.join(self.dir, f"node{i}", "kmsd.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    if "WARNING: ThreadSanitizer" in f.read():
                        check(False, f"node {i}: ThreadSanitizer report in kmsd.log")
        if failures:
            self.dump_logs()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            print(f"kept cluster dir {self.dir}")
