#!/usr/bin/env bash
# Dev PKI for kmsd with the openssl CLI (ECDSA P-256):
#   gen-pki.sh DIR [--nodes N] [--ip IP]... [-v]
# Writes, skipping files that exist (idempotent):
#   ca.pem ca-key.pem                       cluster + operator CA (dev: one CA)
#   node<i>.pem node<i>-key.pem             i=1..N, CN=kmsd-node-<i>,
#                                           serverAuth+clientAuth, SAN IP:127.0.0.1,
#                                           DNS:localhost (+ each --ip)
#   operator.pem operator-key.pem           CN=kmsctl-operator, clientAuth
#   k8s-plugin.pem k8s-plugin-key.pem       CN=kmsd-k8s-plugin, clientAuth: the
#                                           Kubernetes KMS v2 plugin role
#                                           (docs/kubernetes.md)
#   foreign-ca.pem foreign-ca-key.pem foreign-node1.pem foreign-node1-key.pem
#   foreign-operator.pem foreign-operator-key.pem  (tests: a CA nobody trusts)
#                                           another CA, for negative tests
# Keys are 0600. Production clusters should use separate cluster and operator CAs.
set -euo pipefail
dir=${1:?usage: gen-pki.sh DIR [--nodes N] [--ip IP]... [-v]}
shift
nodes=3
ips=()
verbose=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --ip) ips+=("$2"); shift 2 ;;
    -v) verbose=1; shift ;;
    *) echo "gen-pki.sh: unknown argument '$1'" >&2; exit 1 ;;
  esac
done
mkdir -p "$dir"
cd "$dir"
umask 077
q() { if [ "$verbose" = 1 ]; then "$@"; else "$@" >/dev/null 2>&1 || { echo "gen-pki.sh: failed: $*" >&2; exit 1; }; fi; }

ca() { # name cn
  [ -f "$1.pem" ] && return 0
  q openssl ecparam -name prime256v1 -genkey -noout -out "$1-key.pem"
  q openssl req -x509 -new -key "$1-key.pem" -sha256 -days 3650 -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$1.pem"
}

leaf() { # name cn ca eku san
  [ -f "$1.pem" ] && return 0
  local ext
  ext=$(mktemp)
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyAgreement"
    echo "extendedKeyUsage=$4"
    [ -n "$5" ] && echo "subjectAltName=$5"
  } >"$ext"
  q openssl ecparam -name prime256v1 -genkey -noout -out "$1-key.pem"
  q openssl req -new -key "$1-key.pem" -subj "/CN=$2" -out "$1.csr"
  q openssl x509 -req -in "$1.csr" -CA "$3.pem" -CAkey "$3-key.pem" -CAcreateserial \
    -days 825 -sha256 -extfile "$ext" -out "$1.pem"
  rm -f "$1.csr" "$ext"
}

san="IP:127.0.0.1,DNS:localhost"
for ip in "${ips[@]}"; do san="$san,IP:$ip"; done

ca ca "kmsd dev CA"
for i in $(seq 1 "$nodes"); do
  leaf "node$i" "kmsd-node-$i" ca "serverAuth,clientAuth" "$san"
done
leaf operator kmsctl-operator ca clientAuth ""
leaf k8s-plugin kmsd-k8s-plugin ca clientAuth ""
ca foreign-ca "kmsd foreign CA"
leaf foreign-node1 kmsd-node-1 foreign-ca "serverAuth,clientAuth" "$san"
leaf foreign-operator kmsctl-operator foreign-ca clientAuth ""
chmod 0644 ./*.pem
chmod 0600 ./*-key.pem
