#!/usr/bin/python3
"""A stolen node certificate against a real three-node cluster (real raft,
RocksDB, TLS). Ports 29200-29223 (nodes) and 29300 (fake leader).

With a node certificate from the test PKI, kmsd.v1.Cluster/Forward is called
directly (python3-grpcio, raw protobuf bytes) with every entry type:
- every non-PutRecord entry is PERMISSION_DENIED and nothing is committed
  (applied index, keyring term and members unchanged); a malformed PutRecord
  is refused too; after restarting every node the genuine shares unseal;
- client certificates from the cluster CA with CN kmsd-node-evil, two CNs,
  a non-member id or a leading zero are refused; a node certificate is not
  an operator certificate (even though the dev PKI has one CA);
- kmsctl sent to a follower follows the leader for writes (rotate);
- a leader advertised at a fake server: a fake with another node's
  certificate fails the forward's server-identity check, and a fake with the
  leader's own (stolen) certificate that answers "OK, index 1" never makes a
  follower return a Seal blob (read-back check): both are UNAVAILABLE.
"""
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid as uuidlib
from concurrent import futures

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import Cluster, check, finish, port_open, LOCAL, OK, UNAVAILABLE  # noqa: E402

try:
    import grpc
except ImportError:  # python3-grpcio works with /usr/bin/python3 only
    print("SKIP: python3-grpcio not available")
    sys.exit(77)

BASE = 29200
FAKE_PORT = 29300
FORWARD = "/kmsd.v1.Cluster/Forward"


# ---- minimal protobuf encoding (field numbers from proto/kmsd/v1/*.proto)

def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def f_varint(field, v):
    return varint(field << 3) + varint(v)


def f_bytes(field, b):
    if isinstance(b, str):
        b = b.encode()
    return varint((field << 3) | 2) + varint(len(b)) + b


def record(key_id=None, uuid="adv-uuid-1", term=1, nonce=None, ct=None, revoked_at=0):
    r = f_varint(1, 1) + f_bytes(2, key_id if key_id is not None else os.urandom(16))
    r += f_bytes(3, uuid) + f_varint(4, term)
    r += f_bytes(5, nonce if nonce is not None else os.urandom(12))
    r += f_bytes(6, ct if ct is not None else os.urandom(48))
    r += f_varint(7, int(time.time() * 1000))
    if revoked_at:
        r += f_varint(10, revoked_at)
    return r


def entry(field, body):
    return f_varint(1, 1) + f_bytes(field, body)


def forward_req(ent, from_id):
    return f_bytes(1, ent) + f_varint(2, from_id)


def garbage_keyring(term):
    ek = f_varint(1, 1) + f_bytes(2, os.urandom(16)) + f_bytes(3, os.urandom(12))
    ek += f_bytes(4, os.urandom(80)) + f_varint(5, 5) + f_varint(6, 3) + f_varint(7, term)
    return ek


# ---- helpers

def read(path):
    with open(path, "rb") as f:
        return f.read()


def grpc_call(port, cert, key, ca, method, body, timeout=8):
    creds = grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key),
                                         certificate_chain=read(cert))
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        fn = ch.unary_unary(method)
        try:
            resp = fn(body, timeout=timeout)
            return grpc.StatusCode.OK, resp, ""
        except grpc.RpcError as e:
            return e.code(), None, e.details() or ""


def openssl(*args):
    p = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {p.stderr.strip()}")


def issue(pki, tmp, name, subj):
    """A client+server certificate from the test cluster CA with subject subj."""
    key, csr, crt, ext = (os.path.join(tmp, f"{name}{s}") for s in
                          ("-key.pem", ".csr", ".pem", ".ext"))
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyAgreement\n"
                "extendedKeyUsage=serverAuth,clientAuth\n"
                "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    openssl("req", "-new", "-key", key, "-subj", subj, "-out", csr)
    openssl("x509", "-req", "-in", csr, "-CA", os.path.join(pki, "ca.pem"), "-CAkey",
            os.path.join(pki, "ca-key.pem"), "-CAcreateserial", "-days", "2", "-sha256",
            "-extfile", ext, "-out", crt)
    return crt, key


def metric(c, i, name):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{c.port(i, 3)}/metrics",
                                    timeout=3) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return int(float(line.split()[1]))
    except OSError:
        pass
    return None


def wait_talos(c, nodes, timeout=10):
    end = time.time() + timeout
    for i in nodes:
        while not port_open(c.port(i, 0)) and time.time() < end:
            time.sleep(0.1)


def members(st):
    return sorted((m["id"], m.get("cluster_address", ""), m.get("raft_address", ""))
                  for m in st.get("members", []))


def snapshot(c):
    """What a committed entry would change, per node: applied index, keyring
    term, members."""
    out = {}
    for i in range(1, 4):
        st = c.status(i) or {}
        out[i] = (st.get("applied_index"), st.get("active_term"), members(st))
    return out


def wait_settled(c, timeout=10):
    """Until applied indexes stop moving (self-publication, leader no-ops)."""
    last, stable_since, end = None, time.time(), time.time() + timeout
    while time.time() < end:
        s = snapshot(c)
        if s != last:
            last, stable_since = s, time.time()
        elif time.time() - stable_since >= 1.5:
            return s
        time.sleep(0.25)
    return last


class FakeLeader:
    """A TLS gRPC server with a node certificate that answers every Forward
    "OK, index 1" without storing anything."""

    def __init__(self, cert, key, ca):
        self.calls = 0
        self.srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))

        def forward(req, ctx):
            self.calls += 1
            return f_varint(1, 1)  # ForwardResponse{index: 1}

        h = grpc.method_handlers_generic_handler(
            "kmsd.v1.Cluster", {"Forward": grpc.unary_unary_rpc_method_handler(forward)})
        self.srv.add_generic_rpc_handlers((h,))
        creds = grpc.ssl_server_credentials([(read(key), read(cert))],
                                            root_certificates=read(ca),
                                            require_client_auth=True)
        self.srv.add_secure_port(f"127.0.0.1:{FAKE_PORT}", creds)
        self.srv.start()

    def stop(self):
        self.srv.stop(0).wait(2)


def main():
    c = Cluster(nodes=3, base=BASE)
    tmp = tempfile.mkdtemp(prefix="kmsd-adv-")
    t0 = time.time()
    try:
        run(c, tmp)
    finally:
        c.down()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"total {time.time() - t0:.1f}s")
    finish()


def stamp(t0, what):
    print(f"  [{time.time() - t0:5.1f}s] {what}", flush=True)


def run(c, tmp):
    t0 = time.time()
    c.up()
    stamp(t0, "up")
    c.init()
    stamp(t0, "init")  # kmsctl to node 1: follows the leader when node 1 is a follower
    pki = os.path.join(c.dir, "pki")
    ca = os.path.join(pki, "ca.pem")
    leader = c.wait_leader()
    check(leader is not None, f"leader elected: node {leader}")
    follower = next(i for i in (1, 2, 3) if i != leader)
    lport = c.port(leader, 1)
    ncert, nkey = os.path.join(pki, f"node{follower}.pem"), os.path.join(pki,
                                                                        f"node{follower}-key.pem")

    # Talos port of every node open, then a seal through a follower (forwarded PutRecord).
    wait_talos(c, (1, 2, 3))
    u1 = str(uuidlib.uuid4())
    rc, blob1, data1 = c.seal(c.talos(follower), u1)
    check(rc == OK, f"seal through follower {follower} (forwarded PutRecord) works: rc={rc}")

    # kmsctl sent to a follower runs writes on the leader.
    p = c.ctl(follower, "operator", "rotate", "-o", "json")
    check(p.returncode == 0 and json.loads(p.stdout or "{}").get("active_term") == 2,
          f"rotate sent to follower {follower} follows the leader: rc={p.returncode} "
          f"{p.stdout.strip()} {p.stderr.strip()[:160]}")
    check("is not the leader" in p.stderr, "kmsctl notes that it followed the leader")

    stamp(t0, "rotate")
    before = wait_settled(c)
    stamp(t0, "settled")
    refused0 = metric(c, leader, "kmsd_forward_refused_total")
    print("before:", before)

    # ---- every entry type but PutRecord through Forward, member node cert
    kid = base64.b64decode(blob1)[1:17] if blob1 else os.urandom(16)
    attacks = {
        "PutKeyring (garbage, term 3)": entry(13, f_bytes(1, garbage_keyring(3))),
        "PutKeyring (garbage, init)": entry(13, f_bytes(1, garbage_keyring(1)) + f_varint(2, 1)),
        "PutMember (re-point node 1 at a fake)": entry(14, f_bytes(1, f_varint(1, 1) + f_bytes(
            2, f"127.0.0.1:{c.port(1, 2)}") + f_bytes(3, f"127.0.0.1:{FAKE_PORT}"))),
        "RemoveMember (node 3)": entry(15, f_varint(1, 3)),
        "RevokeKey (the sealed key)": entry(11, f_bytes(1, kid) + f_varint(2, 1)),
        "RevokeNode (its node)": entry(12, f_bytes(1, u1) + f_varint(2, 1)),
        "TouchBatch (a 1970 time)": entry(16, f_bytes(1, f_bytes(1, kid) + f_varint(2, 1))),
        "TouchBatch (a 5-byte key id)": entry(16, f_bytes(1, f_bytes(1, kid[:5]) + f_varint(
            2, int(time.time() * 1000)))),
        "TouchBatch (a time a day ahead)": entry(16, f_bytes(1, f_bytes(1, kid) + f_varint(
            2, int(time.time() * 1000) + 86400000))),
        "TouchBatch (empty)": entry(16, b""),
        "RewrapBatch": entry(25, f_bytes(1, f_bytes(1, kid) + f_varint(2, 1) + f_varint(3, 2))),
        "RetireTerm": entry(26, f_bytes(1, garbage_keyring(2)) + f_varint(2, 1)),
        "Noop": entry(17, b""),
        "PutRecord: 5-byte key id": entry(10, f_bytes(1, record(key_id=os.urandom(5)))),
        "PutRecord: 3-byte nonce": entry(10, f_bytes(1, record(nonce=b"abc"))),
        "PutRecord: 8-byte ciphertext": entry(10, f_bytes(1, record(ct=os.urandom(8)))),
        "PutRecord: 500-byte ciphertext": entry(10, f_bytes(1, record(ct=os.urandom(500)))),
        "PutRecord: uuid with a space": entry(10, f_bytes(1, record(uuid="a b"))),
        "PutRecord: 200-byte uuid": entry(10, f_bytes(1, record(uuid="u" * 200))),
        "PutRecord: term 99 (not in the keyring)": entry(10, f_bytes(1, record(term=99))),
        "PutRecord: already revoked": entry(10, f_bytes(1, record(revoked_at=5))),
        "PutRecord: entry version 7": f_varint(1, 7) + f_bytes(10, f_bytes(1, record())),
    }
    for name, ent in attacks.items():
        code, _, det = grpc_call(lport, ncert, nkey, ca, FORWARD, forward_req(ent, follower))
        check(code == grpc.StatusCode.PERMISSION_DENIED,
              f"Forward {name}: {code.name} ({det[:90]})")
    code, _, det = grpc_call(lport, ncert, nkey, ca, FORWARD,
                             forward_req(entry(10, f_bytes(1, record())), 3 if follower != 3
                                         else 2))
    check(code == grpc.StatusCode.PERMISSION_DENIED,
          f"Forward with from_id of another node: {code.name} ({det[:80]})")

    # ---- certificates from the cluster CA with bad names, a valid PutRecord
    good = forward_req(entry(10, f_bytes(1, record())), follower)
    for name, subj in (("evil", "/CN=kmsd-node-evil"),
                       ("two", f"/CN=kmsd-node-{follower}/CN=kmsd-node-{leader}"),
                       ("nine", "/CN=kmsd-node-9"),
                       ("zero", f"/CN=kmsd-node-0{follower}"),
                       ("suffix", f"/CN=kmsd-node-{follower} ")):
        crt, key = issue(pki, tmp, name, subj)
        code, _, det = grpc_call(lport, crt, key, ca, FORWARD, good)
        check(code == grpc.StatusCode.PERMISSION_DENIED,
              f"client certificate {subj!r} refused: {code.name} ({det[:80]})")

    # A node certificate is not an operator, even with one CA for both.
    code, _, det = grpc_call(lport, ncert, nkey, ca, "/kmsd.v1.Operator/Rotate", b"")
    check(code == grpc.StatusCode.PERMISSION_DENIED,
          f"node certificate calling Operator/Rotate: {code.name} ({det[:60]})")

    time.sleep(1.0)
    after = snapshot(c)
    print("after: ", after)
    check(after == before, "nothing committed: applied index, keyring term and members "
          "unchanged on every node")
    refused1 = metric(c, leader, "kmsd_forward_refused_total")
    check(refused0 is not None and refused1 is not None and refused1 - refused0 >= len(attacks) + 6,
          f"kmsd_forward_refused_total counted the refusals: {refused0} -> {refused1}")
    check(metric(c, leader, "kmsd_keyring_refresh_failures_total") == 0,
          "no keyring refresh failure on the leader")

    # What a node certificate still can do: forward a well-formed record.
    code, resp, det = grpc_call(lport, ncert, nkey, ca, FORWARD, good)
    check(code == grpc.StatusCode.OK, f"well-formed PutRecord from a member is accepted: {code.name}")

    stamp(t0, "attacks done")
    # ---- restart every node: the genuine shares still unseal, the old key too.
    # Node 1 comes back advertising a fake server's address (used below), and
    # node 2 with a short requestWait so the failing seals below are quick.
    for i in range(1, 4):
        pid = c.pid(i)
        if pid:
            os.kill(pid, signal.SIGTERM)
    for i in range(1, 4):
        pid, end = c.pid(i), time.time() + 15
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
    stamp(t0, "stopped")
    extra = {1: {"KMSD_CLUSTER_ADVERTISE": f"127.0.0.1:{FAKE_PORT}"},
             2: {"KMSD_REQUEST_WAIT": "2s"}, 3: {}}
    for i in range(1, 4):
        p = subprocess.run([LOCAL, "start-node", str(i)], env=dict(c.env, **extra[i]),
                           capture_output=True, text=True, timeout=60)
        check(p.returncode == 0, f"node {i} restarted: {p.stderr.strip()[-120:]}")
    for i in range(1, 4):
        st = c.status(i) or {}
        check(st.get("sealed") is False and st.get("active_term") == 2 and
              not st.get("keyring_error"),
              f"node {i} unsealed by the genuine shares after restart (term "
              f"{st.get('active_term')})")
    c.wait_leader()
    wait_talos(c, (1, 2, 3))
    if blob1:
        rc, out = c.unseal(c.endpoints(), u1, blob1)
        check(rc == OK and out == data1, f"the key sealed before still unseals: rc={rc}")

    stamp(t0, "restart done")
    # ---- a leader advertised at a fake server
    # Node 1 advertises the fake's address and is made leader: as leader it
    # publishes that address (no node certificate can: PutMember is not
    # forwardable), so followers forward Seals to the fake.
    lead = c.wait_leader()
    other = 2 if lead != 2 else 3
    if lead != 1:
        c.ctl(other, "operator", "members", "transfer-leader", "--id", "1")
    end = time.time() + 15
    published = False
    while time.time() < end:
        st = c.status(2) or {}
        addrs = {m["id"]: m.get("cluster_address") for m in st.get("members", [])}
        if st.get("leader_id") == 1 and addrs.get(1) == f"127.0.0.1:{FAKE_PORT}":
            published = True
            break
        time.sleep(0.2)
    check(published, "node 1 leads and its published cluster address is the fake")
    victim = 2
    wait_talos(c, (victim,))

    # (a) the fake presents node 3's certificate: the server-identity check fails.
    fake = FakeLeader(os.path.join(pki, "node3.pem"), os.path.join(pki, "node3-key.pem"), ca)
    try:
        t = time.time()
        rc, blob, _ = c.seal(c.talos(victim), str(uuidlib.uuid4()))
        check(rc == UNAVAILABLE and blob is None,
              f"fake leader with node 3's certificate: seal via node {victim} is "
              f"UNAVAILABLE (rc={rc}, {time.time() - t:.1f}s), fake answered {fake.calls} calls")
        check(fake.calls == 0, "no Forward reached the fake (handshake refused)")
    finally:
        fake.stop()
    # (b) the fake presents node 1's own (stolen) certificate and answers OK.
    fake = FakeLeader(os.path.join(pki, "node1.pem"), os.path.join(pki, "node1-key.pem"), ca)
    try:
        rb0 = metric(c, victim, "kmsd_seal_readback_failures_total") or 0
        t = time.time()
        rc, blob, _ = c.seal(c.talos(victim), str(uuidlib.uuid4()))
        check(rc == UNAVAILABLE and blob is None,
              f"fake leader with the leader's certificate answering OK: seal via node "
              f"{victim} is UNAVAILABLE, never OK (rc={rc}, {time.time() - t:.1f}s, "
              f"fake calls {fake.calls})")
        rb1 = metric(c, victim, "kmsd_seal_readback_failures_total") or 0
        check(fake.calls >= 1 and rb1 > rb0,
              f"the fake's OK was caught by the read-back: failures {rb0} -> {rb1}")
    finally:
        fake.stop()
    # The leader itself still seals (its own read-back passes).
    rc, blob, _ = c.seal(c.talos(1), str(uuidlib.uuid4()))
    check(rc == OK, f"a seal on the leader itself still works: rc={rc}")


if __name__ == "__main__":
    main()
