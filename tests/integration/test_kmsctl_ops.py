#!/usr/bin/python3
"""kmsctl answers scripts can trust, and kmsd --check-config: on a real
three-node cluster (real raft, RocksDB, mutual TLS). Ports 30000-30099.

- status exit codes: 0 serving, 2 sealed / uninitialised, 1 connection
  refused, 1 with a clear message for a foreign CA or no client certificate;
- status --cluster with one member down; --endpoints fail-over;
- --check-config: mismatched key, wrong CN, expired certificate, missing
  dataDir parent (certificates made with openssl here);
- unsealReads: local: warn lines, status marker, metric, no lease claimed;
- operator init against a node waiting to be added fails at once.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import Cluster, check, finish, port_open, KMSD, KMSCTL  # noqa: E402

BASE = 30000
DEAD = 30090  # nothing listens here


def main():
    c = Cluster(nodes=3, base=BASE)
    extra = []
    try:
        run(c, extra)
    finally:
        for p in extra:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        c.down()
    finish()


def ctl(c, i, *args, env_over=None, timeout=30):
    env = dict(os.environ,
               KMSCTL_ENDPOINT=f"127.0.0.1:{c.port(i, 1)}",
               KMSCTL_CACERT=os.path.join(c.dir, "pki", "ca.pem"),
               KMSCTL_CERT=os.path.join(c.dir, "pki", "operator.pem"),
               KMSCTL_KEY=os.path.join(c.dir, "pki", "operator-key.pem"))
    for k, v in (env_over or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run([KMSCTL, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def openssl(*args):
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


def check_config(c, pki):
    """--check-config on node 1's config with one thing broken at a time."""
    base = open(os.path.join(c.dir, "node1", "kmsd.yaml")).read()
    tmp = os.path.join(c.dir, "cc")
    os.makedirs(tmp, exist_ok=True)

    def run_cc(name, text):
        path = os.path.join(tmp, name + ".yaml")
        with open(path, "w") as f:
            f.write(text)
        return subprocess.run([KMSD, "--config", path, "--check-config"], capture_output=True,
                              text=True, timeout=30)

    p = run_cc("good", base)
    check(p.returncode == 0 and "configuration OK" in p.stdout,
          f"--check-config accepts node 1's config (rc {p.returncode}) {p.stderr.strip()[:100]}")

    node1 = os.path.join(pki, "node1.pem")
    node1_key = os.path.join(pki, "node1-key.pem")
    node2_key = os.path.join(pki, "node2-key.pem")
    p = run_cc("badkey", base.replace(f"nodeKeyFile: {node1_key}", f"nodeKeyFile: {node2_key}"))
    check(p.returncode == 1 and "does not match" in p.stderr and node1 in p.stderr,
          f"mismatched node key refused, naming the file: {p.stderr.strip()[:160]}")
    # Talos key that does not match its certificate (found only after unseal before).
    p = run_cc("badtalos", base.replace(f"keyFile: {node1_key}", f"keyFile: {node2_key}", 1))
    check(p.returncode == 1 and "talos.certFile" in p.stderr and "does not match" in p.stderr,
          f"mismatched Talos key refused: {p.stderr.strip()[:160]}")

    node2 = os.path.join(pki, "node2.pem")
    text = base.replace(f"nodeCertFile: {node1}", f"nodeCertFile: {node2}")
    text = text.replace(f"nodeKeyFile: {node1_key}", f"nodeKeyFile: {node2_key}")
    p = run_cc("badcn", text)
    check(p.returncode == 1 and "kmsd-node-2" in p.stderr and "kmsd-node-1" in p.stderr,
          f"node certificate with the wrong CN refused: {p.stderr.strip()[:160]}")

    # Expired: issued by the cluster CA with dates in the past.
    exp = os.path.join(tmp, "expired.pem")
    csr = os.path.join(tmp, "n1.csr")
    openssl("req", "-new", "-key", node1_key, "-subj", "/CN=kmsd-node-1", "-out", csr)
    ext = os.path.join(tmp, "ext")
    with open(ext, "w") as f:
        f.write("extendedKeyUsage=serverAuth,clientAuth\n")
    made = False
    if shutil.which("faketime"):
        r = subprocess.run(["faketime", "2020-01-01 00:00:00", "openssl", "x509", "-req", "-in",
                            csr, "-CA", os.path.join(pki, "ca.pem"), "-CAkey",
                            os.path.join(pki, "ca-key.pem"), "-CAcreateserial", "-days", "30",
                            "-extfile", ext, "-out", exp], capture_output=True, text=True,
                           timeout=30)
        made = r.returncode == 0
    if not made:
        # openssl ca takes explicit dates.
        cadir = os.path.join(tmp, "ca")
        os.makedirs(cadir, exist_ok=True)
        open(os.path.join(cadir, "index.txt"), "w").close()
        with open(os.path.join(cadir, "serial"), "w") as f:
            f.write("1000\n")
        cnf = os.path.join(cadir, "ca.cnf")
        with open(cnf, "w") as f:
            f.write(f"[ca]\ndefault_ca=d\n[d]\ndir={cadir}\ndatabase=$dir/index.txt\n"
                    f"serial=$dir/serial\nnew_certs_dir=$dir\ndefault_md=sha256\n"
                    f"policy=p\nunique_subject=no\n[p]\ncommonName=supplied\n")
        r = openssl("ca", "-batch", "-config", cnf, "-cert", os.path.join(pki, "ca.pem"),
                    "-keyfile", os.path.join(pki, "ca-key.pem"), "-startdate",
                    "20200101000000Z", "-enddate", "20200201000000Z", "-in", csr, "-out", exp,
                    "-notext", "-extfile", ext)
        made = r.returncode == 0
    check(made, "made an expired node certificate with openssl")
    p = run_cc("expired", base.replace(f"nodeCertFile: {node1}", f"nodeCertFile: {exp}"))
    check(p.returncode == 1 and "expired" in p.stderr and exp in p.stderr,
          f"expired node certificate refused: {p.stderr.strip()[:160]}")

    # dataDir whose parent is missing: kmsd creates missing parents (mode
    # 0700), so that passes and says so; a parent that is a file cannot be.
    dd = os.path.join(c.dir, "node1", "data")
    p = run_cc("nodatadir", base.replace(f"dataDir: {dd}",
                                         f"dataDir: {tmp}/missing-parent/data"))
    check(p.returncode == 0 and "missing parents" in p.stderr,
          f"dataDir with a missing parent: created with its parents, said so: "
          f"{p.stderr.strip()[:160]}")
    with open(os.path.join(tmp, "afile"), "w") as f:
        f.write("x")
    p = run_cc("filedatadir", base.replace(f"dataDir: {dd}", f"dataDir: {tmp}/afile/data"))
    check(p.returncode == 1 and "afile/data" in p.stderr and "cannot be created" in p.stderr,
          f"dataDir under a regular file refused: {p.stderr.strip()[:160]}")
    os.makedirs(os.path.join(tmp, "ro"), exist_ok=True)
    if os.geteuid() != 0:
        os.chmod(os.path.join(tmp, "ro"), 0o500)
        p = run_cc("rodatadir", base.replace(f"dataDir: {dd}", f"dataDir: {tmp}/ro/x/data"))
        check(p.returncode == 1 and "not writable" in p.stderr,
              f"dataDir under a read-only parent refused: {p.stderr.strip()[:160]}")
    # dataDir that does not exist yet but can be created: accepted, said so.
    p = run_cc("newdatadir", base.replace(f"dataDir: {dd}", f"dataDir: {tmp}/fresh-data"))
    check(p.returncode == 0 and "creates it" in p.stderr,
          f"a dataDir that can be created is accepted and named: {p.stderr.strip()[:120]}")


def run(c, extra):
    c.up()
    pki = os.path.join(c.dir, "pki")

    # --- uninitialised: 2
    p = ctl(c, 1, "status")
    check(p.returncode == 2, f"status exits 2 while uninitialised (rc {p.returncode})")

    check_config(c, pki)

    # --- a joining node (empty dataDir, not in initialCluster): init fails at once
    n4 = os.path.join(c.dir, "node4")
    os.makedirs(n4, exist_ok=True)
    k4, p4 = os.path.join(n4, "node4-key.pem"), os.path.join(n4, "node4.pem")
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", k4)
    csr4 = os.path.join(n4, "node4.csr")
    openssl("req", "-new", "-key", k4, "-subj", "/CN=kmsd-node-4", "-out", csr4)
    with open(os.path.join(n4, "ext"), "w") as f:
        f.write("extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n")
    r = openssl("x509", "-req", "-in", csr4, "-CA", os.path.join(pki, "ca.pem"), "-CAkey",
                os.path.join(pki, "ca-key.pem"), "-CAcreateserial", "-days", "30", "-extfile",
                os.path.join(n4, "ext"), "-out", p4)
    check(r.returncode == 0, "issued a node 4 certificate")
    cfg4 = os.path.join(n4, "kmsd.yaml")
    with open(cfg4, "w") as f:
        f.write(f"""nodeId: 4
dataDir: {n4}/data
talos:
  listen: "127.0.0.1:{BASE + 30}"
  certFile: {p4}
  keyFile: {k4}
cluster:
  listen: "127.0.0.1:{BASE + 31}"
raft:
  listen: "127.0.0.1:{BASE + 32}"
  electionTimeout: 1s
  heartbeatTimeout: 100ms
http:
  listen: "127.0.0.1:{BASE + 33}"
tls:
  nodeCertFile: {p4}
  nodeKeyFile: {k4}
  clusterCAFile: {pki}/ca.pem
  operatorCAFile: {pki}/ca.pem
""")
    log4 = open(os.path.join(n4, "kmsd.log"), "w")
    proc4 = subprocess.Popen([KMSD, "--config", cfg4], stdout=log4, stderr=subprocess.STDOUT)
    extra.append(proc4)
    end = time.time() + 15
    while time.time() < end and not port_open(BASE + 31):
        time.sleep(0.1)
    ep4 = {"KMSCTL_ENDPOINT": f"127.0.0.1:{BASE + 31}"}
    t0 = time.time()
    p = ctl(c, 1, "operator", "init", "--key-shares", "3", "--key-threshold", "2",
            env_over=ep4)
    dt = time.time() - t0
    print(f"FIGURE operator init against a joining node answered in {dt:.2f}s: "
          f"{p.stderr.strip()[:160]}")
    check(p.returncode != 0 and "not a member" in p.stderr and "members add" in p.stderr,
          "init against a joining node says it is not a member and waits to be added")
    check(dt < 2.5, f"init against a joining node answers at once ({dt:.2f}s, was 5 s)")
    time.sleep(0.3)
    with open(os.path.join(n4, "kmsd.log")) as f:
        l4 = f.read()
    p = ctl(c, 1, "status", "-o", "json", env_over=ep4)
    st4 = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    check(p.returncode == 2 and st4.get("member") is False,
          f"status on the joining node exits 2 with member false (rc {p.returncode})")
    check("waiting to be added" in l4 and "waiting for kmsctl operator init" not in l4,
          "the joining node logs that it waits to be added (not for init)")
    proc4.send_signal(signal.SIGTERM)
    proc4.wait(15)

    # --- init + unseal; serving: 0, every field the table shows in JSON
    c.init()
    p = ctl(c, 1, "status")
    check(p.returncode == 0, f"status exits 0 on a serving node (rc {p.returncode})")
    p = ctl(c, 1, "status", "-o", "json")
    st = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    for k in ("talos_listening", "unseal_reads", "read_lease", "serving", "progress",
              "active_term", "leader_id", "applied_index"):
        check(k in st, f"status JSON has {k}")
    check(st.get("talos_listening") is True and st.get("serving") is True and
          st.get("unseal_reads") == "lease", "JSON: listener open, serving, unsealReads lease")

    # --- connection refused: 1, named
    p = ctl(c, 1, "status", env_over={"KMSCTL_ENDPOINT": f"127.0.0.1:{DEAD}"})
    check(p.returncode == 1 and "connection refused" in p.stderr,
          f"connection refused exits 1: {p.stderr.strip()[:140]}")
    # --- a foreign CA: 1, TLS/CA mismatch with the CA path named
    foreign = os.path.join(pki, "foreign-ca.pem")
    p = ctl(c, 1, "status", env_over={"KMSCTL_CACERT": foreign})
    check(p.returncode == 1 and "not signed by the CA" in p.stderr and foreign in p.stderr,
          f"foreign CA exits 1 with a TLS/CA message naming it: {p.stderr.strip()[:200]}")
    # --- no client certificate: 1, said so
    p = ctl(c, 1, "status", env_over={"KMSCTL_CERT": None, "KMSCTL_KEY": None})
    check(p.returncode == 1 and "no client certificate" in p.stderr,
          f"no client certificate exits 1 and says so: {p.stderr.strip()[:200]}")
    # --- a key that does not match the certificate: found before connecting
    p = ctl(c, 1, "status", env_over={"KMSCTL_KEY": os.path.join(pki, "node1-key.pem")})
    check(p.returncode == 1 and "does not match" in p.stderr,
          f"mismatched client key caught locally: {p.stderr.strip()[:160]}")

    # --- --endpoints: the first is dead, the second answers
    eps = f"127.0.0.1:{DEAD},127.0.0.1:{c.port(2, 1)}"
    p = ctl(c, 1, "--endpoints", eps, "status", "-o", "json")
    st = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    check(p.returncode == 0 and st.get("node_id") == 2 and "next endpoint" in p.stderr,
          f"--endpoints fails over from a dead endpoint to node 2 (rc {p.returncode})")
    p = ctl(c, 1, "status", env_over={"KMSCTL_ENDPOINT": eps})
    check(p.returncode == 0, "KMSCTL_ENDPOINT with commas fails over too")
    # An application error is not failed over: a sealed... (checked below on node 2)

    # --- status --cluster with node 3 down
    c.kill9(3)
    p = ctl(c, 1, "status", "--cluster", "-o", "json")
    doc = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    rows = {m["id"]: m for m in doc.get("members", [])}
    check(len(rows) == 3, f"status --cluster lists 3 members ({len(rows)})")
    check(rows.get(3, {}).get("reachable") is False and rows.get(3, {}).get("error"),
          f"member 3 shows unreachable: {rows.get(3, {}).get('error', '')[:100]}")
    check(all(rows.get(i, {}).get("reachable") is True and
              rows.get(i, {}).get("talos_listening") is True for i in (1, 2)),
          "members 1 and 2 answer for themselves, listeners open")
    check(rows.get(2, {}).get("applied_index", 0) > 0 and rows.get(2, {}).get("version"),
          "member rows carry applied index and version")
    check(p.returncode == 2, f"status --cluster exits 2 with a member down ({p.returncode})")
    p = ctl(c, 1, "status", "--cluster")
    check("unreachable" in p.stdout and "TALOS LISTENER" in p.stdout,
          "status --cluster table shows the unreachable member")

    # --- sealed: 2 (and --endpoints does not fail over an answer)
    p = ctl(c, 2, "operator", "seal")
    check(p.returncode == 0, "sealed node 2")
    p = ctl(c, 2, "status")
    check(p.returncode == 2, f"status exits 2 on a sealed node (rc {p.returncode})")
    p = ctl(c, 1, "--endpoints", f"127.0.0.1:{c.port(2, 1)},127.0.0.1:{c.port(1, 1)}",
            "status", "-o", "json")
    st = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    check(p.returncode == 2 and st.get("node_id") == 2,
          "--endpoints keeps a reached (sealed) node's answer: no fail-over on an answer")
    for s in c.shares[:3]:
        ctl(c, 2, "operator", "unseal", s)

    # --- node 3 back with unsealReads: local
    cfg3 = os.path.join(c.dir, "node3", "kmsd.yaml")
    log3_path = os.path.join(c.dir, "node3", "kmsd-local.log")
    log3 = open(log3_path, "w")
    proc3 = subprocess.Popen([KMSD, "--config", cfg3, "--unseal-reads", "local"], stdout=log3,
                             stderr=subprocess.STDOUT)
    extra.append(proc3)
    end = time.time() + 15
    while time.time() < end and not port_open(c.port(3, 1)):
        time.sleep(0.1)
    for s in c.shares[:3]:
        ctl(c, 3, "operator", "unseal", s)
    end = time.time() + 15
    rc = None
    while time.time() < end:
        rc = ctl(c, 3, "status").returncode
        if rc == 0:
            break
        time.sleep(0.2)
    check(rc == 0, "node 3 (unsealReads: local) serves: status exits 0")
    with open(log3_path) as f:
        warns = [ln for ln in f if "unsealReads: local" in ln and '"warn"' in ln.lower()]
    check(len(warns) >= 2, f"warn-level unsealReads: local lines at start and unseal ({len(warns)})")
    p = ctl(c, 3, "status")
    check("unsealReads: local" in p.stdout and "local reads (no quorum lease)" in p.stdout,
          "status table marks unsealReads: local and claims no quorum lease")
    p = ctl(c, 3, "status", "-o", "json")
    st = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    check(st.get("unseal_reads") == "local" and
          st.get("read_lease") == "local reads (no quorum lease)",
          "status JSON: unseal_reads local, read_lease says no quorum lease")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{c.port(3, 3)}/metrics", timeout=5) as r:
            metrics = r.read().decode()
    except OSError as e:
        metrics = str(e)
    check(re.search(r"^kmsd_unseal_reads_local 1$", metrics, re.M) is not None,
          "metric kmsd_unseal_reads_local 1 on node 3")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{c.port(1, 3)}/metrics", timeout=5) as r:
            m1 = r.read().decode()
    except OSError as e:
        m1 = str(e)
    check(re.search(r"^kmsd_unseal_reads_local 0$", m1, re.M) is not None,
          "metric kmsd_unseal_reads_local 0 on node 1")
    proc3.send_signal(signal.SIGTERM)
    proc3.wait(15)


if __name__ == "__main__":
    main()
