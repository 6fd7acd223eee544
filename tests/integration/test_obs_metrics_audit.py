#!/usr/bin/python3
"""Metrics and the hash-chained audit log on a real three-node cluster
(real raft, RocksDB, mutual TLS, the Go Talos-like client). Ports
31600-31639.

- /metrics of every node parses strictly (exposition format 0.0.4): every
  sample's family has exactly one HELP and one TYPE before its samples,
  families are not interleaved, counters end in _total, code labels are
  gRPC code names, histogram buckets are cumulative, monotonic and end in
  +Inf = _count; the Talos histogram's _count and kmsd_requests_total equal
  the Seals and Unseals this test made; the leader timed the follower's
  forwarded Seals (Forward) and its raft applies;
- docs/metrics.md lists exactly the metric families served (any difference
  fails); promtool check metrics too when promtool is at hand;
- audit: operator calls, reads included (status, members list, keys list,
  keys show, snapshot save, a failing keys show), each get one line after
  the outcome with its result; kmsctl audit verify: intact = exit 0; one
  edited / deleted / first / torn line = exit 1 naming that line; a restart
  continues the chain ("audit log reopened", seq goes on).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import Cluster, check, finish, KMSCTL, SRC  # noqa: E402

BASE = 31600
SEALS = 6
UNSEALS = 4
GRPC_NAMES = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
              "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
              "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
              "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def scrape(c, i):
    with urllib.request.urlopen(f"http://127.0.0.1:{c.port(i, 3)}/metrics", timeout=10) as r:
        ctype = r.headers.get("Content-Type", "")
        return ctype, r.read().decode()


def parse_labels(s):
    out, pos = {}, 0
    while pos < len(s):
        m = LABEL.match(s, pos)
        if not m:
            raise ValueError(f"bad labels {s!r}")
        out[m.group(1)] = m.group(2)
        pos = m.end()
    return out


def parse(text):
    """Strict parse. Returns (families {name: {type, help, samples:[(name, labels, v)]}},
    errors [str])."""
    fams, errs, order, cur = {}, [], [], None
    for n, line in enumerate(text.split("\n"), 1):
        if line == "":
            if n != len(text.split("\n")):
                errs.append(f"line {n}: empty line")
            continue
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            if len(parts) < 4 or not parts[3]:
                errs.append(f"line {n}: {parts[1]} without text")
                continue
            name = parts[2]
            f = fams.setdefault(name, {"type": None, "help": None, "samples": []})
            key = "help" if parts[1] == "HELP" else "type"
            if f[key] is not None:
                errs.append(f"line {n}: second {parts[1]} for {name}")
            if f["samples"]:
                errs.append(f"line {n}: {parts[1]} for {name} after its samples")
            f[key] = parts[3]
            if name not in order:
                order.append(name)
            cur = name
            continue
        if line.startswith("#"):
            errs.append(f"line {n}: unexpected comment {line!r}")
            continue
        m = SAMPLE.match(line)
        if not m:
            errs.append(f"line {n}: not a sample: {line!r}")
            continue
        sname, labels, value = m.group(1), m.group(3) or "", m.group(4)
        try:
            lab = parse_labels(labels)
            v = float(value)
        except ValueError as e:
            errs.append(f"line {n}: {e}")
            continue
        fam = sname
        if cur and fams[cur]["type"] == "histogram":
            fam = re.sub(r"_(bucket|sum|count)$", "", sname)
        if fam != cur:
            errs.append(f"line {n}: sample {sname} outside its family block (current {cur})")
            continue
        fams[fam]["samples"].append((sname, lab, v))
    for name, f in fams.items():
        if f["help"] is None or f["type"] is None:
            errs.append(f"{name}: HELP or TYPE missing")
        if f["type"] not in ("counter", "gauge", "histogram"):
            errs.append(f"{name}: type {f['type']}")
        if f["type"] == "counter" and not name.endswith("_total"):
            errs.append(f"{name}: counter without _total")
        if f["type"] != "counter" and name.endswith("_total"):
            errs.append(f"{name}: _total on a {f['type']}")
        for sname, lab, v in f["samples"]:
            if "code" in lab and lab["code"] not in GRPC_NAMES:
                errs.append(f"{name}: code label {lab['code']!r} is not a gRPC code name")
            if f["type"] == "counter" and v < 0:
                errs.append(f"{name}: negative counter")
        if f["type"] == "histogram":
            errs.extend(check_hist(name, f["samples"]))
    return fams, errs


def check_hist(name, samples):
    errs, series = [], {}
    for sname, lab, v in samples:
        key = tuple(sorted((k, x) for k, x in lab.items() if k != "le"))
        s = series.setdefault(key, {"buckets": [], "sum": None, "count": None})
        if sname == name + "_bucket":
            if "le" not in lab:
                errs.append(f"{name}: bucket without le")
                continue
            s["buckets"].append((float("inf") if lab["le"] == "+Inf" else float(lab["le"]), v))
        elif sname == name + "_sum":
            s["sum"] = v
        elif sname == name + "_count":
            s["count"] = v
        else:
            errs.append(f"{name}: stray sample {sname}")
    if not series:
        errs.append(f"{name}: no series")
    for key, s in series.items():
        b = s["buckets"]
        les = [x for x, _ in b]
        if not b or les[-1] != float("inf"):
            errs.append(f"{name}{key}: no +Inf bucket last")
            continue
        if les != sorted(les) or len(set(les)) != len(les):
            errs.append(f"{name}{key}: le not strictly increasing")
        vals = [v for _, v in b]
        if any(vals[i] > vals[i + 1] for i in range(len(vals) - 1)):
            errs.append(f"{name}{key}: buckets not monotonic {vals}")
        if s["count"] is None or s["sum"] is None:
            errs.append(f"{name}{key}: _sum or _count missing")
        elif s["count"] != vals[-1]:
            errs.append(f"{name}{key}: _count {s['count']} != +Inf bucket {vals[-1]}")
    return errs


def value(fams, fam, sname=None, **labels):
    """Sum of the samples of fam (sample name sname) whose labels include labels."""
    tot = 0.0
    for n, lab, v in fams.get(fam, {}).get("samples", []):
        if n == (sname or fam) and all(lab.get(k) == x for k, x in labels.items()):
            tot += v
    return tot


def documented_metrics():
    text = open(os.path.join(SRC, "docs", "metrics.md")).read()
    return set(re.findall(r"^\| `(kmsd_[a-z0-9_]+)` \|", text, re.M))


def audit_lines(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def verify(path, *extra):
    p = subprocess.run([KMSCTL, "audit", "verify", *extra, path], capture_output=True,
                       text=True, timeout=30)
    return p.returncode, p.stdout + p.stderr


def main():
    c = Cluster(nodes=3, base=BASE)
    try:
        run(c)
    finally:
        c.down()
    finish()


def run(c):
    c.up()
    c.init()
    leader = c.wait_leader()
    check(leader is not None, f"a leader ({leader})")
    follower = next(i for i in (1, 2, 3) if i != leader)
    other = next(i for i in (1, 2, 3) if i not in (leader, follower))

    # Talos traffic: Seals through a follower (forwarded), Unseals on another node.
    blobs = []
    for k in range(SEALS):
        rc, blob, _ = c.seal(c.talos(follower), f"0000000{k}-1111-2222-3333-444444444444")
        check(rc == 0, f"seal {k} via follower {follower}")
        blobs.append((f"0000000{k}-1111-2222-3333-444444444444", blob))
    for uuid, blob in blobs[:UNSEALS]:
        rc, _ = c.unseal(c.talos(other), uuid, blob)
        check(rc == 0, f"unseal via node {other}")

    served = set()
    fams_by = {}
    for i in (1, 2, 3):
        ctype, text = scrape(c, i)
        check(ctype.startswith("text/plain; version=0.0.4"), f"node {i}: content type {ctype}")
        fams, errs = parse(text)
        check(not errs, f"node {i}: /metrics parses strictly ({len(fams)} families)"
              + ("" if not errs else ": " + "; ".join(errs[:8])))
        served |= set(fams)
        fams_by[i] = fams
    total_seal = sum(value(f, "kmsd_requests_total", method="Seal") for f in fams_by.values())
    total_unseal = sum(value(f, "kmsd_requests_total", method="Unseal")
                       for f in fams_by.values())
    hseal = sum(value(f, "kmsd_request_duration_seconds", "kmsd_request_duration_seconds_count",
                      method="Seal") for f in fams_by.values())
    hunseal = sum(value(f, "kmsd_request_duration_seconds",
                        "kmsd_request_duration_seconds_count", method="Unseal")
                  for f in fams_by.values())
    check(total_seal == SEALS and hseal == SEALS,
          f"Seal: kmsd_requests_total {total_seal:g}, histogram _count {hseal:g} == {SEALS}")
    check(total_unseal == UNSEALS and hunseal == UNSEALS,
          f"Unseal: kmsd_requests_total {total_unseal:g}, _count {hunseal:g} == {UNSEALS}")
    ok_seal = value(fams_by[follower], "kmsd_requests_total", method="Seal", code="OK")
    check(ok_seal == SEALS, f"follower's Seals labelled code=\"OK\" ({ok_seal:g})")
    fwd = value(fams_by[leader], "kmsd_forward_duration_seconds",
                "kmsd_forward_duration_seconds_count")
    fwd_calls = value(fams_by[leader], "kmsd_cluster_requests_total", method="Forward")
    check(fwd >= SEALS and fwd == fwd_calls,
          f"leader timed the forwarded Seals: Forward _count {fwd:g} == "
          f"kmsd_cluster_requests_total{{method=Forward}} {fwd_calls:g} >= {SEALS}")
    applies = value(fams_by[leader], "kmsd_raft_apply_duration_seconds",
                    "kmsd_raft_apply_duration_seconds_count")
    check(applies >= SEALS, f"leader's raft apply histogram counted {applies:g} >= {SEALS}")
    check(value(fams_by[leader], "kmsd_raft_elections_won_total") >= 1 and
          value(fams_by[leader], "kmsd_raft_elections_total") >= 1,
          "leader counted its election")
    check(all(value(f, "kmsd_initialized") == 1 and value(f, "kmsd_sealed") == 0 and
              value(f, "kmsd_unseal_progress") == value(f, "kmsd_unseal_threshold") == 3
              for f in fams_by.values()),
          "initialized 1, sealed 0, unseal progress 3 of 3 everywhere")
    exp = [lab for _, lab, v in fams_by[1]["kmsd_certificate_expiry_timestamp_seconds"]
           ["samples"] if v > 1.7e9]
    check({l["certificate"] for l in exp} == {"node", "talos", "cluster_ca", "operator_ca"},
          f"certificate expiry for every configured certificate ({len(exp)})")
    check(len(fams_by[1]["kmsd_build_info"]["samples"]) == 1, "build info")

    docs = documented_metrics()
    check(docs == served, "docs/metrics.md lists exactly the served metrics"
          + ("" if docs == served else f": undocumented {sorted(served - docs)}, "
             f"documented but not served {sorted(docs - served)}"))

    promtool = os.environ.get("KMS_PROMTOOL") or shutil.which("promtool")
    if promtool:
        _, text = scrape(c, leader)
        p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
        check(p.returncode == 0, f"promtool check metrics: {(p.stdout + p.stderr).strip()[:300]}")
    else:
        print("[info] promtool not found: promtool check metrics not run")

    # ---- audit ------------------------------------------------------------
    n = leader
    path = os.path.join(c.dir, f"node{n}", "data", "audit.log")
    before = len(audit_lines(path))
    key = json.loads(c.ctl(n, "keys", "list", "-o", "json").stdout)["keys"][0]["key_id"]
    calls = [
        (("status",), "Status", "ok"),
        (("operator", "members", "list"), "MembersList", "ok"),
        (("keys", "list"), "KeysList", "ok"),
        (("keys", "show", key), "KeysShow", "ok"),
        (("keys", "show", "0" * 32), "KeysShow", "NOT_FOUND"),
        (("operator", "snapshot", "save", os.path.join(c.dir, "snap.kmsd")), "SnapshotEnd",
         "ok"),
    ]
    for args, _, _ in calls:
        c.ctl(n, *args)
    lines = audit_lines(path)[before:]
    ops = [(l.get("op"), l.get("result")) for l in lines if l.get("msg") == "operator"]
    for args, op, result in calls:
        check((op, result) in ops, f"audit line for {' '.join(args[:2])}: op {op} result {result}")
    check(("SnapshotBegin", "ok") in ops and not any(o == "SnapshotChunk" for o, _ in ops),
          "snapshot save: Begin and End audited, chunks not")
    check(all("seq" in l and re.fullmatch("[0-9a-f]{64}", l.get("prev", "")) for l in lines),
          "every audit line carries seq and prev")
    rc, out = verify(path)
    check(rc == 0 and "intact" in out, f"audit verify on the live file: rc {rc}: {out.strip()}")

    total = len(audit_lines(path))
    tamper = os.path.join(c.dir, "tamper.log")
    raw = open(path).read().split("\n")[:total]

    def tampered(mod):
        with open(tamper, "w") as f:
            f.write(mod)
        return verify(tamper)

    edited = list(raw)
    edited[4] = edited[4].replace('"level":"info"', '"level":"inf0"', 1)
    rc, out = tampered("\n".join(edited) + "\n")
    check(rc == 1 and "line 5:" in out, f"one edited line (5): rc {rc}: {out.strip()}")
    rc, out = tampered("\n".join(raw[:4] + raw[5:]) + "\n")
    check(rc == 1 and "line 5:" in out and "missing" in out,
          f"one deleted line (5): rc {rc}: {out.strip()}")
    rc, out = tampered("\n".join(raw[1:]) + "\n")
    check(rc == 1 and "line 1:" in out, f"first line deleted: rc {rc}: {out.strip()}")
    rc, out = tampered("\n".join(raw)[:-40])
    check(rc == 1 and f"line {total}:" in out and "torn" in out,
          f"truncated inside the last line ({total}): rc {rc}: {out.strip()}")
    rc, out = verify(tamper, "-o", "json")
    try:
        js = json.loads(out)
    except ValueError:
        js = {}
    check(rc == 1 and js.get("intact") is False and js.get("broken_line") == total,
          f"-o json names the broken line: {js}")

    # ---- restart continues the chain ---------------------------------------
    last_seq = int(audit_lines(path)[-1]["seq"])
    c.local("stop-node", str(n))
    c.local("start-node", str(n))
    after = audit_lines(path)
    reopen = [l for l in after if l.get("msg") == "audit log reopened"]
    check(len(reopen) == 1 and int(reopen[0]["seq"]) == last_seq + 1,
          f"restart: one 'audit log reopened' line with seq {last_seq + 1}")
    c.ctl(n, "status")
    rc, out = verify(path)
    check(rc == 0 and "intact" in out, f"audit verify after the restart: rc {rc}: {out.strip()}")
    rc, out = verify(os.path.join(c.dir, "nope.log"))
    check(rc == 1 and "cannot open" in out, f"missing file: rc {rc}")


if __name__ == "__main__":
    main()
