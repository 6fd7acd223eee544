#!/usr/bin/env bash
# README command 1: dependencies, build, local three-node quorum, init,
# unseal, Talos-style round trip. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/install-deps.sh
cmake --preset release >/dev/null
cmake --build build/release -j "$(nproc)"
if [ ! -x deploy/local-cluster.sh ] || [ ! -x build/release/src/server/kmsd ]; then
  echo "quickstart: the kmsd server is not built yet in this revision;" >&2
  echo "quickstart: dependencies are installed and the libraries are built." >&2
  exit 1
fi
exec ./deploy/local-cluster.sh quickstart
