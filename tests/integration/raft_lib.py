"""Helpers for the raft integration tests and bench/bench_raft.py.

Each node is one kms-raft-harness process (store + raft) driven through its
stdin/stdout line protocol (see tests/integration/raft_harness/raft_harness.c).
Stdlib only. Ports: callers pass a base in 25000-25999.
"""
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def harness_path():
    p = os.environ.get("KMS_RAFT_HARNESS")
    if p:
        return p
    build = os.environ.get("KMS_BUILD_DIR")
    if not build:
        here = os.path.dirname(os.path.abspath(__file__))
        build = os.path.join(here, "..", "..", "build", "debug")
    return os.path.join(build, "tests", "integration", "raft_harness", "kms-raft-harness")


def skip(msg):
    """Exit 77: ctest reports the test as skipped (SKIP_RETURN_CODE)."""
    print("SKIP: " + msg)
    sys.exit(77)


def log(msg):
    print("[%8.3f] %s" % (time.monotonic() % 100000, msg), flush=True)


def port_free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


class NodeError(Exception):
    pass


class Node:
    def __init__(self, cluster, nid, port):
        self.cluster = cluster
        self.id = nid
        self.port = port
        self.addr = "127.0.0.1:%d" % port
        self.dir = os.path.join(cluster.workdir, "n%d" % nid)
        self.proc = None
        self.buf = b""
        self.errlog = None
        self.extra = []
        self.logname = "n%d.log" % nid

    # -- process
    def start(self, peers=None, extra=None, wait_ready=True):
        if extra is not None:
            self.extra = list(extra)
        args = [harness_path(), "--id", str(self.id), "--data", self.dir, "--addr", self.addr,
                "--election-ms", str(self.cluster.election_ms),
                "--heartbeat-ms", str(self.cluster.heartbeat_ms)]
        if self.cluster.snapshot_threshold:
            args += ["--snapshot-threshold", str(self.cluster.snapshot_threshold),
                     "--snapshot-trailing", str(self.cluster.snapshot_trailing)]
        if peers:
            args += ["--peers", ",".join("%d=%s" % (n.id, n.addr) for n in peers)]
        args += self.extra
        if "--cert" not in self.extra:
            args += self.cluster.tls_args(self.id)
        os.makedirs(self.cluster.workdir, exist_ok=True)
        self.errlog = open(os.path.join(self.cluster.workdir, self.logname), "ab")
        env = dict(os.environ)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errlog, env=env)
        self.buf = b""
        if wait_ready:
            r = self.read_reply(20)
            if not r.get("ready"):
                raise NodeError("node %d failed to start: %s" % (self.id, r))
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close_pipes()

    def quit(self, timeout=20):
        """Graceful stop. Returns the exit code (sanitizer failures show here)."""
        if not self.alive():
            rc = self.proc.returncode if self.proc else 0
            self._close_pipes()
            return rc
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            rc = rc if rc else -999
        self._close_pipes()
        return rc

    def _close_pipes(self):
        for f in (self.proc.stdin, self.proc.stdout) if self.proc else ():
            try:
                f.close()
            except OSError:
                pass
        if self.errlog:
            self.errlog.close()
            self.errlog = None

    # -- protocol
    def send(self, line):
        if not self.alive():
            raise NodeError("node %d is not running" % self.id)
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def read_reply(self, timeout):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NodeError("node %d: no reply within %.1fs" % (self.id, timeout))
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise NodeError("node %d exited (rc %s)" % (self.id, self.proc.poll()))
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line.decode())

    def cmd(self, line, timeout=30):
        self.send(line)
        return self.read_reply(timeout)

    def status(self):
        return self.cmd("status", 10)

    def digest(self):
        return self.cmd("digest", 30)


def shared_pki(max_id=9):
    """A dev PKI (deploy/gen-pki.sh) shared by the raft tests: raft runs only
    over mutual TLS. gen-pki.sh skips files that exist, so this is cheap
    after the first call."""
    src = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    pki = os.path.join(tempfile.gettempdir(), "kms-raft-pki-%d" % os.getuid())
    if not os.path.exists(os.path.join(pki, "node%d-key.pem" % max_id)):
        subprocess.run([os.path.join(src, "deploy", "gen-pki.sh"), pki, "--nodes", str(max_id)],
                       check=True, stdout=subprocess.DEVNULL)
    return pki


class Cluster:
    def tls_args(self, nid):
        pki = shared_pki()
        return ["--cert", os.path.join(pki, "node%d.pem" % nid),
                "--key", os.path.join(pki, "node%d-key.pem" % nid),
                "--ca", os.path.join(pki, "ca.pem")]

    def __init__(self, name, base_port, n, election_ms=1000, heartbeat_ms=100,
                 snapshot_threshold=0, snapshot_trailing=0, keep=False):
        if not os.path.exists(harness_path()):
            raise RuntimeError("harness not built: " + harness_path())
        self.workdir = tempfile.mkdtemp(prefix="kms-%s-" % name)
        self.election_ms = election_ms
        self.heartbeat_ms = heartbeat_ms
        self.snapshot_threshold = snapshot_threshold
        self.snapshot_trailing = snapshot_trailing
        self.keep = keep or os.environ.get("KMS_KEEP") == "1"
        self.nodes = {}
        self.base_port = base_port
        self.failed = False
        for i in range(1, n + 1):
            self.new_node(i)

    def new_node(self, nid, port=None, key=None):
        port = port or self.base_port + nid
        if not port_free(port):
            raise NodeError("port %d busy" % port)
        n = Node(self, nid, port)
        if key is not None:
            n.dir = os.path.join(self.workdir, "n%s" % key)
            n.logname = "n%s.log" % key
        self.nodes[key if key is not None else nid] = n
        return n

    def initial(self):
        return [self.nodes[k] for k in sorted(self.nodes, key=str)]

    def start_all(self, extra=None):
        peers = self.initial()
        for n in peers:
            n.start(peers=peers, extra=extra(n) if extra else None)

    def running(self):
        return [n for n in self.initial() if n.alive()]

    def wait_leader(self, timeout=15, among=None, exclude=()):
        """Returns the node that is leader with a lease (its term-start barrier applied)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for n in (among or self.running()):
                if n.id in exclude or not n.alive():
                    continue
                st = n.status()
                last = st
                if st["role"] == "leader" and st["lease"]:
                    return n
            time.sleep(0.05)
        raise NodeError("no leader within %ss (last status %s)" % (timeout, last))

    def wait_converged(self, nodes=None, timeout=30):
        """All nodes applied the same index and have identical store digests."""
        nodes = nodes or self.running()
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            sts = [n.status() for n in nodes]
            commit = max(s["commit"] for s in sts)
            if all(s["applied"] >= commit and s["store_applied"] == sts[0]["store_applied"]
                   for s in sts):
                ds = [n.digest() for n in nodes]
                last = [(n.id, d["digest"][:16], d["applied"], d["count"]) for n, d in zip(nodes, ds)]
                if len({d["digest"] for d in ds}) == 1 and len({d["applied"] for d in ds}) == 1:
                    return ds[0]
            else:
                last = [(s["id"], s["commit"], s["applied"], s["store_applied"]) for s in sts]
            time.sleep(0.1)
        raise NodeError("nodes did not converge within %ss: %s" % (timeout, last))

    def close(self):
        """Stops every node gracefully; fails if one exits non-zero (sanitizers)."""
        bad = []
        for n in self.initial():
            if n.proc is None:
                continue
            rc = n.quit()
            if rc != 0:
                bad.append((n.id, rc))
        if bad or self.failed or self.keep:
            print("logs kept in " + self.workdir)
            for nid, _ in bad:
                p = os.path.join(self.workdir, "n%s.log" % nid)
                try:
                    with open(p, "rb") as f:
                        tail = f.read()[-4000:].decode(errors="replace")
                    print("---- n%d.log (tail)\n%s" % (nid, tail))
                except OSError:
                    pass
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if bad:
            raise NodeError("nodes exited with errors: %s" % bad)

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is SystemExit and not ev.code:
            et = None  # skip() inside the with block
        if et is not None:
            self.failed = True
            for n in self.initial():
                if n.alive():
                    n.kill9()
            print("logs kept in " + self.workdir)
            return False
        self.close()
        return False


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)
    log("ok: " + msg)
