#!/usr/bin/python3
"""Policies that hold (docs/security.md "Limits"), on one real kmsd node
(real raft, RocksDB, TLS) on ports 29450-29459, each scenario bounded:

  A  a NAT'd legitimate client keeps unsealing while another client behind
     the same address hammers failing unseals (valid keys are always served;
     only failing attempts are refused);
  B  failing unseals from rotating source addresses (127.0.0.x loopback
     aliases) cannot exceed the global bound;
  C  a seal flood is capped per address, per node UUID, and by live keys
     per node UUID (RESOURCE_EXHAUSTED);
  D  kmsctl keys list pages transparently;
  E  the enrolment policy (CIDRs, UUID list) refuses Unseal as well as Seal.
"""
import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import (Cluster, check, finish, port_open, OK, PERMISSION_DENIED,  # noqa: E402
                    UNAVAILABLE, TALOS)

RESOURCE_EXHAUSTED = 8
PER_ADDR_FAILS = 30      # rateLimit.failedUnsealsPerMinute (default)
GLOBAL_FAILS = 150       # rateLimit.failedUnsealsGlobalPerMinute
SEALS_PER_ADDR = 30      # rateLimit.sealsPerMinute
SEALS_PER_UUID = 8       # rateLimit.sealsPerNodePerMinute
RECORDS_PER_UUID = 5     # rateLimit.recordsPerNode
SLACK = 8                # calls in flight between a limiter check and its count

FLOOD_UUIDS = [str(uuidlib.uuid4()) for _ in range(40)]
U_LEGIT, U_REC, U_OTHER = (str(uuidlib.uuid4()) for _ in range(3))
ALLOWED_UUIDS = FLOOD_UUIDS + [U_LEGIT, U_REC, U_OTHER]


def burst(c, *args, timeout=50):
    p = subprocess.run([TALOS, "burst", "-ca", c.ca(), "-endpoints", c.talos(1), *args],
                       capture_output=True, text=True, timeout=timeout)
    try:
        return json.loads(p.stdout)["codes"]
    except (ValueError, KeyError):
        print(p.stdout, p.stderr, file=sys.stderr)
        return {}


def unseal_from(c, src, u, blob):
    p = subprocess.run([TALOS, "unseal", "-ca", c.ca(), "-endpoints", c.talos(1), "-source", src,
                        "-uuid", u, "-blob", blob], capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout.strip(), p.stderr.strip()


def seal_from(c, src, u):
    p = subprocess.run([TALOS, "seal", "-ca", c.ca(), "-endpoints", c.talos(1), "-source", src,
                        "-uuid", u], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return p.returncode, None, None, p.stderr.strip()
    out = json.loads(p.stdout)
    return 0, out["blob"], out["data"], ""


def metrics(c):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{c.port(1, 3)}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(line.split()[-1])
    return None


def unknown_blob(blob):
    raw = bytearray(base64.b64decode(blob))
    raw[3] ^= 0x5A  # a key id nobody has, valid format
    return base64.b64encode(bytes(raw)).decode()


def main():
    c = Cluster(nodes=1, base=29450)
    c.env.update({
        "KMSD_RATE_LIMIT_FAILED_UNSEALS_GLOBAL_PER_MINUTE": str(GLOBAL_FAILS),
        "KMSD_RATE_LIMIT_SEALS_PER_MINUTE": str(SEALS_PER_ADDR),
        "KMSD_RATE_LIMIT_SEALS_PER_NODE_PER_MINUTE": str(SEALS_PER_UUID),
        "KMSD_RATE_LIMIT_RECORDS_PER_NODE": str(RECORDS_PER_UUID),
        "KMSD_ENROLMENT_ALLOWED_CIDRS": "127.0.0.0/28",
        "KMSD_ENROLMENT_UUID_ALLOW_LIST": ",".join(ALLOWED_UUIDS),
    })
    try:
        run(c)
    finally:
        c.down()
    finish()


def run(c):
    c.up()
    c.init()
    end = time.time() + 15
    while not port_open(c.port(1, 0)) and time.time() < end:
        time.sleep(0.1)
    check(port_open(c.port(1, 0)), "Talos port open")

    rc, blob, data, err = seal_from(c, "127.0.0.1", U_LEGIT)
    check(rc == OK, f"seal of the legitimate key ({err})")
    bad = unknown_blob(blob)

    # --- A: NAT. 127.0.0.2 is one address shared by a legitimate Talos node
    # and an attacker who sends failing unseals.
    t0 = time.time()
    res = {}

    def hammer():
        res["a"] = burst(c, "-n", "120", "-uuid", U_LEGIT, "-blob", bad, "-sources", "127.0.0.2",
                         "-parallel", "4")
    th = threading.Thread(target=hammer)
    th.start()
    legit = []
    while th.is_alive() or len(legit) < 10:
        rcl, out, _ = unseal_from(c, "127.0.0.2", U_LEGIT, blob)
        legit.append(rcl == OK and out == data)
        if len(legit) >= 60:
            break
    th.join()
    a = res.get("a", {})
    a_served = a.get("NotFound", 0)
    print(f"FIGURE A: hammer {a}; legitimate unseals from the same address: "
          f"{sum(legit)}/{len(legit)} OK ({time.time() - t0:.1f}s)")
    check(all(legit) and len(legit) >= 10,
          "NAT: every legitimate unseal from the hammered address is served with its bytes")
    check(a_served <= PER_ADDR_FAILS + SLACK and a.get("Unavailable", 0) >= 120 - PER_ADDR_FAILS - SLACK,
          f"NAT: the failing unseals are refused after ~{PER_ADDR_FAILS} per minute ({a})")
    check(time.time() - t0 < 60, "scenario A under 60 s")

    # --- B: rotating source addresses, 127.0.0.3 .. 127.0.0.14
    t0 = time.time()
    srcs = ",".join(f"127.0.0.{i}" for i in range(3, 15))
    b = burst(c, "-n", "500", "-uuid", U_LEGIT, "-blob", bad, "-sources", srcs, "-parallel", "4")
    b_served = b.get("NotFound", 0)
    print(f"FIGURE B: 500 failing unseals over 12 addresses: {b}; "
          f"failures served in the window: {a_served + b_served} (global bound {GLOBAL_FAILS})")
    # The windows count every failing attempt, refused or not (A's 120 too).
    check(a_served + b_served <= GLOBAL_FAILS + SLACK,
          f"rotating addresses: at most the global bound of failures is served ({a_served}+{b_served})")
    check(b.get("Unavailable", 0) >= 500 - GLOBAL_FAILS - SLACK, "the rest is refused (UNAVAILABLE)")
    rcl, out, _ = unseal_from(c, "127.0.0.9", U_LEGIT, blob)
    check(rcl == OK and out == data, "a valid unseal is served while the global bound is reached")
    m = metrics(c)
    lim = metric(m, "kmsd_unseal_limited_total")
    check(lim is not None and lim >= 300, f"the limiter's refusals have their own metric ({lim})")
    with open(os.path.join(c.dir, "node1", "kmsd.log"), errors="replace") as f:
        lines = [l for l in f if "refused by the limiter" in l]
    check(0 < len(lines) <= 10 and '"level":"warn"' in lines[0],
          f"limiter refusals are logged at warn level, rate-limited ({len(lines)} lines for {lim})")
    check(time.time() - t0 < 60, "scenario B under 60 s")

    # --- C: seal flood from one address over 40 node UUIDs
    t0 = time.time()
    cs = burst(c, "-seal", "-n", "400", "-uuids", ",".join(FLOOD_UUIDS), "-sources", "127.0.0.5",
               "-parallel", "4")
    print(f"FIGURE C: 400-seal flood from one address: {cs}")
    check(cs.get("OK", 0) == SEALS_PER_ADDR and cs.get("ResourceExhausted", 0) == 400 - SEALS_PER_ADDR,
          f"seal flood capped at {SEALS_PER_ADDR} per address and minute, rest RESOURCE_EXHAUSTED")
    # per node UUID: live keys, then rate
    rcs = []
    blobs = []
    for k in range(6):
        rc, b1, _, err = seal_from(c, "127.0.0.6", U_REC)
        rcs.append(rc)
        if rc == OK:
            blobs.append(b1)
    check(rcs == [OK] * RECORDS_PER_UUID + [RESOURCE_EXHAUSTED],
          f"at most {RECORDS_PER_UUID} live keys per node UUID ({rcs}): {err[:120]}")
    check("live keys" in err, "the refusal says why: " + err[:140])
    kid = base64.b64decode(blobs[0])[1:17].hex()
    p = c.ctl(1, "keys", "revoke", kid)
    check(p.returncode == 0, "revoke one of them")
    rc, _, _, err = seal_from(c, "127.0.0.6", U_REC)
    check(rc == OK, f"after a revoke the node UUID may seal again ({err[:80]})")
    rcs = [seal_from(c, "127.0.0.7", U_REC)[0] for _ in range(2)]
    check(rcs == [RESOURCE_EXHAUSTED] * 2, f"then the live-key quota again, and the rate ({rcs})")
    m = metrics(c)
    check('kmsd_seal_quota_refused_total{quota="address_rate"} 370' in m and
          'quota="node_rate"} 1' in m and 'quota="node_records"} 2' in m,
          "the quota refusals are counted per quota: " +
          " ".join(l for l in m.splitlines() if "quota=" in l))
    check(time.time() - t0 < 60, "scenario C under 60 s")

    # --- D: keys list pages
    p = c.ctl(1, "keys", "list", "-o", "json")
    p3 = c.ctl(1, "keys", "list", "-o", "json", "--page-size", "3")
    try:
        full, paged = json.loads(p.stdout)["keys"], json.loads(p3.stdout)["keys"]
    except (ValueError, KeyError):
        full, paged = None, None
        print(p.stdout[:300], p.stderr, p3.stdout[:300], p3.stderr)
    n_full = len(full) if isinstance(full, list) else -1
    check(n_full >= 30, f"keys list shows every key ({n_full})")
    check(isinstance(paged, list) and [k["key_id"] for k in paged] == [k["key_id"] for k in full],
          f"keys list --page-size 3 fetches {n_full // 3 + 1} pages and shows the same keys in order")
    p = c.ctl(1, "keys", "list", "--node-uuid", U_REC, "-o", "json", "--page-size", "2")
    check(p.returncode == 0 and p.stdout.count(U_REC) == RECORDS_PER_UUID + 1,
          "keys list --node-uuid pages too")

    # --- E: enrolment policy on Unseal
    rcl, _, err = unseal_from(c, "127.0.0.20", U_LEGIT, blob)
    check(rcl == PERMISSION_DENIED and "enrolment policy" in err,
          f"unseal from outside allowedCIDRs -> PERMISSION_DENIED ({err[:100]})")
    rc, _, _, err = seal_from(c, "127.0.0.20", U_OTHER)
    check(rc == PERMISSION_DENIED and "enrolment policy" in err,
          "seal from outside allowedCIDRs -> PERMISSION_DENIED")
    rcl, _, err = unseal_from(c, "127.0.0.1", str(uuidlib.uuid4()), blob)
    check(rcl == PERMISSION_DENIED and "enrolment policy" in err,
          f"unseal with a UUID outside uuidAllowList -> PERMISSION_DENIED ({err[:100]})")
    rc, _, _, err = seal_from(c, "127.0.0.1", str(uuidlib.uuid4()))
    check(rc == PERMISSION_DENIED, "seal with a UUID outside uuidAllowList -> PERMISSION_DENIED")
    rcl, out, _ = unseal_from(c, "127.0.0.1", U_LEGIT, blob)
    check(rcl == OK and out == data, "an allowed node still unseals")
    m = metrics(c)
    check('kmsd_policy_denied_total{method="Unseal"} 2' in m, "policy refusals of Unseal counted")


if __name__ == "__main__":
    main()
