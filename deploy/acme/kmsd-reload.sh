#!/bin/sh
# kmsd-acme-reload: acme.sh --reloadcmd hook for kmsd (installed by the kmsd
# Debian package as /usr/lib/kmsd/kmsd-acme-reload).
#
# acme.sh --install-cert -d kms.example.com \
#     --fullchain-file /var/lib/acme-kmsd/talos.pem \
#     --key-file /var/lib/acme-kmsd/talos.key \
#     --reloadcmd /usr/lib/kmsd/kmsd-acme-reload
#
# Copies the renewed certificate and key into /etc/kmsd/tls with safe
# permissions (certificate 0644, key 0640, owner root, group kmsd), each
# through a temporary file and rename, so kmsd never reads a half-written
# file, then `systemctl reload kmsd` (SIGHUP: new certificates for new
# connections; the node is not restarted and stays unsealed).
#
# Environment (all optional):
#   KMSD_ACME_CERT  source certificate (full chain)  default /var/lib/acme-kmsd/talos.pem
#   KMSD_ACME_KEY   source private key               default /var/lib/acme-kmsd/talos.key
#   KMSD_TLS_DIR    destination directory            default /etc/kmsd/tls
#   KMSD_CERT_NAME  destination base name            default talos (talos.pem, talos.key)
#   KMSD_GROUP      group that may read the key      default kmsd
#   KMSD_RELOAD     reload command                   default "systemctl reload kmsd"
# acme.sh also exports CERT_FULLCHAIN_PATH and CERT_KEY_PATH to reload
# commands; they are used when KMSD_ACME_CERT/KMSD_ACME_KEY are unset.
# Exit codes: 0 installed and reloaded, 1 bad input (nothing changed),
# 2 installed but the reload failed.
set -eu

cert=${KMSD_ACME_CERT:-${CERT_FULLCHAIN_PATH:-/var/lib/acme-kmsd/talos.pem}}
key=${KMSD_ACME_KEY:-${CERT_KEY_PATH:-/var/lib/acme-kmsd/talos.key}}
dir=${KMSD_TLS_DIR:-/etc/kmsd/tls}
name=${KMSD_CERT_NAME:-talos}
group=${KMSD_GROUP:-kmsd}
reload=${KMSD_RELOAD:-systemctl reload kmsd}

die() { echo "kmsd-acme-reload: $*" >&2; exit 1; }

[ -r "$cert" ] || die "cannot read certificate $cert"
[ -r "$key" ] || die "cannot read key $key"
[ -d "$dir" ] || die "no directory $dir (is the kmsd package installed?)"
getent group "$group" >/dev/null || die "no group $group"
grep -q -- "-----BEGIN CERTIFICATE-----" "$cert" || die "$cert is not a PEM certificate"
grep -q -- "-----BEGIN .*PRIVATE KEY-----" "$key" || die "$key is not a PEM private key"
if command -v openssl >/dev/null 2>&1; then
    # The key must belong to the certificate: a mismatch would break every
    # new Talos handshake after the reload.
    cpub=$(openssl x509 -in "$cert" -noout -pubkey 2>/dev/null) || die "$cert: unreadable certificate"
    kpub=$(openssl pkey -in "$key" -pubout 2>/dev/null) || die "$key: unreadable private key"
    [ "$cpub" = "$kpub" ] || die "$key does not match $cert"
fi

umask 077
tmpc=$(mktemp "$dir/.$name.pem.XXXXXX")
tmpk=$(mktemp "$dir/.$name.key.XXXXXX")
trap 'rm -f "$tmpc" "$tmpk"' EXIT
cat "$cert" >"$tmpc"
cat "$key" >"$tmpk"
chown "root:$group" "$tmpc" "$tmpk"
chmod 0644 "$tmpc"
chmod 0640 "$tmpk"
# Key first: kmsd reads both only on reload, which comes after both renames.
mv -f "$tmpk" "$dir/$name.key"
mv -f "$tmpc" "$dir/$name.pem"
trap - EXIT

if ! $reload; then
    echo "kmsd-acme-reload: installed $dir/$name.pem, but '$reload' failed" >&2
    exit 2
fi
echo "kmsd-acme-reload: installed $dir/$name.pem and $dir/$name.key; kmsd reloaded"
