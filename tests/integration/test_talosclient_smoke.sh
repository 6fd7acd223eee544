#!/usr/bin/env bash
# Smoke test of the gRPC/TLS plumbing against a different stack: the Go
# Talos-like client (grpc-go, crypto/tls) talks to kms_rpc's echo server
# (`test_rpc --serve`, Seal/Unseal with a reversible blob) on 127.0.0.1.
# Also checks the TLS policy with the openssl CLI: TLS 1.2 refused unless
# allowed, no ALPN h2 -> no gRPC. Ports 26950-26959.
set -euo pipefail
B=${KMS_BUILD_DIR:?KMS_BUILD_DIR}
SRV=$B/tests/unit/test_rpc
TC=$B/tests/integration/talosclient/talosclient
[ -x "$SRV" ] || { echo "$SRV not built" >&2; exit 1; }
[ -x "$TC" ] || { echo "$TC not built" >&2; exit 1; }

dir=$(mktemp -d /tmp/kms-smoke-XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

cd "$dir"
gen="openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256"
$gen -out ca-key.pem
openssl req -x509 -new -key ca-key.pem -subj /CN=smoke-ca -days 2 -out ca.pem
$gen -out srv-key.pem
openssl req -new -key srv-key.pem -subj /CN=kmsd-node-1 -out srv.csr
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > ext.cnf
openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
  -extfile ext.cnf -out srv.pem 2>/dev/null

start() { # port [extra args...]
  local port=$1; shift
  "$SRV" --serve "$port" --cert srv.pem --key srv-key.pem "$@" 2>>"srv-$port.log" &
  pids+=($!)
  for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && return 0
    sleep 0.1
  done
  fail "server on $port did not start"
}
A=26950; Bp=26951; P=26952; T12=26953; DEAD=26959
start $A; start $Bp; start $P --plaintext; start $T12 --tls12
uuid=$(cat /proc/sys/kernel/random/uuid)

# seal / unseal over TLS
out=$("$TC" seal -ca ca.pem -endpoints 127.0.0.1:$A -uuid "$uuid")
blob=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["blob"])')
data=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"])')
got=$("$TC" unseal -ca ca.pem -endpoints 127.0.0.1:$Bp -uuid "$uuid" -blob "$blob")
[ "$got" = "$data" ] || fail "unseal returned other bytes"
ok "seal on A, unseal on B"

set +e
"$TC" unseal -ca ca.pem -endpoints 127.0.0.1:$A -uuid other -blob "$blob" 2>/dev/null; rc=$?
[ $rc = 7 ] || fail "uuid mismatch: exit $rc, want 7 (PERMISSION_DENIED)"
"$TC" unseal -ca ca.pem -endpoints 127.0.0.1:$A -uuid "$uuid" -blob AAAA 2>/dev/null; rc=$?
[ $rc = 3 ] || fail "bad blob: exit $rc, want 3 (INVALID_ARGUMENT)"
"$TC" unseal -ca ca.pem -endpoints 127.0.0.1:$DEAD -uuid "$uuid" -blob "$blob" 2>/dev/null; rc=$?
[ $rc = 14 ] || fail "refused: exit $rc, want 14 (UNAVAILABLE)"
"$TC" unseal -endpoints 127.0.0.1:$A -uuid "$uuid" -blob "$blob" 2>/dev/null; rc=$?
[ $rc = 14 ] || fail "untrusted CA: exit $rc, want 14"
"$TC" unseal -plaintext -endpoints 127.0.0.1:$A -uuid "$uuid" -blob "$blob" 2>/dev/null; rc=$?
[ $rc = 14 ] || fail "plaintext to TLS: exit $rc, want 14"
set -e
ok "exit codes = gRPC status codes"

"$TC" roundtrip -ca ca.pem -uuid "$uuid" -seal-endpoint 127.0.0.1:$A \
  -unseal-endpoint 127.0.0.1:$DEAD,127.0.0.1:$Bp >/dev/null
ok "roundtrip with failover past a refused endpoint"
"$TC" roundtrip -endpoints grpc://127.0.0.1:$P -uuid "$uuid" >/dev/null
"$TC" roundtrip -plaintext -endpoints 127.0.0.1:$P -uuid "$uuid" >/dev/null
ok "plaintext (grpc:// and -plaintext)"
"$TC" roundtrip -ca ca.pem -endpoints 127.0.0.1:$T12 -uuid "$uuid" >/dev/null
ok "TLS 1.2-enabled server still negotiates with grpc-go"

# TLS policy, seen by grpc-go's crypto/tls
j=$("$TC" probe -ca ca.pem -endpoints 127.0.0.1:$A -tls12only || true)
echo "$j" | grep -q '"handshake":false' || fail "TLS 1.2 client accepted by default: $j"
j=$("$TC" probe -ca ca.pem -endpoints 127.0.0.1:$T12 -tls12only) || fail "TLS 1.2 refused with --tls12: $j"
echo "$j" | grep -q '"version":"TLS1.2"' || fail "not TLS 1.2: $j"
j=$("$TC" probe -ca ca.pem -endpoints 127.0.0.1:$A -noalpn || true)
echo "$j" | grep -q '"grpc":false' || fail "no-ALPN client got gRPC service: $j"
j=$("$TC" probe -ca ca.pem -endpoints 127.0.0.1:$A) || fail "plain probe failed: $j"
echo "$j" | grep -q '"version":"TLS1.3".*"alpn":"h2"' || fail "probe: $j"
ok "probe: TLS 1.2 refused by default, allowed with opt-in; no ALPN -> no gRPC"

# ... and by the openssl CLI
o=$(echo | timeout 5 openssl s_client -connect 127.0.0.1:$A -tls1_2 -alpn h2 2>&1 || true)
grep -q 'Cipher is (NONE)' <<<"$o" || fail "openssl -tls1_2 accepted by default"
o=$(echo | timeout 5 openssl s_client -connect 127.0.0.1:$T12 -tls1_2 -alpn h2 2>&1 || true)
grep -q 'ALPN protocol: h2' <<<"$o" || fail "openssl -tls1_2 refused with --tls12"
ok "openssl s_client -tls1_2: refused by default, accepted with --tls12"

# load with failover: stop A (SIGTERM -> listener closed, 1 s grace) mid-run
"$TC" seal -ca ca.pem -endpoints 127.0.0.1:$A -uuid "$uuid" -n 20 > blobs.jsonl
"$TC" load -ca ca.pem -endpoints 127.0.0.1:$A,127.0.0.1:$Bp -clients 8 -duration 3s \
  -blobs blobs.jsonl > load.json &
lp=$!
sleep 1
kill "${pids[0]}"
wait "$lp" || fail "load reported wrong bytes"
cat load.json | head -c 600; echo
python3 - load.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["total"] > 50, r
assert r["wrong_bytes"] == 0, r
bad = sum(r["failures"].values())
assert bad == 0, f"failures during failover: {r['failures']}"
PY
ok "load: $(python3 -c 'import json;r=json.load(open("load.json"));print(r["total"],"unseals, 0 failures, max",r["max_latency_ms"],"ms")') across a server stop"
echo "PASS"
