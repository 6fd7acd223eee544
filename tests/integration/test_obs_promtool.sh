#!/usr/bin/env bash
# deploy/monitoring: the example alert rules pass `promtool check rules`, the
# dashboard is valid JSON, and every kmsd_* metric either names is listed in
# docs/metrics.md (which test_obs_metrics_audit.py checks against a live
# scrape). No ports, no kmsd process.
#
# promtool comes from Debian's prometheus package (19 MB download, 96 MB
# installed, with a daemon we do not want running), so it is not in
# deploy/install-deps.sh: under CI (CI=true) the .deb is fetched with
# `apt-get download` and only promtool is extracted into a temp dir;
# elsewhere, without promtool in PATH (or KMS_PROMTOOL), the test is
# skipped (exit 77).
set -euo pipefail
src=${KMS_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
mon=$src/deploy/monitoring
tmp=$(mktemp -d /tmp/kmsd-promtool-XXXXXX)
trap 'rm -rf "$tmp"' EXIT

promtool=${KMS_PROMTOOL:-$(command -v promtool || true)}
if [[ -z $promtool ]]; then
  if [[ ${CI:-} == true ]]; then
    (cd "$tmp" && timeout 300 apt-get download prometheus >/dev/null 2>&1) ||
      { echo "FAIL: apt-get download prometheus (is the apt list current?)"; exit 1; }
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
    promtool=$tmp/x/usr/bin/promtool
  else
    echo "SKIP: promtool not found (apt-get install prometheus, or set KMS_PROMTOOL)"
    exit 77
  fi
fi

fail=0
if out=$(timeout 60 "$promtool" check rules "$mon/kmsd-alerts.yml" 2>&1); then
  echo "ok: promtool check rules: $(echo "$out" | grep -o '[0-9]* rules found')"
else
  echo "FAIL: promtool check rules:"; echo "$out"; fail=1
fi

python3 - "$mon" "$src/docs/metrics.md" <<'PY' || fail=1
import json, re, sys
mon, doc = sys.argv[1], sys.argv[2]
documented = set(re.findall(r"^\| `(kmsd_[a-z0-9_]+)` \|", open(doc).read(), re.M))
bad = 0
try:
    dash = json.load(open(f"{mon}/kmsd-dashboard.json"))
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    print(f"ok: dashboard JSON parses ({len(dash['panels'])} panels, {len(exprs)} queries)")
except (ValueError, KeyError) as e:
    print(f"FAIL: dashboard JSON: {e}"); sys.exit(1)
rules = open(f"{mon}/kmsd-alerts.yml").read()
for where, text in (("alert rules", rules), ("dashboard", "\n".join(exprs))):
    used = set(re.sub(r"_(bucket|sum|count)$", "", m)
               for m in re.findall(r"\b(kmsd_[a-z0-9_]+)", text))
    unknown = sorted(used - documented)
    if unknown:
        print(f"FAIL: {where}: metrics not in docs/metrics.md: {unknown}"); bad = 1
    else:
        print(f"ok: {where}: {len(used)} metrics used, all documented")
sys.exit(bad)
PY
[[ $fail == 0 ]] && echo "PASS" || { echo "FAILED"; exit 1; }
