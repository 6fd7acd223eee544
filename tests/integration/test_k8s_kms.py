#!/usr/bin/python3
"""Kubernetes KMS v2: kmsd-k8s-plugin in front of a 3-node kmsd cluster,
driven by the Go client (grpc-go, like kube-apiserver) over the plugin's
unix socket: Status, Encrypt of a 32-byte seed, Decrypt; again after
`operator rotate` (new key_id, old ciphertexts still decrypt); again with
one replica killed. kmsd's KubernetesKms service refuses node and operator
certificates and the plugin certificate is refused elsewhere. Prints the
Status/Encrypt/Decrypt latencies (p50/p99 over 1000 calls each).

Ports 32200-32229 (cluster), plugin on a unix socket in the cluster dir.
"""
import json
import os
import signal
import stat
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kmslib  # noqa: E402
from kmslib import check, finish, OK, INVALID_ARGUMENT, PERMISSION_DENIED  # noqa: E402

BASE = 32200
PLUGIN = os.path.join(kmslib.BUILD, "src", "k8s", "kmsd-k8s-plugin")
K8S = os.path.join(kmslib.BUILD, "tests", "integration", "k8sclient", "k8sclient")
BENCH_N = int(os.environ.get("KMS_K8S_BENCH_N", "1000"))


def k8s(*args, timeout=60):
    return subprocess.run([K8S, *args], capture_output=True, text=True, timeout=timeout)


def wait_status(sock, pred, timeout=20):
    """Polls the plugin's Status until pred(status) holds; returns the last."""
    end = time.time() + timeout
    st = None
    while time.time() < end:
        p = k8s("status", "-socket", sock, timeout=10)
        if p.returncode == 0:
            st = json.loads(p.stdout)
            if pred(st):
                return st
        time.sleep(0.1)
    return st


def envelope(sock, n=3, status=True):
    p = k8s("envelope", "-socket", sock, "-n", str(n), *(() if status else ("-no-status",)))
    if p.returncode != 0:
        print(p.stderr, file=sys.stderr)
        return p.returncode, None
    return 0, json.loads(p.stdout)


def main():
    for path in (PLUGIN, K8S):
        if not os.access(path, os.X_OK):
            print(f"SKIP: {path} not built", file=sys.stderr)
            sys.exit(77)
    t0 = time.time()
    c = kmslib.Cluster(nodes=3, base=BASE)
    plugin = None
    try:
        # bad invocations: a usage error, and an existing non-socket file at
        # the socket path is refused and left alone
        p = subprocess.run([PLUGIN, "--socket", "/tmp/x.sock"], capture_output=True, text=True,
                           timeout=10, stdin=subprocess.DEVNULL)
        check(p.returncode == 64 and "required" in p.stderr, f"missing flags: exit 64 ({p.stderr.strip()[:80]})")
        p = subprocess.run([PLUGIN, "--socket", "rel.sock", "--endpoints", "127.0.0.1:1",
                            "--ca", "x", "--cert", "x", "--key", "x", "--socket-mode", "0999"],
                           capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        check(p.returncode == 64, f"bad --socket-mode: exit 64 ({p.stderr.strip()[:80]})")
        c.up()
        c.init()
        pki = os.path.join(c.dir, "pki")
        sock = os.path.join(c.dir, "k8s", "kms.sock")
        os.makedirs(os.path.dirname(sock), mode=0o700)
        cluster_eps = ",".join(f"127.0.0.1:{c.port(i, 1)}" for i in (1, 2, 3))
        log = open(os.path.join(c.dir, "plugin.log"), "w")
        plugin = subprocess.Popen(
            [PLUGIN, "--socket", sock, "--endpoints", cluster_eps,
             "--ca", os.path.join(pki, "ca.pem"),
             "--cert", os.path.join(pki, "k8s-plugin.pem"),
             "--key", os.path.join(pki, "k8s-plugin-key.pem"),
             "--health-interval-ms", "250", "--attempt-timeout-ms", "1000"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        st = wait_status(sock, lambda s: s.get("healthz") == "ok")
        check(st is not None and st.get("healthz") == "ok" and st.get("version") == "v2",
              f"plugin Status healthy: {st}")
        mode = stat.S_IMODE(os.stat(sock).st_mode)
        check(mode == 0o600, f"socket mode {oct(mode)} == 0600")
        key1 = st["key_id"] if st else ""
        check(key1.startswith("kmsd-") and key1.endswith("-t1"), f"key_id {key1} names cluster and term 1")

        # what kube-apiserver does: Status, Encrypt a 32-byte seed, Decrypt
        rc, e1 = envelope(sock)
        check(rc == OK and e1 and e1["key_id"] == key1, f"envelope before rotate (rc={rc})")
        check(e1 is not None and int(e1["ciphertext_len"]) <= 1024,
              f"ciphertext {e1 and e1['ciphertext_len']} bytes <= 1 kB")

        # wrong input from the apiserver side: clear errors, nothing lost
        p = k8s("decrypt", "-socket", sock, "-ciphertext", e1["ciphertext"],
                "-key-id", "kmsd-00-t1", "-expect", e1["seed"])
        check(p.returncode == INVALID_ARGUMENT, f"wrong key_id refused (rc={p.returncode})")
        p = k8s("decrypt", "-socket", sock, "-ciphertext", "AQAAAAEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "-key-id", key1, "-expect", e1["seed"])
        check(p.returncode == INVALID_ARGUMENT, f"forged ciphertext refused (rc={p.returncode})")

        # rotate: new key_id everywhere, old ciphertexts still decrypt
        leader = c.wait_leader()
        p = c.ctl(leader, "operator", "rotate")
        check(p.returncode == 0, f"operator rotate ({p.stderr.strip()})")
        st = wait_status(sock, lambda s: s.get("healthz") == "ok" and s.get("key_id") != key1)
        key2 = st["key_id"] if st else ""
        check(key2.endswith("-t2") and key2[:-3] == key1[:-3],
              f"key_id after rotate {key2} (same cluster, term 2)")
        rc, e2 = envelope(sock)
        check(rc == OK and e2 and e2["key_id"] == key2, f"envelope after rotate (rc={rc})")
        p = k8s("decrypt", "-socket", sock, "-ciphertext", e1["ciphertext"], "-key-id", key1,
                "-expect", e1["seed"])
        check(p.returncode == OK, f"term-1 ciphertext decrypts after rotate ({p.stderr.strip()})")

        # latencies through plugin + mTLS + kmsd
        p = k8s("bench", "-socket", sock, "-n", str(BENCH_N), timeout=300)
        check(p.returncode == OK, f"bench {BENCH_N} x Status/Encrypt/Decrypt ({p.stderr.strip()})")
        if p.returncode == OK:
            b = json.loads(p.stdout)
            print(f"LATENCY n={b['n']} " + " ".join(
                f"{k}: p50 {b[k]['p50_ms']:.2f} ms p99 {b[k]['p99_ms']:.2f} ms max {b[k]['max_ms']:.2f} ms"
                for k in ("status", "encrypt", "decrypt")), flush=True)
            check(b["status"]["p99_ms"] < 100, "Status p99 well under kube-apiserver's 3 s")

        # one replica down: the plugin's first endpoint, the one it prefers
        # (Encrypt and Decrypt need no quorum: they fail over at once; Status
        # says "ok" again once the survivors hold a read lease, i.e. after an
        # election if node 1 led)
        was_leader = c.leader() == 1
        c.kill9(1)
        t1 = time.time()
        rc, e3 = envelope(sock, status=False)
        check(rc == OK and e3 and e3["key_id"] == key2,
              f"Encrypt+Decrypt right after node 1 was killed (rc={rc}, {time.time() - t1:.2f} s)")
        check(c.wait_leader(among=(2, 3), timeout=15) is not None, "a leader among 2 and 3")
        st = wait_status(sock, lambda s: s.get("healthz") == "ok")
        check(st is not None and st.get("healthz") == "ok",
              f"healthz ok with 2 of 3 after {time.time() - t1:.2f} s "
              f"(node 1 {'was' if was_leader else 'was not'} the leader): {st}")
        rc, e3 = envelope(sock)
        check(rc == OK and e3 and e3["key_id"] == key2, f"envelope with node 1 down (rc={rc})")
        for e, k in ((e1, key1), (e2, key2)):
            p = k8s("decrypt", "-socket", sock, "-ciphertext", e["ciphertext"], "-key-id", k,
                    "-expect", e["seed"])
            check(p.returncode == OK, f"{k[-2:]} ciphertext decrypts with node 1 down")

        # who kmsd lets into which service (node 2's cluster API)
        ep = f"127.0.0.1:{c.port(2, 1)}"

        def direct(cert, method):
            return k8s("direct", "-endpoint", ep, "-ca", os.path.join(pki, "ca.pem"),
                       "-cert", os.path.join(pki, cert + ".pem"),
                       "-key", os.path.join(pki, cert + "-key.pem"), "-method", method,
                       "-plaintext", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").returncode
        for cert in ("node2", "operator"):
            for m in ("Status", "Encrypt", "Decrypt"):
                rc = direct(cert, "/kmsd.v1.KubernetesKms/" + m)
                check(rc == PERMISSION_DENIED, f"{cert} certificate refused on KubernetesKms/{m} (rc={rc})")
        check(direct("k8s-plugin", "/kmsd.v1.KubernetesKms/Encrypt") == OK,
              "plugin certificate accepted on KubernetesKms/Encrypt")
        for m in ("/kmsd.v1.Operator/Status", "/kmsd.v1.Operator/Rotate",
                  "/kmsd.v1.Operator/KeysList", "/kmsd.v1.Cluster/Forward"):
            rc = direct("k8s-plugin", m)
            check(rc == PERMISSION_DENIED, f"plugin certificate refused on {m} (rc={rc})")

        # a regular file where the socket should be: refused, file untouched
        blocker = os.path.join(c.dir, "k8s", "not-a-socket")
        with open(blocker, "w") as f:
            f.write("keep me\n")
        p = subprocess.run([PLUGIN, "--socket", blocker, "--endpoints", cluster_eps,
                            "--ca", os.path.join(pki, "ca.pem"),
                            "--cert", os.path.join(pki, "k8s-plugin.pem"),
                            "--key", os.path.join(pki, "k8s-plugin-key.pem")],
                           capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
        with open(blocker) as f:
            kept = f.read() == "keep me\n"
        check(p.returncode == 1 and "not a socket" in p.stderr and kept,
              f"non-socket file at --socket refused and kept (rc={p.returncode})")

        # no replica left: healthz says why, Encrypt fails UNAVAILABLE in time
        c.kill9(2)
        c.kill9(3)
        t1 = time.time()
        st = wait_status(sock, lambda s: s.get("healthz") != "ok", timeout=15)
        check(st is not None and st.get("healthz") != "ok" and "unreachable" in st.get("healthz", ""),
              f"healthz not ok {time.time() - t1:.2f} s after the last replica died: {st}")
        t1 = time.time()
        rc, _ = envelope(sock, n=1, status=False)
        check(rc == kmslib.UNAVAILABLE and time.time() - t1 < 5,
              f"Encrypt with no replica: UNAVAILABLE (rc={rc}) in {time.time() - t1:.2f} s")

        # SIGTERM: clean exit, socket removed
        plugin.send_signal(signal.SIGTERM)
        try:
            rc = plugin.wait(timeout=10)
        except subprocess.TimeoutExpired:
            plugin.kill()
            rc = plugin.wait()
        plugin = None
        check(rc == 0, f"plugin exits 0 on SIGTERM (rc={rc})")
        check(not os.path.exists(sock), "socket removed at exit")
    finally:
        if plugin is not None:
            plugin.kill()
            plugin.wait()
        if kmslib.failures:
            try:
                with open(os.path.join(c.dir, "plugin.log")) as f:
                    sys.stderr.write("--- plugin log\n" + "".join(f.readlines()[-40:]))
            except OSError:
                pass
        c.down()
    print(f"elapsed {time.time() - t0:.1f} s")
    finish()


if __name__ == "__main__":
    main()
