#!/usr/bin/env bash
# The kmsd binary on bad configuration: each bad file gives exit code 1 and
# exactly one line on stderr naming the key (and line), and --check-config
# accepts a good file. Uses the unit-test fixtures in tests/unit/configs.
set -u
build=${KMS_BUILD_DIR:?}
src=${KMS_SOURCE_DIR:?}
kmsd=$build/src/server/kmsd
cd "$src/tests/unit/configs" || exit 1
fail=0

expect() { # file expected-substring
  local f=$1 want=$2 out rc lines
  out=$("$kmsd" --check-config --config "$f" 2>&1 >/dev/null); rc=$?
  lines=$(printf '%s\n' "$out" | grep -c .)
  if [ "$rc" -eq 1 ] && [ "$lines" -eq 1 ] && [[ "$out" == *"$want"* ]]; then
    echo "[ok  ] $f -> $out"
  else
    echo "[FAIL] $f: rc=$rc lines=$lines out='$out' want '*$want*'"; fail=1
  fi
}

expect bad-unknown-key.yaml 'bad-unknown-key.yaml:3: unknown key "nodeID"'
expect bad-port-suffix.yaml 'bad-port-suffix.yaml:5: talos.listen: invalid port "4050x"'
expect bad-port-zero.yaml 'raft.listen: invalid port "0"'
expect bad-heartbeat.yaml 'raft.heartbeatTimeout: must be less than raft.electionTimeout'
expect bad-dup-id.yaml 'initialCluster[2]: duplicate id 1'
expect bad-self-missing.yaml 'initialCluster: does not contain nodeId 4'
expect bad-syntax.yaml 'bad-syntax.yaml:'
expect /nonexistent/kmsd.yaml 'cannot open'

out=$("$kmsd" --check-config --config full.yaml 2>&1); rc=$?
if [ "$rc" -eq 0 ] && [[ "$out" == *"configuration OK"* ]]; then
  echo "[ok  ] full.yaml accepted"
else
  echo "[FAIL] full.yaml: rc=$rc out='$out'"; fail=1
fi
out=$(KMSD_RAFT_LISTEN=x "$kmsd" --check-config --config full.yaml 2>&1); rc=$?
if [ "$rc" -eq 1 ] && [[ "$out" == *"KMSD_RAFT_LISTEN"* ]]; then
  echo "[ok  ] bad env var named: $out"
else
  echo "[FAIL] env override: rc=$rc out='$out'"; fail=1
fi
exit $fail
