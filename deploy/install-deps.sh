#!/usr/bin/env bash
# Installs every build and test dependency of kmsd from Debian 12 packages.
# Idempotent: packages already present are skipped, so a second run is fast and
# needs no network. Needs root (or sudo) only when something is missing.
set -euo pipefail

# Exactly what the build and the tests use (tests/run.sh), grouped by user.
PKGS=(
  # build: compilers, CMake, git (version string, upgrade test)
  build-essential cmake pkg-config git ca-certificates
  # fuzz preset (clang + libFuzzer); llvm-symbolizer for sanitizer reports
  clang-14 libclang-rt-14-dev llvm-14
  # libraries kmsd links (libraft comes from bookworm-backports, below)
  libuv1-dev libssl-dev openssl
  libprotobuf-c-dev protobuf-c-compiler
  libgrpc-dev
  librocksdb-dev
  libcyaml-dev libyaml-dev libmicrohttpd-dev libsystemd-dev
  libnghttp2-dev
  # unit tests
  libcmocka-dev
  # Go test clients (talosclient, netattack): grpc-go, protowire, x/net/http2
  golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-golang-x-net-dev
  # Python integration tests; grpcio for the forged-peer tests
  python3 python3-grpcio
  # PKCS#11 seal: the header (p11-kit/pkcs11.h), a SoftHSM2 token for tests
  libp11-kit-dev softhsm2
  # fault injection: namespaces + nftables (Jepsen suite), fsync errors
  # (strace), expired certificates (faketime), ps (package test), a
  # loop-mounted filesystem for ENOSPC (mkfs.ext4)
  iproute2 nftables strace faketime procps e2fsprogs
)

# raft comes from bookworm-backports: Debian 12's own libraft 0.15 has known
# safety bugs (Figure-8 commit of older-term entries, uncapped follower commit
# index, double votes around a leadership transfer). The maintained fork,
# cowsql/raft 0.22.1, is Debian's libraft-dev in bookworm-backports. We add that
# suite with the URI and keyring of the existing bookworm entry and take only
# libraft-dev and libraft0 from it (backports is NotAutomatic, so nothing else
# is ever pulled from it implicitly).
RAFT_MIN="0.22"
RAFT_PKGS=(libraft-dev/bookworm-backports libraft0/bookworm-backports)
BPO_LIST=/etc/apt/sources.list.d/kmsd-bookworm-backports.sources

raft_ok() {
  local v
  v=$(dpkg-query -W -f='${Version}' libraft-dev 2>/dev/null) || return 1
  dpkg-query -W -f='${Status}' libraft-dev 2>/dev/null | grep -q "install ok installed" || return 1
  dpkg --compare-versions "$v" ge "$RAFT_MIN"
}

# Prints a deb822 stanza for bookworm-backports, copying URIs and Signed-By
# from the stanza that lists the "bookworm" suite.
bpo_stanza() {
  local src uri key
  for src in /etc/apt/sources.list.d/*.sources; do
    [ -f "$src" ] || continue
    [ "$src" = "$BPO_LIST" ] && continue
    uri=$(awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm( |$|\n)/ && !/bookworm-security/ {
          for (i=1;i<=NF;i++) if ($i=="URIs:") {print $(i+1); exit}}' "$src")
    key=$(awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm( |$|\n)/ && !/bookworm-security/ {
          for (i=1;i<=NF;i++) if ($i=="Signed-By:") {print $(i+1); exit}}' "$src")
    if [ -n "$uri" ]; then
      printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\n' "$uri"
      [ -n "$key" ] && printf 'Signed-By: %s\n' "$key"
      return 0
    fi
  done
  if grep -hqs '^deb .* bookworm main' /etc/apt/sources.list; then
    uri=$(grep -h '^deb .* bookworm main' /etc/apt/sources.list | head -1 | awk '{print $2}')
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\n' "$uri"
    return 0
  fi
  return 1
}

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ] && raft_ok; then
  echo "install-deps: all ${#PKGS[@]} packages present, libraft $(dpkg-query -W -f='${Version}' libraft-dev)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: missing packages (${missing[*]} libraft-dev>=$RAFT_MIN) and not root; rerun as root" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
if ! raft_ok; then
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    stanza=$(bpo_stanza) || {
      echo "install-deps: no bookworm entry in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list to derive bookworm-backports from" >&2
      exit 1
    }
    echo "install-deps: enabling bookworm-backports (only libraft is taken from it) in $BPO_LIST"
    printf '%s\n' "$stanza" | $SUDO tee "$BPO_LIST" >/dev/null
  fi
fi

echo "install-deps: installing ${missing[*]} ${RAFT_PKGS[*]}"
$SUDO apt-get update -q
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ! raft_ok; then
  $SUDO apt-get install -y -q --no-install-recommends "${RAFT_PKGS[@]}"
fi
raft_ok || { echo "install-deps: libraft-dev >= $RAFT_MIN did not install" >&2; exit 1; }
echo "install-deps: libraft $(dpkg-query -W -f='${Version}' libraft-dev)"
