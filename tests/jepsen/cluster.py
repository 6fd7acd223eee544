"""Real kmsd processes, one per network namespace, for the Jepsen suite.

The harness process itself runs inside the client namespace (run.py re-execs
itself there), so it reaches 10.77.0.i directly; kmsd is started with
`ip netns exec PFX-n<i>` (which execs in place, so Popen's pid is kmsd's, or
the wrapper's: strace / env). Data dirs live under the run directory on the
local disk (not tmpfs).
"""
import json
import os
import signal
import socket
import subprocess
import time

import net

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.abspath(os.path.join(HERE, "..", ".."))
BUILD = os.environ.get("KMS_BUILD_DIR") or os.path.join(SRC, "build", "release")
KMSD = os.path.join(BUILD, "src", "server", "kmsd")
KMSCTL = os.path.join(BUILD, "src", "cli", "kmsctl")
GENPKI = os.path.join(SRC, "deploy", "gen-pki.sh")

TALOS_PORT, CLUSTER_PORT, RAFT_PORT, HTTP_PORT = 4050, 4051, 4052, 4053


class NoService(RuntimeError):
    """kmsd is up and unsealed but its Talos listener never opened."""


def now_ns():
    return time.monotonic_ns()


class Cluster:
    def __init__(self, run_dir, n_ns, members, election_ms=1000, heartbeat_ms=100, log=None):
        self.dir = run_dir
        self.n_ns = n_ns                # namespaces (possible nodes)
        self.members = list(members)    # initialCluster ids
        self.election_ms = election_ms
        self.heartbeat_ms = heartbeat_ms
        self.procs = {}                 # node -> Popen
        self.shares = []
        self.log = log or (lambda *a, **k: None)
        self.pki = os.path.join(run_dir, "pki")
        self.data_override = {}         # node -> data dir (e.g. a loop mount)
        self.node_env = {}              # node -> extra environment (LD_PRELOAD shims)

    # ---- files
    def node_dir(self, i):
        return os.path.join(self.dir, f"node{i}")

    def data_dir(self, i):
        return self.data_override.get(i) or os.path.join(self.node_dir(i), "data")

    def gen_pki(self):
        args = [GENPKI, self.pki, "--nodes", str(self.n_ns)]
        for i in range(1, self.n_ns + 1):
            args += ["--ip", net.ip_of(i)]
        subprocess.run(args, check=True, capture_output=True, timeout=120)

    def write_config(self, i, initial=True):
        os.makedirs(self.node_dir(i), exist_ok=True)
        os.makedirs(self.data_dir(i), exist_ok=True)
        ip = net.ip_of(i)
        p = self.pki
        lines = [
            f"nodeId: {i}",
            f"dataDir: {self.data_dir(i)}",
            "talos:",
            f"  listen: \"{ip}:{TALOS_PORT}\"",
            f"  certFile: {p}/node{i}.pem",
            f"  keyFile: {p}/node{i}-key.pem",
            "cluster:",
            f"  listen: \"{ip}:{CLUSTER_PORT}\"",
            "raft:",
            f"  listen: \"{ip}:{RAFT_PORT}\"",
            f"  electionTimeout: {self.election_ms}ms",
            f"  heartbeatTimeout: {self.heartbeat_ms}ms",
            "http:",
            f"  listen: \"{ip}:{HTTP_PORT}\"",
            "tls:",
            f"  nodeCertFile: {p}/node{i}.pem",
            f"  nodeKeyFile: {p}/node{i}-key.pem",
            f"  clusterCAFile: {p}/ca.pem",
            f"  operatorCAFile: {p}/ca.pem",
            "rateLimit:",
            "  failedUnsealsPerMinute: 0",
        ]
        if initial:
            lines.append("initialCluster:")
            for j in self.members:
                lines += [f"  - id: {j}",
                          f"    raft: \"{net.ip_of(j)}:{RAFT_PORT}\"",
                          f"    cluster: \"{net.ip_of(j)}:{CLUSTER_PORT}\""]
        else:
            lines.append("initialCluster: []")
        with open(self.cfg(i), "w") as f:
            f.write("\n".join(lines) + "\n")

    def cfg(self, i):
        return os.path.join(self.node_dir(i), "kmsd.yaml")

    # ---- processes
    def start(self, i, wrapper=(), env=None):
        if self.running(i):
            return
        logf = open(os.path.join(self.node_dir(i), "kmsd.log"), "ab")
        logf.write(f"\n=== start node {i} mono_ns={now_ns()} wrapper={list(wrapper)}\n".encode())
        logf.flush()
        e = dict(os.environ)
        e.pop("LD_PRELOAD", None)
        e.update(self.node_env.get(i, {}))
        if env:
            e.update(env)
        cmd = ["ip", "netns", "exec", net.ns(i), *wrapper, KMSD, "--config", self.cfg(i)]
        self.procs[i] = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=e)
        logf.close()
        self.log("start", node=i, pid=self.procs[i].pid, wrapper=list(wrapper))

    def running(self, i):
        p = self.procs.get(i)
        return p is not None and p.poll() is None

    def pid(self, i):
        p = self.procs.get(i)
        return p.pid if p else None

    def kmsd_pids(self, i):
        """Every pid in node i's namespace (kmsd, or strace + kmsd)."""
        out = subprocess.run(["ip", "netns", "pids", net.ns(i)], capture_output=True,
                             text=True).stdout.split()
        return [int(x) for x in out if x.isdigit()]

    def signal(self, i, sig):
        for pid in self.kmsd_pids(i):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill9(self, i):
        self.log("kill9", node=i)
        self.signal(i, signal.SIGKILL)
        self._reap(i, 10)

    def _reap(self, i, timeout):
        p = self.procs.get(i)
        if p:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal(i, signal.SIGKILL)
                p.wait(timeout=10)
        end = time.time() + 5
        while self.kmsd_pids(i) and time.time() < end:
            time.sleep(0.05)

    def stop(self, i, timeout=15):
        """SIGTERM and wait (a leader transfers leadership first)."""
        self.log("sigterm", node=i)
        self.signal(i, signal.SIGCONT)
        self.signal(i, signal.SIGTERM)
        self._reap(i, timeout)

    def pause(self, i):
        self.log("sigstop", node=i)
        self.signal(i, signal.SIGSTOP)

    def resume(self, i):
        self.log("sigcont", node=i)
        self.signal(i, signal.SIGCONT)

    def exit_code(self, i):
        p = self.procs.get(i)
        return None if p is None else p.poll()

    def stop_all(self):
        for i in list(self.procs):
            self.signal(i, signal.SIGCONT)
            self.signal(i, signal.SIGKILL)
        for i in list(self.procs):
            try:
                self.procs[i].wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    # ---- kmsctl
    def ctl(self, i, *args, timeout=15):
        env = dict(os.environ, KMSCTL_ENDPOINT=f"{net.ip_of(i)}:{CLUSTER_PORT}",
                   KMSCTL_CACERT=f"{self.pki}/ca.pem", KMSCTL_CERT=f"{self.pki}/operator.pem",
                   KMSCTL_KEY=f"{self.pki}/operator-key.pem", KMSCTL_TIMEOUT="5s")
        env.pop("LD_PRELOAD", None)
        stdin = None
        if len(args) >= 3 and args[0] == "operator" and args[1] == "unseal" and \
                not args[2].startswith("-"):
            # the share goes on stdin, never on argv (/proc/PID/cmdline)
            stdin = args[2] + "\n"
            args = (*args[:2], "-", *args[3:])
        try:
            return subprocess.run([KMSCTL, *args], env=env, capture_output=True, text=True,
                                  timeout=timeout, input=stdin)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(args, 124, "", "timeout")

    def status(self, i, timeout=8):
        p = self.ctl(i, "status", "-o", "json", timeout=timeout)
        try:
            return json.loads(p.stdout)
        except ValueError:
            return None

    def leader(self, among=None):
        votes = {}
        for i in among or self.members:
            st = self.status(i, timeout=4)
            if st and st.get("role") == "leader":
                votes[i] = st.get("term", 0)
        if not votes:
            return None
        return max(votes, key=lambda k: votes[k])

    def wait_leader(self, among=None, timeout=20):
        end = time.time() + timeout
        while time.time() < end:
            l = self.leader(among)
            if l:
                return l
            time.sleep(0.2)
        return None

    def wait_api(self, i, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            if self.status(i, timeout=3) is not None:
                return True
            if not self.running(i):
                return False
            time.sleep(0.1)
        return False

    def init(self):
        end = time.time() + 30
        while time.time() < end:
            p = self.ctl(self.members[0], "operator", "init", "--key-shares", "5",
                         "--key-threshold", "3", "-o", "json")
            if p.returncode == 0:
                self.shares = json.loads(p.stdout)["shares"]
                with open(os.path.join(self.dir, "shares.txt"), "w") as f:
                    f.write("\n".join(self.shares) + "\n")
                self.log("init", ok=True)
                return
            time.sleep(0.5)
        raise RuntimeError(f"init failed: {p.stderr.strip()}")

    def unseal(self, i, timeout=40):
        """Waits for the keyring to be replicated, gives 3 of 5 shares.
        Returns the monotonic ns at which the node reported unsealed."""
        end = time.time() + timeout
        if not self.wait_api(i, timeout=timeout):
            raise RuntimeError(f"node {i} cluster API not up")
        while time.time() < end:
            st = self.status(i, timeout=3)
            if st and st.get("initialized"):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"node {i} never saw the initialised keyring")
        while time.time() < end:
            ok = True
            for s in self.shares[:3]:
                p = self.ctl(i, "operator", "unseal", s, "-o", "json")
                if p.returncode != 0:
                    ok = False
                    break
                try:
                    if json.loads(p.stdout).get("sealed") is False:
                        break
                except ValueError:
                    pass
            st = self.status(i, timeout=3)
            if ok and st and st.get("sealed") is False:
                t = now_ns()
                self.log("unsealed", node=i)
                return t
            self.ctl(i, "operator", "unseal", "--reset")
            time.sleep(0.3)
        raise RuntimeError(f"node {i} did not unseal")

    def talos_open(self, i):
        try:
            with socket.create_connection((net.ip_of(i), TALOS_PORT), timeout=0.5):
                return True
        except OSError:
            return False

    def bootstrap(self):
        self.gen_pki()
        for i in self.members:
            self.write_config(i, initial=True)
        for i in self.members:
            self.start(i)
        for i in self.members:
            if not self.wait_api(i):
                raise RuntimeError(f"node {i} did not come up (see {self.node_dir(i)}/kmsd.log)")
        self.init()
        for i in self.members:
            self.unseal(i)
        end = time.time() + 20
        while time.time() < end and not all(self.talos_open(i) for i in self.members):
            time.sleep(0.1)
        if not all(self.talos_open(i) for i in self.members):
            closed = [i for i in self.members if not self.talos_open(i)]
            raise NoService(f"Talos listeners of nodes {closed} did not open within 20 s of unseal")
