#!/usr/bin/env bash
# Installs every build and test dependency of kmsd from Debian 12 packages.
# Idempotent: packages already present are skipped, so a second run is fast and
# needs no network. Needs root (or sudo) only when something is missing.
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config git ca-certificates
  clang-14 libclang-rt-14-dev llvm-14
  libraft-dev libuv1-dev libssl-dev openssl
  libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
  libgrpc-dev
  librocksdb-dev
  libcmocka-dev libcyaml-dev libyaml-dev libmicrohttpd-dev
  golang-go golang-google-grpc-dev golang-goprotobuf-dev golang-google-protobuf-dev
  python3 python3-grpcio
  etcd-server nghttp2-client softhsm2
  iproute2 nftables strace faketime procps psmisc curl jq
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: missing packages (${missing[*]}) and not root; rerun as root" >&2
    exit 1
  fi
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
