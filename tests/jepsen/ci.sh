#!/usr/bin/env bash
# kmsd Jepsen suite driver.
#
#   tests/jepsen/ci.sh            CI subset (about 7-8 minutes on 2 cores)
#   tests/jepsen/ci.sh --full     every scenario (under 30 minutes)
#
# Needs root and a Release build (build/release, or KMS_BUILD_DIR). Runs the
# checker self-test, then each scenario with a fixed seed (JEPSEN_SEED
# overrides the base seed). Prints one line per scenario and "N passed,
# N failed, N skipped"; a failing scenario keeps its run dir (history,
# nemesis log, node logs, result.json) and prints its path and the
# reproduce command. Exits non-zero on any violation or harness error. A
# scenario that cannot run here prints SKIP with the reason (not a pass).
# Results of the last run: build/jepsen/results-<mode>.jsonl.
set -uo pipefail
cd "$(dirname "$0")/../.."
here=tests/jepsen
mode=ci
[ "${1:-}" = "--full" ] && mode=full
seed=${JEPSEN_SEED:-1}
out=build/jepsen
mkdir -p "$out"
results=$out/results-$mode.jsonl
: >"$results"

if [ "$(id -u)" != 0 ]; then
  echo "SKIP jepsen: needs root (network namespaces, nftables)"
  echo "0 passed, 0 failed, 1 skipped"
  exit 1
fi
for t in nft strace losetup mkfs.ext4 gcc; do
  command -v "$t" >/dev/null || { echo "jepsen: harness error: $t missing"; exit 2; }
done
[ -x "${KMS_BUILD_DIR:-build/release}/src/server/kmsd" ] || {
  echo "jepsen: harness error: kmsd not built (cmake --preset release && cmake --build build/release)"; exit 2; }

# scenario nodes [extra run.py args]
ci_matrix=(
  "baseline 3"
  "isolate-leader 3"
  "kill 3"
  "pause-leader 3"
  "loss 3"
  "rolling-restart 3"
  "leader-f1 5"
  "clock-skew 3"
  "disk-eio 3"
  "membership 3"
)
full_matrix=(
  "baseline 3"
  "isolate-leader 3"
  "isolate-leader 3"
  "isolate-leader 3"
  "isolate-leader 5"
  "isolate-follower 3"
  "split 5"
  "leader-f1 5"
  "bridge 3"
  "bridge 5"
  "kill 3"
  "kill 5"
  "kill-all 3"
  "powerloss 3"
  "pause-leader 3"
  "pause-leader 5"
  "loss 3"
  "loss 5"
  "rolling-restart 3"
  "rolling-restart 5"
  "membership 3"
  "clock-skew 3"
  "clock-skew 5"
  "clock-skew 3 --clock-slow 0.9 --clock-fast 1.1"
  "disk-eio 3"
  "enospc 3"
  "mixed 5"
)
if [ "$mode" = full ]; then matrix=("${full_matrix[@]}"); else matrix=("${ci_matrix[@]}"); fi

start=$(date +%s)
cleanup() {
  # run.py tears its namespaces down itself; this catches an interrupted run
  /usr/bin/python3 -c "import sys; sys.path.insert(0, '$here'); import net; net.down(9)" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

pass=0; fail=0; skip=0; failed=()
echo "=== jepsen checker self-test"
if /usr/bin/python3 $here/selftest.py; then pass=$((pass + 1)); else fail=$((fail + 1)); failed+=("selftest"); fi

i=0
for entry in "${matrix[@]}"; do
  set -- $entry
  name=$1; nodes=$2; shift 2
  s=$((seed + i)); i=$((i + 1))
  log=$out/$name-n$nodes-s$s.log
  rm -f "$out/$name-n$nodes-s$s.result.json"
  /usr/bin/python3 $here/run.py --scenario "$name" --seed "$s" --nodes "$nodes" "$@" >"$log" 2>&1
  rc=$?
  grep -E '^(SKIP|ERROR|kept:|reproduce:|  VIOLATION|  check FAILED|  kmsd failure|[a-z0-9-]+ n=[0-9])' "$log" | head -20
  res=$out/$name-n$nodes-s$s.result.json
  case $rc in
    0) pass=$((pass + 1)) ;;
    77) skip=$((skip + 1)) ;;
    *) fail=$((fail + 1)); failed+=("$name n=$nodes seed=$s (log $log)")
       [ -f "$res" ] || tail -n 30 "$log" ;;
  esac
  if [ -f "$res" ]; then
    /usr/bin/python3 -c "import json,sys; r=json.load(open('$res')); r.pop('trace',None); print(json.dumps(r))" >>"$results"
  else
    echo "{\"scenario\": \"$name\", \"nodes\": $nodes, \"seed\": $s, \"status\": \"$( [ $rc = 77 ] && echo skip || echo error)\", \"reason\": \"see $log\"}" >>"$results"
  fi
done
wall=$(( $(date +%s) - start ))
echo "=== jepsen $mode: $pass passed, $fail failed, $skip skipped in ${wall}s (results: $results)"
for f in "${failed[@]}"; do echo "  FAILED: $f"; done
[ "$fail" = 0 ]
