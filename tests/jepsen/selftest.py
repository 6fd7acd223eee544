#!/usr/bin/python3
"""Checker self-test: hand-made histories that must pass, and corrupted ones
(lost seal, wrong bytes, stale revoked unseal, forged OK, duplicate record,
NOT_FOUND after ack, spurious denial) that must fail with the right counter."""
import copy
import sys
import os

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checker  # noqa: E402

MS = 1_000_000
A, B = "aa" * 16, "bb" * 16
DA, DB = "01" * 32, "02" * 32


def ev(t, typ, f, p, **kw):
    return dict(t=t * MS, type=typ, f=f, process=p, **kw)


def base():
    h = [
        ev(0, "invoke", "seal", 1, uuid="u1", data=DA),
        ev(10, "ok", "seal", 1, uuid="u1", code="OK", blob="x", key_id=A),
        ev(5, "invoke", "seal", 2, uuid="u2", data=DB),
        ev(20, "ok", "seal", 2, uuid="u2", code="OK", blob="y", key_id=B),
        ev(30, "invoke", "seal", 3, uuid="u3", data=DB),
        ev(40, "fail", "seal", 3, uuid="u3", code="UNAVAILABLE"),
        ev(50, "invoke", "unseal", 1, uuid="u1", key_id=A),
        ev(60, "ok", "unseal", 1, uuid="u1", key_id=A, code="OK", data=DA),
        ev(70, "invoke", "forged", 2, uuid="u2", key_id=B),
        ev(80, "ok", "forged", 2, uuid="u2", key_id=B, code="PERMISSION_DENIED"),
        ev(100, "invoke", "revoke", 900, key_id=B, uuid="u2"),
        ev(200, "ok", "revoke", 900, key_id=B, uuid="u2", code="OK"),
        # a stale OK inside the lease bound is allowed
        ev(300, "invoke", "unseal", 2, uuid="u2", key_id=B),
        ev(310, "ok", "unseal", 2, uuid="u2", key_id=B, code="OK", data=DB),
        ev(1300, "invoke", "unseal", 2, uuid="u2", key_id=B),
        ev(1310, "ok", "unseal", 2, uuid="u2", key_id=B, code="PERMISSION_DENIED"),
        # a NOT_FOUND right after the ack (lagging follower) is allowed
        ev(11, "invoke", "unseal", 3, uuid="u1", key_id=A),
        ev(12, "ok", "unseal", 3, uuid="u1", key_id=A, code="NOT_FOUND"),
        ev(2000, "end", "client", -1),
    ]
    final = []
    t = 3000
    for node in (1, 2, 3):
        final += [ev(t, "invoke", "final", 10 + node, key_id=A, uuid="u1", node=node),
                  ev(t + 1, "ok", "final", 10 + node, key_id=A, uuid="u1", node=node, code="OK", data=DA),
                  ev(t + 2, "invoke", "final", 10 + node, key_id=B, uuid="u2", node=node),
                  ev(t + 3, "ok", "final", 10 + node, key_id=B, uuid="u2", node=node,
                     code="PERMISSION_DENIED")]
        t += 10
    nem = [dict(t=0, kind="window", phase="start"), dict(t=1500 * MS, kind="window", phase="end")]
    keys = [{"key_id": A, "node_uuid": "u1"}, {"key_id": B, "node_uuid": "u2"}]
    return h, final, nem, keys


def run(name, mutate, want):
    h, final, nem, keys = copy.deepcopy(base())
    mutate(h, final, nem, keys)
    r = checker.check(h, final, nem, keys, lease_bound_ms=1000)
    bad = [k for k, c in r["counts"].items() if c]
    ok = (want is None and r["valid"]) or (want is not None and want in bad)
    print(f"[{'ok  ' if ok else 'FAIL'}] {name}: counts={r['counts']}")
    return ok


def m_none(h, f, n, k):
    pass


def m_lost(h, f, n, k):
    for e in f:
        if e["key_id"] == A and e["type"] == "ok" and e["node"] == 2:
            e["code"] = "NOT_FOUND"
            e.pop("data")


def m_lost_keys(h, f, n, k):
    del k[0]


def m_wrong(h, f, n, k):
    h[7]["data"] = DB


def m_wrong_final(h, f, n, k):
    f[1]["data"] = "ff" * 32


def m_forged(h, f, n, k):
    h[9]["code"] = "OK"
    h[9]["data"] = DB


def m_stale(h, f, n, k):
    h[15]["code"] = "OK"
    h[15]["data"] = DB


def m_stale_final(h, f, n, k):
    f[3]["code"] = "OK"
    f[3]["data"] = DB


def m_after_denied(h, f, n, k):
    # revoke outcome unknown, but a later read saw it: no going back
    h[11]["type"] = "info"
    h[11]["code"] = "DEADLINE_EXCEEDED"
    f[3]["code"] = "OK"
    f[3]["data"] = DB


def m_dup(h, f, n, k):
    k.append({"key_id": "cc" * 16, "node_uuid": "u1"})


def m_phantom(h, f, n, k):
    k.append({"key_id": "dd" * 16, "node_uuid": "u3"})


def m_notfound_late(h, f, n, k):
    h[16]["t"] = 1100 * MS
    h[17]["t"] = 1101 * MS


def m_spurious(h, f, n, k):
    h[7]["code"] = "PERMISSION_DENIED"
    h[7].pop("data")


def m_info_revoke_final_ok(h, f, n, k):
    # revoke indeterminate and never observed: the final OK is allowed
    h[11]["type"] = "info"
    h[11]["code"] = "DEADLINE_EXCEEDED"
    h[15]["code"] = "OK"
    h[15]["data"] = DB
    for e in f:
        if e["key_id"] == B and e["type"] == "ok":
            e["code"] = "OK"
            e["data"] = DB


def check_split_brain():
    h, final, nem, keys = base()
    st = [{"t": 1, "node": 1, "role": "leader", "term": 3}, {"t": 2, "node": 2, "role": "leader", "term": 4}]
    ok1 = checker.check(h, final, nem, keys, 1000, st)["valid"]
    st.append({"t": 3, "node": 3, "role": "leader", "term": 4})
    r = checker.check(h, final, nem, keys, 1000, st)
    ok = ok1 and r["counts"]["split_brain"] == 1
    print(f"[{'ok  ' if ok else 'FAIL'}] two leaders in one term is split brain, one per term is not")
    return ok


def m_false_failure(h, f, n, k):
    h[11]["type"] = "fail"
    h[11]["code"] = "AlreadyExists"
    h[11]["detail"] = "key cc.. already exists"


CASES = [
    ("valid history passes", m_none, None),
    ("indeterminate revoke, never observed, passes", m_info_revoke_final_ok, None),
    ("lost seal (final NOT_FOUND on one node)", m_lost, "lost_seals"),
    ("lost seal (missing from keys list)", m_lost_keys, "lost_seals"),
    ("NOT_FOUND later than ack + bound", m_notfound_late, "lost_seals"),
    ("wrong bytes in a workload unseal", m_wrong, "wrong_unseals"),
    ("wrong bytes in the final phase", m_wrong_final, "wrong_unseals"),
    ("forged blob answered OK", m_forged, "wrong_unseals"),
    ("stale revoked unseal (workload)", m_stale, "stale_revoked"),
    ("stale revoked unseal (final phase)", m_stale_final, "stale_revoked"),
    ("OK after a PERMISSION_DENIED (info revoke)", m_after_denied, "stale_revoked"),
    ("duplicate record for one seal", m_dup, "duplicates"),
    ("record for a definitely failed seal", m_phantom, "duplicates"),
    ("denial without a revoke", m_spurious, "spurious_denied"),
    ("revoke answered with an error but applied", m_false_failure, "false_failures"),
]


def main():
    res = [run(*c) for c in CASES]
    res.append(check_split_brain())
    # liveness numbers of the base history
    r = checker.check(*base(), lease_bound_ms=1000)
    ok = r["availability"] is not None and r["seal_gap_s"] > 0
    print(f"[{'ok  ' if ok else 'FAIL'}] liveness metrics computed: availability={r['availability']} "
          f"gap={r['seal_gap_s']}s failed_unseals={r['failed_unseals']}")
    res.append(ok)
    print(f"selftest: {sum(res)} passed, {len(res) - sum(res)} failed")
    sys.exit(0 if all(res) else 1)


if __name__ == "__main__":
    main()
