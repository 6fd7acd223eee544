#!/usr/bin/env bash
# kmsd on a full dataDir filesystem (a small loop-mounted ext4 filled up)
# refuses to start with one clear error naming the free space, instead of
# RocksDB aborting on an assertion (found by tests/jepsen's enospc
# scenario). Needs root for the loop mount: exits 77 (skipped) otherwise.
set -u
build=${KMS_BUILD_DIR:?}
src=${KMS_SOURCE_DIR:?}
kmsd=$build/src/server/kmsd
if [ "$(id -u)" -ne 0 ] || ! command -v mkfs.ext4 >/dev/null; then
  echo "SKIP: needs root and mkfs.ext4 for a loop-mounted filesystem"; exit 77
fi
tmp=$(mktemp -d /tmp/kmsd-diskfull-XXXXXX)
mnt=$tmp/mnt
cleanup() { umount "$mnt" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
mkdir -p "$mnt"
truncate -s 80M "$tmp/fs.img"
mkfs.ext4 -q -F "$tmp/fs.img" || { echo "SKIP: mkfs failed"; exit 77; }
if ! mount -o loop "$tmp/fs.img" "$mnt" 2>/dev/null; then
  echo "SKIP: loop mount not available here"; exit 77
fi
dd if=/dev/zero of="$mnt/fill" bs=1M count=200 2>/dev/null
"$src/deploy/gen-pki.sh" "$tmp/pki" --nodes 1 >/dev/null
mkdir -p "$mnt/data"
cat > "$tmp/kmsd.yaml" <<YAML
nodeId: 1
dataDir: $mnt/data
talos:
  listen: "127.0.0.1:27290"
  certFile: $tmp/pki/node1.pem
  keyFile: $tmp/pki/node1-key.pem
cluster:
  listen: "127.0.0.1:27291"
raft:
  listen: "127.0.0.1:27292"
http:
  listen: "127.0.0.1:27293"
tls:
  nodeCertFile: $tmp/pki/node1.pem
  nodeKeyFile: $tmp/pki/node1-key.pem
  clusterCAFile: $tmp/pki/ca.pem
  operatorCAFile: $tmp/pki/ca.pem
initialCluster:
  - id: 1
    raft: "127.0.0.1:27292"
    cluster: "127.0.0.1:27291"
YAML
out=$(timeout 30 "$kmsd" --config "$tmp/kmsd.yaml" 2>&1); rc=$?
fail=0
if [ "$rc" -eq 2 ]; then echo "[ok  ] kmsd refused to start (exit 2)"; else echo "[FAIL] exit code $rc (want 2)"; fail=1; fi
if [[ "$out" == *"MiB free, kmsd needs at least"* ]]; then
  echo "[ok  ] the error names the free space: $(printf '%s\n' "$out" | grep -o '"error":"[^"]*"' | head -1)"
else
  echo "[FAIL] no free-space error in: $out"; fail=1
fi
if [[ "$out" == *"Assertion"* ]]; then echo "[FAIL] RocksDB assertion"; fail=1; fi
exit $fail
