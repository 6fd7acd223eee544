#!/usr/bin/env bash
# kmsd --version and --dump-config on the built binary (no root, no ports):
#  - --version prints "kmsd X.Y.Z ..." and exits 0 without a config; so do
#    kmsctl --version and kmsctl version;
#  - --dump-config prints the effective configuration (file < KMSD_* env <
#    flags), which --check-config accepts back and which dumps to itself;
#  - key file paths are shown, key material never (no PEM in the output even
#    though every file it names is a PEM key or certificate);
#  - a bad configuration gives exit 1 and one line, and no dump;
#  - --help lists --dump-config and --version (docs/configuration.md).
# Uses the unit-test fixtures in tests/unit/configs.
set -u
build=${KMS_BUILD_DIR:?}
src=${KMS_SOURCE_DIR:?}
kmsd=$build/src/server/kmsd
kmsctl=$build/src/cli/kmsctl
cd "$src/tests/unit/configs" || exit 1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
ok() { echo "[ok  ] $*"; }
bad() { echo "[FAIL] $*"; fail=1; }

out=$("$kmsd" --version 2>&1); rc=$?
if [ $rc -eq 0 ] && [[ "$out" =~ ^kmsd\ [0-9]+\.[0-9]+\.[0-9]+ ]] && [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ]; then
  ok "kmsd --version: $out"
else
  bad "kmsd --version: rc=$rc out='$out'"
fi
out=$("$kmsd" --version --config /nonexistent.yaml 2>&1); rc=$?
[ $rc -eq 0 ] && [[ "$out" == kmsd\ * ]] && ok "--version loads no config" ||
  bad "--version with a missing config: rc=$rc out='$out'"
v1=$("$kmsctl" --version 2>&1); rc1=$?
v2=$("$kmsctl" version 2>&1); rc2=$?
if [ $rc1 -eq 0 ] && [ $rc2 -eq 0 ] && [[ "$v1" =~ ^kmsctl\ [0-9]+\.[0-9]+\.[0-9]+ ]] && [ "$v1" = "$v2" ] &&
   [ "${v1#kmsctl }" = "${out#kmsd }" ]; then
  ok "kmsctl --version = kmsctl version = kmsd's: $v1"
else
  bad "kmsctl --version '$v1' ($rc1) / version '$v2' ($rc2) / kmsd '$out'"
fi

help=$("$kmsd" --help)
for f in --dump-config --version --check-config; do
  grep -q -- "^  $f " <<<"$help" && ok "--help lists $f" || bad "--help does not list $f"
done

if KMSD_LOG_LEVEL=warn "$kmsd" --config full.yaml --dump-config --talos-listen 127.0.0.1:29950 \
     >"$tmp/dump.yaml" 2>"$tmp/err"; then
  ok "--dump-config full.yaml: $(wc -l <"$tmp/dump.yaml") lines"
else
  bad "--dump-config full.yaml failed: $(cat "$tmp/err")"
fi
grep -qx 'logLevel: warn' "$tmp/dump.yaml" && ok "env layer: logLevel warn" || bad "env KMSD_LOG_LEVEL not in dump"
grep -qx '  listen: "127.0.0.1:29950"' "$tmp/dump.yaml" && ok "flag layer: talos.listen" ||
  bad "--talos-listen not in dump"
grep -q '^nodeId: ' "$tmp/dump.yaml" && ok "file layer: nodeId" || bad "no nodeId in dump"
# Every file the config names is PEM; none of it may be printed.
if grep -q -- '-----BEGIN' "$tmp/dump.yaml" || grep -qi 'PRIVATE KEY' "$tmp/dump.yaml"; then
  bad "key material in the dump"
else
  ok "no key material in the dump"
fi
key=$(sed -n 's/^  nodeKeyFile: "\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$tmp/dump.yaml")
[ -n "$key" ] && [ -f "$key" ] && ok "key file path shown: $key" || bad "tls.nodeKeyFile path missing ('$key')"
out=$("$kmsd" --config "$tmp/dump.yaml" --check-config 2>&1); rc=$?
[ $rc -eq 0 ] && [[ "$out" == *"configuration OK"* ]] && ok "--check-config accepts the dump" ||
  bad "--check-config on the dump: rc=$rc out='$out'"
"$kmsd" --config "$tmp/dump.yaml" --dump-config >"$tmp/dump2.yaml" 2>&1
cmp -s "$tmp/dump.yaml" "$tmp/dump2.yaml" && ok "the dump dumps to itself" ||
  { bad "dump of the dump differs"; diff "$tmp/dump.yaml" "$tmp/dump2.yaml" | head; }

out=$("$kmsd" --config bad-dup-id.yaml --dump-config 2>"$tmp/err"); rc=$?
if [ $rc -eq 1 ] && [ -z "$out" ] && [ "$(grep -c . "$tmp/err")" -eq 1 ]; then
  ok "bad config: exit 1, no dump, one line: $(cat "$tmp/err")"
else
  bad "bad config with --dump-config: rc=$rc out='$out' err='$(cat "$tmp/err")'"
fi
exit $fail
