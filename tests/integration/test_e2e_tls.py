#!/usr/bin/python3
"""Talos API transport security on a real three-node kmsd quorum:
TLS 1.3 + ALPN h2 by default, plaintext and TLS 1.2 only when opted in,
certificate reload on SIGHUP without disturbing raft. Ports 27250-27299.

Driven by deploy/local-cluster.sh (through kmslib), the Go Talos-like client
(`probe` for odd TLS clients) and Python's ssl module (served certificate).
"""
import glob
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import Cluster, check, finish, port_open, OK, UNAVAILABLE, TALOS  # noqa: E402

BASE = 27250


def main():
    c = Cluster(nodes=3, base=BASE)
    try:
        run(c)
    finally:
        c.down()
    finish()


# ---- helpers ---------------------------------------------------------------

def wait_port(port, is_open=True, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        if port_open(port) == is_open:
            return True
        time.sleep(0.1)
    return port_open(port) == is_open


def probe(c, i, *flags):
    """talosclient probe against node i; (rc, report dict or None)."""
    p = c.client("probe", "-ca", c.ca(), "-endpoints", c.talos(i), "-timeout", "5s", *flags)
    try:
        rep = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        rep = None
    return p.returncode, rep


def plain(c, *args, timeout=30):
    """talosclient in plaintext (h2c) mode, like a Talos grpc:// endpoint."""
    return subprocess.run([TALOS, "-plaintext", *args], capture_output=True, text=True,
                          timeout=timeout)


def served_cert_der(port, cafile, host="127.0.0.1"):
    """DER of the certificate a node serves, from a TLS 1.3 + ALPN h2
    handshake verified against the cluster CA (so it also proves the chain)."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname=host) as t:
            return t.getpeercert(binary_form=True)


def file_cert_der(path):
    with open(path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def fp(der):
    return hashlib.sha256(der).hexdigest() if der else None


def openssl(*args):
    p = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def find_ca_key(pki):
    for name in ("ca-key.pem", "ca.key", "ca_key.pem", "ca-key.key"):
        path = os.path.join(pki, name)
        if os.path.exists(path):
            return path
    found = sorted(glob.glob(os.path.join(pki, "*ca*key*")))
    if not found:
        raise RuntimeError(f"no CA private key in {pki}: {os.listdir(pki)}")
    return found[0]


def new_key_args(cert):
    """openssl genpkey arguments for a key of the same type as cert's."""
    text = openssl("x509", "-in", cert, "-noout", "-text")
    if "id-ecPublicKey" in text:
        m = re.search(r"ASN1 OID:\s*(\S+)", text)
        return ["-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{m.group(1) if m else 'prime256v1'}"]
    if "Public Key Algorithm: ED25519" in text:
        return ["-algorithm", "ED25519"]
    m = re.search(r"Public-Key:\s*\((\d+) bit", text)
    return ["-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{m.group(1) if m else '2048'}"]


def reissue_cert(pki, name):
    """Replaces pki/NAME.pem and pki/NAME-key.pem with a certificate for a NEW
    key, signed by the same CA, same subject and extensions (SANs, key usage:
    the same files also serve the cluster API). Files are swapped atomically,
    key first. Returns the new certificate's DER."""
    cert = os.path.join(pki, f"{name}.pem")
    key = os.path.join(pki, f"{name}-key.pem")
    ca, ca_key = os.path.join(pki, "ca.pem"), find_ca_key(pki)
    with tempfile.TemporaryDirectory(prefix="kmsd-reissue-") as tmp:
        nkey, csr, ncert = (os.path.join(tmp, n) for n in ("key.pem", "req.csr", "cert.pem"))
        openssl("genpkey", *new_key_args(cert), "-out", nkey)
        # Certificate -> request with the old subject and every extension,
        # signed by the new key; then the CA signs it, copying the extensions.
        openssl("x509", "-x509toreq", "-in", cert, "-signkey", nkey, "-copy_extensions", "copy",
                "-out", csr)
        openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-copy_extensions",
                "copy", "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
                "-days", "30", "-out", ncert)
        openssl("verify", "-CAfile", ca, ncert)
        mode = os.stat(key).st_mode & 0o777
        os.chmod(nkey, mode)
        ktmp, ctmp = key + ".new", cert + ".new"
        with open(nkey, "rb") as s, open(ktmp, "wb") as d:
            d.write(s.read())
        os.chmod(ktmp, mode)
        with open(ncert, "rb") as s, open(ctmp, "wb") as d:
            d.write(s.read())
        os.replace(ktmp, key)
        os.replace(ctmp, cert)
    return file_cert_der(cert)


def metrics(c, i):
    """kmsd's Prometheus metrics of node i as {name: value} (no labels)."""
    out = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{c.port(i, 3)}/metrics", timeout=3) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("#") or "{" in line:
                    continue
                parts = line.split()
                if len(parts) == 2:
                    out[parts[0]] = float(parts[1])
    except OSError:
        return None
    return out


def raft_view(c):
    """(leader node, {node: term}) as the nodes report it."""
    terms, leader = {}, None
    for i in range(1, c.nodes + 1):
        m = metrics(c, i)
        if m is None:
            continue
        terms[i] = int(m.get("kmsd_raft_term", -1))
        if m.get("kmsd_raft_leader") == 1:
            leader = i
    if leader is None:
        leader = c.leader()
    return leader, terms


def log_lines(c, i):
    path = os.path.join(c.dir, f"node{i}", "kmsd.log")
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"raw": line})
    except OSError:
        pass
    return out


def config_path(c, i):
    return os.path.join(c.dir, f"node{i}", "kmsd.yaml")


def edit_talos_section(text, drop_tls_files=False, add=()):
    """Rewrites the `talos:` section of a generated kmsd.yaml: optionally
    drops certFile/keyFile, appends `  key: value` lines from add."""
    out, section = [], None
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            section = line.split(":", 1)[0].strip()
        if section == "talos" and drop_tls_files and re.match(r"\s+(certFile|keyFile):", line):
            continue
        out.append(line)
        if section == "talos" and re.match(r"\s+listen:", line):
            out.extend(f"  {k}: {v}" for k, v in add)
    return "\n".join(out) + "\n"


def restart_with_config(c, i, text):
    c.local("stop-node", str(i))
    with open(config_path(c, i), "w") as f:
        f.write(text)
    c.local("start-node", str(i), timeout=180)
    return wait_port(c.port(i, 0))


# ---- the test ----------------------------------------------------------------

def run(c):
    c.up()
    c.init()
    for i in range(1, 4):
        check(wait_port(c.port(i, 0)), f"Talos port of node {i} open after init")

    # --- default: TLS 1.3 with ALPN h2 only
    rc, rep = probe(c, 1)
    check(rc == 0 and rep and rep.get("grpc") and rep.get("version") == "TLS1.3"
          and rep.get("alpn") == "h2",
          f"a normal grpc-go client (TLS 1.3, ALPN h2) reaches gRPC: {rep}")
    rc, rep = probe(c, 1, "-tls12only")
    check(rc == 2 and rep is not None and not rep.get("handshake"),
          f"a TLS 1.2-only client is refused at the handshake by default: {rep}")
    rc, rep = probe(c, 1, "-noalpn")
    check(rc == 2 and rep is not None and not rep.get("grpc"),
          f"a client without ALPN h2 gets no gRPC service: {rep}")
    u = str(uuidlib.uuid4())
    rc, blob, data = c.seal(c.talos(1), u)
    check(rc == OK and blob, "TLS seal on node 1")
    check(c.unseal(c.talos(2), u, blob) == (OK, data), "TLS unseal on node 2")

    # --- plaintext is refused unless enabled
    p = plain(c, "unseal", "-endpoints", c.talos(1), "-uuid", u, "-blob", blob)
    check(p.returncode == UNAVAILABLE and p.stdout.strip() != data,
          f"a plaintext (h2c) client is refused by a default node (rc {p.returncode})")

    # --- SIGHUP: new Talos certificate (new key, same CA), no raft disturbance
    leader0, terms0 = raft_view(c)
    check(leader0 is not None and len(terms0) == 3,
          f"raft view before SIGHUP: leader {leader0}, terms {terms0}")
    pid1 = c.pid(1)
    old_der = served_cert_der(c.port(1, 0), c.ca())
    check(fp(old_der) == fp(file_cert_der(os.path.join(c.dir, "pki", "node1.pem"))),
          "node 1 serves pki/node1.pem before the reload")
    new_der = reissue_cert(os.path.join(c.dir, "pki"), "node1")
    check(fp(new_der) != fp(old_der), "reissued node 1 certificate (new key, same CA) differs")
    # Files alone change nothing until SIGHUP.
    check(fp(served_cert_der(c.port(1, 0), c.ca())) == fp(old_der),
          "without SIGHUP node 1 keeps serving the old certificate")
    t_hup = time.time()
    os.kill(pid1, signal.SIGHUP)
    served = None
    end = time.time() + 10
    while time.time() < end:
        try:
            served = served_cert_der(c.port(1, 0), c.ca())
        except (OSError, ssl.SSLError):
            served = None
        if served and fp(served) == fp(new_der):
            break
        time.sleep(0.1)
    check(served is not None and fp(served) == fp(new_der),
          f"after SIGHUP node 1 serves the new certificate ({time.time() - t_hup:.2f}s)")
    check(c.pid(1) == pid1 and port_open(c.port(1, 0)), "node 1 kept running and listening")
    msgs = [l.get("msg", "") for l in log_lines(c, 1)]
    check(any("reloaded" in m for m in msgs), "node 1 logs the TLS reload")
    rc, out = c.unseal(c.talos(1), u, blob)
    check(rc == OK and out == data, "a key sealed before the reload unseals on node 1 after it")
    u2 = str(uuidlib.uuid4())
    rc, blob2, data2 = c.seal(c.talos(1), u2)
    check(rc == OK, "seal on node 1 after the reload")
    for j in (1, 2, 3):
        check(c.unseal(c.talos(j), u2, blob2) == (OK, data2),
              f"key sealed after the reload unseals on node {j}")
    u3 = str(uuidlib.uuid4())
    rc, blob3, data3 = c.seal(c.talos(2), u3)  # forwarded to the leader over the cluster API
    check(rc == OK and c.unseal(c.talos(1), u3, blob3) == (OK, data3),
          "seal on node 2 (forwarded) and unseal on node 1 after the reload")
    check(c.status(1) is not None, "kmsctl status on node 1 after the reload")
    time.sleep(3)  # > 2 election timeouts: a disturbed raft would show by now
    leader1, terms1 = raft_view(c)
    check(leader1 == leader0 and terms1 == terms0,
          f"SIGHUP changed neither leader nor term: before {leader0} {terms0}, "
          f"after {leader1} {terms1}")

    # --- talos.plaintext: true on node 3
    orig3 = open(config_path(c, 3)).read()
    n_before = len(log_lines(c, 3))
    ok = restart_with_config(c, 3, edit_talos_section(orig3, drop_tls_files=True,
                                                      add=[("plaintext", "true")]))
    check(ok, "node 3 restarted with talos.plaintext: true and opened its Talos port")
    pu = str(uuidlib.uuid4())
    p = plain(c, "roundtrip", "-endpoints", c.talos(3), "-uuid", pu)
    check(p.returncode == 0 and '"ok":true' in p.stdout,
          f"plaintext Seal/Unseal round trip on node 3: {(p.stdout + p.stderr).strip()[:160]}")
    p = plain(c, "unseal", "-endpoints", c.talos(3), "-uuid", u2, "-blob", blob2)
    check(p.returncode == 0 and p.stdout.strip() == data2,
          "plaintext unseal on node 3 of a key sealed over TLS")
    p = plain(c, "seal", "-endpoints", c.talos(3), "-uuid", pu)
    ok = p.returncode == 0
    if ok:
        s = json.loads(p.stdout)
        ok = c.unseal(c.talos(1), pu, s["blob"]) == (OK, s["data"])
    check(ok, "a key sealed in plaintext on node 3 unseals over TLS on node 1")
    new = log_lines(c, 3)[n_before:]
    warn = [l for l in new if l.get("level") in ("warn", "error") and "PLAINTEXT" in l.get("msg", "")]
    check(len(warn) >= 1, f"node 3 logs the loud plaintext warning: {warn[:1]}")
    rc, rep = probe(c, 3)
    check(rc == 2 and rep is not None and not rep.get("handshake"),
          f"TLS clients get no TLS from the plaintext node: {rep}")
    check(probe(c, 1)[0] == 0, "node 1 still serves TLS")

    # --- talos.tls12: true on node 3 (TLS again, 1.2 allowed)
    ok = restart_with_config(c, 3, edit_talos_section(orig3, add=[("tls12", "true")]))
    check(ok, "node 3 restarted with talos.tls12: true")
    rc, rep = probe(c, 3, "-tls12only")
    check(rc == 0 and rep and rep.get("grpc") and rep.get("version") == "TLS1.2",
          f"with talos.tls12 a TLS 1.2 client reaches gRPC: {rep}")
    rc, rep = probe(c, 3)
    check(rc == 0 and rep and rep.get("version") == "TLS1.3",
          f"with talos.tls12 a normal client still negotiates TLS 1.3: {rep}")
    rc, rep = probe(c, 3, "-noalpn")
    check(rc == 2 and rep is not None and not rep.get("grpc"),
          f"with talos.tls12 a client without ALPN h2 still gets no gRPC: {rep}")
    check(c.unseal(c.talos(3), u2, blob2) == (OK, data2), "TLS unseal on the tls12 node")
    rc, rep = probe(c, 1, "-tls12only")
    check(rc == 2, "node 1 (default) still refuses TLS 1.2")
    p = plain(c, "unseal", "-endpoints", c.talos(3), "-uuid", u2, "-blob", blob2)
    check(p.returncode == UNAVAILABLE, "plaintext is refused again once node 3 is back on TLS")


if __name__ == "__main__":
    main()
