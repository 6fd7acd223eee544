#!/usr/bin/python3
"""Markdown results table from ci.sh's results-<mode>.jsonl.
  tests/jepsen/table.py build/jepsen/results-full.jsonl"""
import json
import sys


def fmt(v, suffix=""):
    return "-" if v is None else f"{v}{suffix}"


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    print("| scenario | nodes | seed | result | ops | acked seals | acked seals lost | wrong unseals "
          "| stale revoked unseals | duplicates | split brain | spurious denials | definite errors that took effect | availability in window "
          "| longest seal gap | failed multi-endpoint unseals | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r.get("counts", {})
        notes = []
        ex = r.get("extra", {}) or {}
        if "serve_after_unseal_max_s" in ex:
            notes.append(f"serves {ex['serve_after_unseal_max_s']} s after unseal (max)")
        if "eio_node_crashed" in ex:
            notes.append(f"EIO node crashed={ex['eio_node_crashed']} rc={ex.get('eio_node_rc')}")
        if "enospc_node_crashed" in ex:
            notes.append(f"running node on the full disk crashed={ex['enospc_node_crashed']}")
        if "enospc_restart" in ex:
            notes.append(f"restart on full disk: {ex['enospc_restart']}")
        if "clock" in ex:
            notes.append("clock rates " + ", ".join(f"n{k}x{v}" for k, v in ex["clock"].items()))
        refused = [mc for mc in ex.get("member_cmds", []) if mc["rc"] != 0]
        if refused:
            notes.append(f"{len(refused)} member commands refused, e.g. `{refused[0]['cmd']}` via "
                         f"n{refused[0]['via']}: {refused[0]['err'].split(': ', 2)[-1]}")
        if "members_after" in ex:
            notes.append(f"members after: {ex['members_after']}")
        if "recovery_s" in ex:
            notes.append(f"recovery {ex['recovery_s']} s")
        for ch in r.get("checks", []) or []:
            if not ch["ok"]:
                notes.append(f"FAILED: {ch['name']} ({ch['detail']})")
        if r.get("rechecked"):
            notes.append(r["rechecked"])
        if r.get("status") == "skip":
            notes.append(f"SKIP: {r.get('reason')}")
        if r.get("status") == "error":
            notes.append(f"harness error: {r.get('error')}")
        print(f"| {r['scenario']} | {r['nodes']} | {r['seed']} | {r.get('status', '?').upper()} "
              f"| {fmt(r.get('ops'))} | {fmt(r.get('acked_seals'))} | {fmt(c.get('lost_seals'))} "
              f"| {fmt(c.get('wrong_unseals'))} | {fmt(c.get('stale_revoked'))} "
              f"| {fmt(c.get('duplicates'))} | {fmt(c.get('split_brain'))} "
              f"| {fmt(c.get('spurious_denied'))} "
              f"| {fmt(c.get('false_failures', 0 if c and not c.get('spurious_denied') and not c.get('lost_seals') else None))} "
              f"| {fmt(r.get('availability'), ' %')} | {fmt(r.get('seal_gap_s'), ' s')} "
              f"| {fmt(r.get('failed_unseals'))} | {'; '.join(notes)} |")


if __name__ == "__main__":
    main()
