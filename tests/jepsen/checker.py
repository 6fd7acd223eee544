#!/usr/bin/python3
"""Checker for kmsd Jepsen histories (docs/reliability.md "What it does").

Inputs (in a run directory, or given as lists to check()):
  history.jsonl  workload events: invoke / ok / fail / info (client.py)
  final.jsonl    final-phase unseals of every acked seal via every node
  nemesis.jsonl  fault events; {"kind": "window", "phase": "start"|"end"}
  keys.json      `kmsctl keys list -o json` after the final phase (optional)

Safety (each must be 0):
  lost_seals        an acked seal that, after heal + recovery, does not
                    unseal to its bytes via some node (NOT_FOUND, missing from
                    keys list, or refused although no revoke was invoked), or a
                    NOT_FOUND answered to an unseal invoked later than the
                    seal's ack + lease bound
  wrong_unseals     an unseal answered OK with other bytes; a forged
                    (bit-flipped) blob answered OK
  stale_revoked     an unseal answered OK that was invoked later than
                    bound after a revoke's ack, or later than bound after
                    another unseal of that key completed PERMISSION_DENIED
  duplicates        more than one record for an acked seal's node_uuid, a
                    record for a seal that definitely failed, a record
                    nobody sealed, or a repeated key id
  spurious_denied   PERMISSION_DENIED for a key whose revoke was never invoked
  false_failures    a revoke answered with a definite error (AlreadyExists,
                    NotFound, ...) whose key is nevertheless seen revoked
  split_brain       two nodes reported leader in the same term (status.jsonl,
                    polled every 0.5 s by the runner)
Liveness (reported; the runner decides what fails):
  availability      % of Talos ops invoked in the fault window answered
                    definitely (OK, or PERMISSION_DENIED after a revoke)
  seal_gap_s        longest time without a successful seal completion
  failed_unseals    unseals (multi-endpoint client) not answered definitely
  final_unverified  final-phase (key, node) pairs that never got an answer
"""
import json
import os
import sys

INF = float("inf")


def load_jsonl(path):
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass   # a torn last line of a killed writer
    return out


def pair_ops(events):
    """Pairs invokes with completions per process (one op in flight each).
    Returns ops: dict(f, process, invoke_t, complete_t, type, ...)."""
    open_ = {}
    ops = []
    for e in events:
        typ = e.get("type")
        p = e.get("process")
        if typ == "invoke":
            op = dict(e)
            op["invoke_t"] = e["t"]
            op["complete_t"] = None
            op["type"] = "info"    # no completion = indeterminate
            open_[p] = op
            ops.append(op)
        elif typ in ("ok", "fail", "info"):
            op = open_.pop(p, None)
            if op is None:
                continue
            for k, v in e.items():
                if k not in ("t", "type"):
                    op[k] = v
            op["type"] = typ
            op["complete_t"] = e["t"]
    return ops


def check(history, final=(), nemesis=(), keys=None, lease_bound_ms=1000, status=()):
    bound = int(lease_bound_ms * 1e6)
    ops = pair_ops(history)
    finals = pair_ops(final)
    v = {"lost_seals": [], "wrong_unseals": [], "stale_revoked": [], "duplicates": [],
         "spurious_denied": []}

    seals = {}          # key_id -> seal op (ok)
    seal_by_uuid = {}
    for op in ops:
        if op["f"] == "seal":
            seal_by_uuid.setdefault(op["uuid"], []).append(op)
            if op["type"] == "ok":
                if op["key_id"] in seals:
                    v["duplicates"].append({"why": "key id returned twice", "key_id": op["key_id"]})
                seals[op["key_id"]] = op
    revokes = {}        # key_id -> list of revoke ops (ok or info)
    revoke_ack = {}     # key_id -> earliest ack time
    for op in ops:
        if op["f"] == "revoke" and op["type"] in ("ok", "info"):
            revokes.setdefault(op["key_id"], []).append(op)
            if op["type"] == "ok" and op["code"] == "OK":
                t = op["complete_t"]
                revoke_ack[op["key_id"]] = min(revoke_ack.get(op["key_id"], INF), t)
    # A revoke answered with a definite server error (not "connection
    # refused"): it must not have taken effect. If the key is later seen
    # revoked and no other revoke of it was invoked, the answer was false:
    # counted as false_failures, and the key is treated as revoked so the
    # same fact is not counted again as lost/denied.
    refused_revokes = {}
    for op in ops:
        if op["f"] == "revoke" and op["type"] == "fail" and op.get("code") not in (
                "Unavailable", "LOCAL", None):
            refused_revokes.setdefault(op["key_id"], []).append(op)
    revoke_invoked = {k: min(o["invoke_t"] for o in l) for k, l in revokes.items()}

    unseals = [op for op in ops if op["f"] in ("unseal", "forged")] + \
              [dict(op, f="final") for op in finals]
    # earliest completion of a definite "revoked" answer per key
    denied_at = {}
    for op in unseals:
        if op["f"] != "forged" and op["type"] == "ok" and op.get("code") == "PERMISSION_DENIED":
            denied_at[op["key_id"]] = min(denied_at.get(op["key_id"], INF), op["complete_t"])

    v["false_failures"] = []
    for kid, rl in refused_revokes.items():
        if kid in revokes:
            continue
        seen = [op for op in unseals if op["key_id"] == kid and op["f"] != "forged"
                and op["type"] == "ok" and op.get("code") == "PERMISSION_DENIED"
                and op["complete_t"] > rl[0]["invoke_t"]]
        if seen:
            v["false_failures"].append({"why": "revoke answered with an error, yet the key is revoked",
                                        "key_id": kid, "code": rl[0].get("code"),
                                        "detail": rl[0].get("detail"),
                                        "revoke_invoke_t": rl[0]["invoke_t"],
                                        "first_denied_t": min(o["complete_t"] for o in seen)})
            revokes[kid] = rl
            revoke_invoked[kid] = rl[0]["invoke_t"]

    for op in unseals:
        if op["type"] != "ok":
            continue
        kid, code = op["key_id"], op.get("code")
        s = seals.get(kid)
        brief = {"f": op["f"], "key_id": kid, "process": op.get("process"), "node": op.get("node"),
                 "invoke_t": op["invoke_t"], "complete_t": op["complete_t"], "code": code}
        if op["f"] == "forged":
            if code == "OK":
                v["wrong_unseals"].append(dict(brief, why="forged blob answered OK"))
            continue
        if code == "OK":
            if s is None or op.get("data") != s["data"]:
                v["wrong_unseals"].append(dict(brief, why="OK with other bytes",
                                               got=op.get("data"),
                                               want=s and s["data"]))
            ack = revoke_ack.get(kid)
            if ack is not None and op["invoke_t"] > ack + bound:
                v["stale_revoked"].append(dict(brief, why="OK after revoke ack + bound",
                                               revoke_ack_t=ack,
                                               late_ms=(op["invoke_t"] - ack) / 1e6))
            d = denied_at.get(kid)
            if d is not None and op["invoke_t"] > d + bound:
                v["stale_revoked"].append(dict(brief, why="OK after a PERMISSION_DENIED + bound",
                                               denied_t=d, late_ms=(op["invoke_t"] - d) / 1e6))
        elif code == "PERMISSION_DENIED":
            if kid not in revokes:
                v["spurious_denied"].append(dict(brief, why="denied, no revoke invoked"))
            elif op["complete_t"] < revoke_invoked[kid]:
                v["spurious_denied"].append(dict(brief, why="denied before any revoke invoked"))
        elif code == "NOT_FOUND":
            if s is not None and op["invoke_t"] > s["complete_t"] + bound:
                v["lost_seals"].append(dict(brief, why="NOT_FOUND after seal ack + bound",
                                            seal_ack_t=s["complete_t"]))

    # final phase: every acked seal via every node
    final_ok = {}       # (key, node) -> list of codes
    nodes = sorted({op.get("node") for op in finals if op.get("node") is not None})
    for op in finals:
        if op["type"] == "ok":
            final_ok.setdefault((op["key_id"], op["node"]), []).append(op.get("code"))
    unverified = []
    for kid, s in seals.items():
        for n in nodes:
            codes = final_ok.get((kid, n))
            if not codes:
                unverified.append({"key_id": kid, "node": n})
                continue
            if kid not in revokes and "OK" not in codes:
                v["lost_seals"].append({"why": "final unseal did not return the bytes",
                                        "key_id": kid, "node": n, "codes": codes,
                                        "seal_ack_t": s["complete_t"]})

    # records in the store vs. the history
    if keys is not None:
        recs = {}
        ids = {}
        for r in keys:
            recs.setdefault(r.get("node_uuid"), []).append(r)
            ids[r.get("key_id")] = ids.get(r.get("key_id"), 0) + 1
        for kid, c in ids.items():
            if c > 1:
                v["duplicates"].append({"why": "key id listed twice", "key_id": kid, "count": c})
        for uuid, rl in recs.items():
            sl = seal_by_uuid.get(uuid)
            if not sl:
                v["duplicates"].append({"why": "record nobody sealed", "uuid": uuid})
                continue
            if len(rl) > 1:
                v["duplicates"].append({"why": "several records for one seal", "uuid": uuid,
                                        "count": len(rl)})
            if all(o["type"] == "fail" for o in sl):
                v["duplicates"].append({"why": "record for a seal that definitely failed",
                                        "uuid": uuid})
        for kid, s in seals.items():
            rl = recs.get(s["uuid"], [])
            if not any(r.get("key_id") == kid for r in rl):
                v["lost_seals"].append({"why": "acked seal missing from keys list",
                                        "key_id": kid, "uuid": s["uuid"]})

    # liveness
    win = [e["t"] for e in nemesis if e.get("kind") == "window"]
    w0, w1 = (min(win), max(win)) if len(win) >= 2 else (None, None)
    talos_ops = [op for op in ops if op["f"] in ("seal", "unseal")]

    def definite(op):
        if op["type"] != "ok":
            return False
        if op.get("code") == "OK":
            return True
        return op.get("code") == "PERMISSION_DENIED" and op.get("key_id") in revokes

    in_win = [op for op in talos_ops if w0 is not None and w0 <= op["invoke_t"] <= w1]
    avail = 100.0 * sum(definite(op) for op in in_win) / len(in_win) if in_win else None
    seal_done = sorted(op["complete_t"] for op in ops if op["f"] == "seal" and op["type"] == "ok")
    starts = [op["invoke_t"] for op in talos_ops]
    gap = 0.0
    if starts:
        ends = [e["t"] for e in history if e.get("type") == "end"]
        t_end = max(ends) if ends else max(op["complete_t"] or op["invoke_t"] for op in talos_ops)
        pts = [min(starts)] + seal_done + [t_end]
        gap = max((b - a) for a, b in zip(pts, pts[1:])) / 1e9
    failed_unseals = [op for op in ops if op["f"] == "unseal" and not definite(op)]
    failed_codes = {}
    for op in failed_unseals:
        failed_codes[op.get("code") or op["type"]] = failed_codes.get(op.get("code") or op["type"], 0) + 1

    # split brain: two nodes reporting leader in one term (status poller)
    v["split_brain"] = []
    leaders = {}
    for st in status:
        if st.get("role") == "leader" and st.get("term") is not None:
            leaders.setdefault(st["term"], set()).add(st["node"])
    for term, ns in sorted(leaders.items()):
        if len(ns) > 1:
            v["split_brain"].append({"term": term, "leaders": sorted(ns)})

    counts = {k: len(x) for k, x in v.items()}
    return {
        "valid": all(c == 0 for c in counts.values()),
        "counts": counts,
        "violations": {k: x[:20] for k, x in v.items()},
        "ops": len(talos_ops),
        "ops_by_type": {t: sum(1 for op in ops if op["type"] == t) for t in ("ok", "fail", "info")},
        "acked_seals": len(seals),
        "revokes_acked": len(revoke_ack),
        "window_ops": len(in_win),
        "availability": None if avail is None else round(avail, 1),
        "seal_gap_s": round(gap, 2),
        "failed_unseals": len(failed_unseals),
        "failed_unseal_codes": failed_codes,
        "final_nodes": nodes,
        "final_unverified": len(unverified),
        "final_unverified_sample": unverified[:10],
        "lease_bound_ms": lease_bound_ms,
    }


def check_dir(d, lease_bound_ms=1000):
    keys = None
    kp = os.path.join(d, "keys.json")
    if os.path.exists(kp):
        with open(kp) as f:
            keys = json.load(f).get("keys", [])
    return check(load_jsonl(os.path.join(d, "history.jsonl")),
                 load_jsonl(os.path.join(d, "final.jsonl")),
                 load_jsonl(os.path.join(d, "nemesis.jsonl")), keys, lease_bound_ms,
                 load_jsonl(os.path.join(d, "status.jsonl")))


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="check a kmsd Jepsen run directory")
    ap.add_argument("dir")
    ap.add_argument("--lease-bound-ms", type=float, default=1000)
    a = ap.parse_args()
    r = check_dir(a.dir, a.lease_bound_ms)
    print(json.dumps(r, indent=1))
    sys.exit(0 if r["valid"] else 1)
