#!/usr/bin/env bash
# The Debian packages, end to end, on this machine (needs root: it installs
# them into the real system and removes them again, always, via a trap).
#
#  1. cpack -G DEB from the build directory under test (KMS_BUILD_DIR) into a
#     temporary directory: nothing is rebuilt, the build directory keeps no
#     packaging output.
#  2. dpkg-deb -I/-c: files, modes, owners, conffiles, maintainer scripts,
#     Depends (shlibdeps + adduser + libraft0 >= 0.22).
#  3. dpkg -i: the kmsd system user, /var/lib/kmsd 0700 kmsd:kmsd,
#     /etc/kmsd/tls 0750 root:kmsd; systemd-analyze verify and security of
#     the installed unit.
#  4. The acme.sh hook installs a certificate with safe modes (and refuses a
#     key that does not match); the packaged /etc/kmsd/kmsd.yaml passes
#     --check-config once certificates exist.
#  5. The installed /usr/sbin/kmsd runs as the kmsd user on ports 29800-29803
#     with NOTIFY_SOCKET pointing at a datagram socket of this test: READY=1,
#     STATUS= (uninitialised -> sealed 0 of 2 -> 1 of 2 -> serving), WATCHDOG=1
#     about every second with WATCHDOG_USEC=2s; a renewal through the acme
#     hook + SIGHUP makes the Talos port present the new certificate, still
#     serving; --dump-config round-trips through --check-config; SIGTERM
#     sends STOPPING=1 and exits 0.
#  6. dpkg -i again (the upgrade path) keeps the conffile edit, the uid and
#     the data and says a restart is manual; dpkg -r keeps the user, the
#     config and /var/lib/kmsd (with the data); dpkg -P removes every file
#     dpkg -L listed, the state, the user, the systemd enablement links.
# Exit 77 (skipped) when not root, without dpkg/cpack, or when a kmsd
# package, user or directory already exists (never touch a real install).
set -u
build=${KMS_BUILD_DIR:?}
src=${KMS_SOURCE_DIR:?}
PORT_BASE=29800

skip() { echo "SKIP: $*"; exit 77; }
[ "$(id -u)" -eq 0 ] || skip "needs root (installs the .deb into the system); CI runs it as root"
for t in dpkg dpkg-deb dpkg-query cpack python3 setpriv openssl; do
  command -v "$t" >/dev/null 2>&1 || skip "$t not installed"
done
[ -f "$build/CPackConfig.cmake" ] || skip "$build has no CPackConfig.cmake (configure it with CMake)"
[ -x "$build/src/server/kmsd" ] || skip "kmsd not built in $build"
for p in kmsd kmsctl; do
  if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -qv "not-installed"; then
    skip "a $p package is already known to dpkg on this machine; not touching it"
  fi
done
getent passwd kmsd >/dev/null && skip "a kmsd user already exists on this machine"
getent group kmsd >/dev/null && skip "a kmsd group already exists on this machine"
for d in /var/lib/kmsd /etc/kmsd /usr/lib/kmsd; do
  [ -e "$d" ] && skip "$d already exists on this machine"
done

fail=0
ok() { echo "[ok  ] $*"; }
bad() { echo "[FAIL] $*"; fail=1; }
check() { # description command...
  local what=$1; shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}

tmp=$(mktemp -d /tmp/kmsd-pkg-test.XXXXXX)
chmod 0755 "$tmp" # the kmsd user reads the test config and the notify socket
kmsd_pid=""
listener_pid=""
manifests_before=$(ls "$build"/install_manifest_*.txt 2>/dev/null | sort)

cleanup() {
  [ -n "$kmsd_pid" ] && kill -KILL "$kmsd_pid" 2>/dev/null
  [ -n "$listener_pid" ] && kill "$listener_pid" 2>/dev/null
  if dpkg-query -W -f='${Status}' kmsd kmsctl 2>/dev/null | grep -q "installed\|config-files"; then
    dpkg -P kmsd kmsctl >/dev/null 2>&1
  fi
  # Whatever a failed purge left (only paths this test proved absent at start).
  rm -rf /var/lib/kmsd /etc/kmsd /usr/lib/kmsd
  getent passwd kmsd >/dev/null && deluser --system --quiet kmsd >/dev/null 2>&1
  getent group kmsd >/dev/null && delgroup --system --quiet kmsd >/dev/null 2>&1
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. build the packages without touching the build --------------------
kmsd_mtime=$(stat -c %Y "$build/src/server/kmsd")
if ! (cd "$build" && cpack --config CPackConfig.cmake -G DEB -B "$tmp/pkg") >"$tmp/cpack.log" 2>&1; then
  cat "$tmp/cpack.log"; bad "cpack -G DEB failed"; exit 1
fi
# cmake_install.cmake always writes its manifests into the build directory.
for m in "$build"/install_manifest_kmsd.txt "$build"/install_manifest_kmsctl.txt; do
  printf '%s\n' "$manifests_before" | grep -qx "$m" || rm -f "$m"
done
check "cpack rebuilt nothing (kmsd mtime unchanged)" \
  test "$(stat -c %Y "$build/src/server/kmsd")" = "$kmsd_mtime"
check "no packaging output left in the build directory" test ! -e "$build/_CPack_Packages"
deb=$(ls "$tmp"/pkg/kmsd_*.deb 2>/dev/null | head -1)
ctl_deb=$(ls "$tmp"/pkg/kmsctl_*.deb 2>/dev/null | head -1)
if [ -z "$deb" ] || [ -z "$ctl_deb" ]; then
  ls -l "$tmp/pkg"; bad "kmsd_*.deb and kmsctl_*.deb not both built"; exit 1
fi
ok "built $(basename "$deb") $(basename "$ctl_deb")"

# --- 2. inspect -------------------------------------------------------------
dpkg-deb -I "$deb" >"$tmp/info" || bad "dpkg-deb -I $deb"
dpkg-deb -c "$deb" >"$tmp/contents" || bad "dpkg-deb -c $deb"
dpkg-deb -c "$ctl_deb" >"$tmp/ctl_contents" || bad "dpkg-deb -c $ctl_deb"
depends=$(dpkg-deb -f "$deb" Depends)
echo "       Depends: $depends"
for d in adduser "libraft0 (>= 0.22)" libsystemd0 librocksdb libgrpc libssl3 libcyaml libuv1 \
         libmicrohttpd; do
  check "Depends has $d" grep -qF "$d" <<<"$depends"
done
check "kmsctl Depends has libgrpc" grep -q libgrpc <<<"$(dpkg-deb -f "$ctl_deb" Depends)"
check "package name kmsd" test "$(dpkg-deb -f "$deb" Package)" = kmsd
has_all() { # file word...
  local f=$1 w; shift
  for w in "$@"; do grep -qF -- "$w" "$f" || return 1; done
}
check "control has conffiles, postinst, prerm, postrm" \
  has_all "$tmp/info" conffiles postinst prerm postrm
dpkg-deb -e "$deb" "$tmp/control"
check "conffiles is exactly /etc/kmsd/kmsd.yaml" \
  test "$(cat "$tmp/control/conffiles")" = /etc/kmsd/kmsd.yaml
entry() { # contents-file mode path
  grep -qE "^$2 root/root +[0-9]+ [0-9-]+ [0-9:]+ \.$3\$" "$1"
}
check "/usr/sbin/kmsd -rwxr-xr-x root" entry "$tmp/contents" '-rwxr-xr-x' /usr/sbin/kmsd
check "/etc/kmsd/kmsd.yaml -rw-r--r-- root" entry "$tmp/contents" '-rw-r--r--' /etc/kmsd/kmsd.yaml
check "kmsd.service -rw-r--r-- root" \
  entry "$tmp/contents" '-rw-r--r--' /lib/systemd/system/kmsd.service
check "acme hook -rwxr-xr-x root" \
  entry "$tmp/contents" '-rwxr-xr-x' /usr/lib/kmsd/kmsd-acme-reload
check "/usr/bin/kmsctl -rwxr-xr-x root (kmsctl package)" \
  entry "$tmp/ctl_contents" '-rwxr-xr-x' /usr/bin/kmsctl
check "every entry owned by root/root" \
  test -z "$(awk '$2 != "root/root"' "$tmp/contents" "$tmp/ctl_contents")"
check "nothing group- or world-writable" \
  test -z "$(awk 'substr($1,6,1) == "w" || substr($1,9,1) == "w"' "$tmp/contents" "$tmp/ctl_contents")"
check "no /var/lib/kmsd in the package (postinst creates it, owned by kmsd)" \
  test -z "$(grep -F './var/' "$tmp/contents")"

# --- 3. install ----------------------------------------------------------------
if ! dpkg -i "$deb" "$ctl_deb" >"$tmp/dpkg-i.log" 2>&1; then
  echo "       dpkg -i failed; trying apt-get -f install --no-download (offline)"
  cat "$tmp/dpkg-i.log"
  DEBIAN_FRONTEND=noninteractive apt-get -f install -y -q --no-download >>"$tmp/dpkg-i.log" 2>&1 ||
    { cat "$tmp/dpkg-i.log"; bad "kmsd package not installable offline"; exit 1; }
fi
check "dpkg: kmsd and kmsctl installed" \
  test "$(dpkg-query -W -f='${Status}\n' kmsd kmsctl | grep -c 'install ok installed')" = 2
dpkg -L kmsd kmsctl | sort -u >"$tmp/listed"
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd kmsd)
check "user kmsd: system uid ($uid), home /var/lib/kmsd, no login shell" \
  test -n "$uid" -a "${uid:-9999}" -lt 1000 -a "$home" = /var/lib/kmsd -a "$shell" = /usr/sbin/nologin
check "group kmsd is kmsd's primary group" test "$(getent group kmsd | cut -d: -f3)" = "$gid"
check "/var/lib/kmsd 700 kmsd:kmsd" test "$(stat -c '%a %U:%G' /var/lib/kmsd)" = "700 kmsd:kmsd"
check "/etc/kmsd/tls 750 root:kmsd" test "$(stat -c '%a %U:%G' /etc/kmsd/tls)" = "750 root:kmsd"
check "dpkg -L lists /usr/sbin/kmsd, /usr/bin/kmsctl, the unit, the conffile" \
  has_all "$tmp/listed" /usr/sbin/kmsd /usr/bin/kmsctl /lib/systemd/system/kmsd.service \
  /etc/kmsd/kmsd.yaml
if command -v systemd-analyze >/dev/null 2>&1; then
  if out=$(systemd-analyze verify /lib/systemd/system/kmsd.service 2>&1); then
    ok "systemd-analyze verify kmsd.service"
  else
    bad "systemd-analyze verify: $out"
  fi
  score=$(systemd-analyze security --offline=true /lib/systemd/system/kmsd.service 2>/dev/null |
          sed -n 's/.*Overall exposure level for kmsd.service: \([0-9.]*\).*/\1/p')
  echo "       systemd-analyze security: exposure $score"
  check "exposure level <= 2.0 (got ${score:-none})" \
    python3 -c "import sys; sys.exit(0 if float('${score:-99}') <= 2.0 else 1)"
else
  echo "       systemd-analyze not installed: unit checks skipped"
fi
check "/usr/sbin/kmsd --version" grep -qE '^kmsd [0-9]+\.[0-9]+\.[0-9]+' <<<"$(/usr/sbin/kmsd --version)"
check "/usr/bin/kmsctl --version" \
  grep -qE '^kmsctl [0-9]+\.[0-9]+\.[0-9]+' <<<"$(/usr/bin/kmsctl --version)"
check "--version matches the package version" \
  grep -qF "$(dpkg-query -W -f='${Version}' kmsd | cut -d- -f1)" <<<"$(/usr/sbin/kmsd --version)"

# --- 4. certificates via the acme hook; the packaged config ---------------------
"$src/deploy/gen-pki.sh" "$tmp/pki" --nodes 1 >/dev/null || { bad "gen-pki.sh"; exit 1; }
if KMSD_ACME_CERT=$tmp/pki/node1.pem KMSD_ACME_KEY=$tmp/pki/node1-key.pem KMSD_RELOAD=true \
   /usr/lib/kmsd/kmsd-acme-reload >"$tmp/acme.log" 2>&1; then
  ok "acme hook: $(cat "$tmp/acme.log")"
else
  bad "acme hook failed: $(cat "$tmp/acme.log")"
fi
check "acme hook: talos.key 640 root:kmsd" \
  test "$(stat -c '%a %U:%G' /etc/kmsd/tls/talos.key)" = "640 root:kmsd"
check "acme hook: talos.pem 644 root:kmsd" \
  test "$(stat -c '%a %U:%G' /etc/kmsd/tls/talos.pem)" = "644 root:kmsd"
if KMSD_ACME_CERT=$tmp/pki/node1.pem KMSD_ACME_KEY=$tmp/pki/operator-key.pem KMSD_RELOAD=true \
   /usr/lib/kmsd/kmsd-acme-reload >"$tmp/acme2.log" 2>&1; then
  bad "acme hook accepted a key that does not match the certificate"
else
  ok "acme hook refuses a mismatched key: $(cat "$tmp/acme2.log")"
fi
check "refused key left the installed one alone" \
  cmp -s /etc/kmsd/tls/talos.key "$tmp/pki/node1-key.pem"
install -m 0644 -o root -g kmsd "$tmp/pki/node1.pem" /etc/kmsd/tls/node.pem
install -m 0640 -o root -g kmsd "$tmp/pki/node1-key.pem" /etc/kmsd/tls/node.key
install -m 0644 -o root -g kmsd "$tmp/pki/ca.pem" /etc/kmsd/tls/cluster-ca.pem
install -m 0644 -o root -g kmsd "$tmp/pki/ca.pem" /etc/kmsd/tls/operator-ca.pem
as_kmsd() { setpriv --reuid=kmsd --regid=kmsd --init-groups --no-new-privs --inh-caps=-all "$@"; }
out=$(as_kmsd /usr/sbin/kmsd --config /etc/kmsd/kmsd.yaml --check-config 2>&1)
check "packaged /etc/kmsd/kmsd.yaml passes --check-config as kmsd: $out" \
  grep -q "configuration OK" <<<"$out"

# --- 5. run the installed kmsd as the kmsd user under a fake NOTIFY_SOCKET -------
p0=$PORT_BASE; p1=$((PORT_BASE + 1)); p2=$((PORT_BASE + 2)); p3=$((PORT_BASE + 3))
cat >"$tmp/test.yaml" <<EOF
nodeId: 1
dataDir: /var/lib/kmsd
talos: { listen: "127.0.0.1:$p0", certFile: /etc/kmsd/tls/talos.pem, keyFile: /etc/kmsd/tls/talos.key }
cluster: { listen: "127.0.0.1:$p1" }
raft: { listen: "127.0.0.1:$p2" }
http: { listen: "127.0.0.1:$p3" }
tls:
  nodeCertFile: /etc/kmsd/tls/node.pem
  nodeKeyFile: /etc/kmsd/tls/node.key
  clusterCAFile: /etc/kmsd/tls/cluster-ca.pem
  operatorCAFile: /etc/kmsd/tls/operator-ca.pem
initialCluster:
  - { id: 1, raft: "127.0.0.1:$p2", cluster: "127.0.0.1:$p1" }
EOF
chmod 0644 "$tmp/test.yaml"
# The notify listener: one datagram per line in notify.log ("\n" -> " | ").
# notify.times: the same with a monotonic timestamp in front.
/usr/bin/python3 - "$tmp/notify.sock" "$tmp/notify.log" "$tmp/notify.times" <<'PY' &
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
with open(sys.argv[2], "a", buffering=1) as f, open(sys.argv[3], "a", buffering=1) as t:
    f.write("LISTENING\n")
    while True:
        m = s.recv(4096).decode(errors="replace").replace("\n", " | ")
        t.write("%.3f %s\n" % (time.monotonic(), m))
        f.write(m + "\n")
PY
listener_pid=$!
wait_for() { # file regex seconds
  local n=0
  until grep -qE "$2" "$1" 2>/dev/null; do
    n=$((n + 1)); [ $n -lt $(($3 * 10)) ] || return 1
    sleep 0.1
  done
}
wait_for "$tmp/notify.log" LISTENING 10 || bad "notify listener did not start"
(umask 0077; cd /; exec setpriv --reuid=kmsd --regid=kmsd --init-groups --no-new-privs \
   --inh-caps=-all env NOTIFY_SOCKET="$tmp/notify.sock" WATCHDOG_USEC=2000000 \
   /usr/sbin/kmsd --config "$tmp/test.yaml") >"$tmp/kmsd.log" 2>&1 &
kmsd_pid=$!
if wait_for "$tmp/notify.log" '^READY=1' 60; then
  ok "READY=1: $(grep '^READY=1' "$tmp/notify.log" | head -1)"
else
  bad "no READY=1 within 60 s"; tail -20 "$tmp/kmsd.log"
fi
check "STATUS at READY says uninitialised" grep -qE '^READY=1 \| STATUS=uninitialised' "$tmp/notify.log"
check "kmsd runs as the kmsd user" test "$(ps -o user= -p "$kmsd_pid" 2>/dev/null)" = kmsd
check "WATCHDOG=1 pings (WATCHDOG_USEC=2s)" wait_for "$tmp/notify.log" '^WATCHDOG=1$' 5
ctl() {
  /usr/bin/kmsctl --endpoint "127.0.0.1:$p1" --cacert "$tmp/pki/ca.pem" \
    --cert "$tmp/pki/operator.pem" --key "$tmp/pki/operator-key.pem" "$@"
}
n=0
until ctl status -o json 2>/dev/null | grep -q '"initialized"'; do
  n=$((n + 1)); [ $n -lt 100 ] || break; sleep 0.2
done
if init=$(ctl operator init --key-shares 2 --key-threshold 2 -o json 2>"$tmp/init.err"); then
  ok "kmsctl operator init (2 shares, threshold 2)"
else
  bad "kmsctl operator init: $(cat "$tmp/init.err")"
fi
mapfile -t shares < <(/usr/bin/python3 -c \
  'import json,sys; print("\n".join(json.load(sys.stdin)["shares"]))' <<<"$init" 2>/dev/null)
[ "${#shares[@]}" -eq 2 ] || bad "init returned ${#shares[@]} shares"
check "STATUS after init: sealed (0 of 2)" wait_for "$tmp/notify.log" '^STATUS=sealed: .*\(0 of 2\)' 10
ctl operator unseal "${shares[0]:-x}" >/dev/null 2>&1
check "STATUS after one share: sealed (1 of 2)" wait_for "$tmp/notify.log" '^STATUS=sealed: .*\(1 of 2\)' 10
ctl operator unseal "${shares[1]:-x}" >/dev/null 2>&1
check "STATUS after the second share: serving" wait_for "$tmp/notify.log" '^STATUS=serving: ' 20
served_fp() { # the certificate the Talos port presents now
  openssl s_client -connect "127.0.0.1:$p0" -tls1_3 </dev/null 2>/dev/null |
    openssl x509 -noout -fingerprint -sha256 2>/dev/null
}
fp_of() { openssl x509 -in "$1" -noout -fingerprint -sha256; }
check "Talos port serves the hook-installed certificate" test "$(served_fp)" = "$(fp_of "$tmp/pki/node1.pem")"
# Renewal: the acme hook installs a new certificate and reloads (SIGHUP, as
# `systemctl reload kmsd` does through ExecReload).
"$src/deploy/gen-pki.sh" "$tmp/pki2" --nodes 1 >/dev/null || bad "gen-pki.sh (second PKI)"
if KMSD_ACME_CERT=$tmp/pki2/node1.pem KMSD_ACME_KEY=$tmp/pki2/node1-key.pem \
   KMSD_RELOAD="kill -HUP $kmsd_pid" /usr/lib/kmsd/kmsd-acme-reload >"$tmp/acme3.log" 2>&1; then
  ok "acme hook with reload: $(cat "$tmp/acme3.log")"
else
  bad "acme hook with reload: $(cat "$tmp/acme3.log")"
fi
check "SIGHUP reloads certificates (systemctl reload)" \
  wait_for "$tmp/kmsd.log" 'reloaded for new connections' 10
n=0
until [ "$(served_fp)" = "$(fp_of "$tmp/pki2/node1.pem")" ]; do
  n=$((n + 1)); [ $n -lt 50 ] || break; sleep 0.1
done
check "Talos port serves the renewed certificate after the reload" \
  test "$(served_fp)" = "$(fp_of "$tmp/pki2/node1.pem")"
check "still running after SIGHUP" kill -0 "$kmsd_pid"
check "still serving (STATUS unchanged: no serving -> other transition)" \
  test "$(grep '^STATUS=' "$tmp/notify.log" | tail -1 | cut -d: -f1)" = "STATUS=serving"

dump=$(as_kmsd env KMSD_LOG_LEVEL=debug /usr/sbin/kmsd --config "$tmp/test.yaml" --dump-config \
       --raft-election-timeout 2s 2>&1)
printf '%s\n' "$dump" >"$tmp/dump.yaml"
check "--dump-config: file + env + flag layers" \
  has_all "$tmp/dump.yaml" 'logLevel: debug' 'electionTimeout: 2s' "listen: \"127.0.0.1:$p0\""
check "--dump-config: key file paths shown" grep -q '/etc/kmsd/tls/node.key' "$tmp/dump.yaml"
check "--dump-config: no key material" test -z "$(grep -e '-----BEGIN' "$tmp/dump.yaml")"
chmod 0644 "$tmp/dump.yaml"
out=$(as_kmsd /usr/sbin/kmsd --config "$tmp/dump.yaml" --check-config 2>&1)
check "--dump-config output passes --check-config: $out" grep -q "configuration OK" <<<"$out"
as_kmsd /usr/sbin/kmsd --config "$tmp/dump.yaml" --dump-config >"$tmp/dump2.yaml" 2>&1
check "--dump-config of the dump is identical" cmp -s "$tmp/dump.yaml" "$tmp/dump2.yaml"

sleep 3.5 # let the watchdog tick a few times while serving
kill -TERM "$kmsd_pid"
n=0
while kill -0 "$kmsd_pid" 2>/dev/null; do
  n=$((n + 1)); [ $n -lt 300 ] || { bad "kmsd did not stop within 30 s"; kill -KILL "$kmsd_pid"; break; }
  sleep 0.1
done
wait "$kmsd_pid"; rc=$?
kmsd_pid=""
check "kmsd exit code 0 on SIGTERM (got $rc)" test "$rc" -eq 0
check "STOPPING=1 sent" grep -q '^STOPPING=1' "$tmp/notify.log"
echo "       notifications: $(grep -v '^WATCHDOG' "$tmp/notify.log" | grep -v LISTENING | tr '\n' ';')"
gaps=$(awk '$2 == "WATCHDOG=1" { if (n++) { g = $1 - last; if (g > max) max = g } last = $1 }
            END { printf "%d %.3f", n, max }' "$tmp/notify.times")
echo "       watchdog pings, largest gap (s): $gaps"
check "watchdog: pings every ~1 s, never a gap of 2 s (WatchdogSec) through init/unseal/reload" \
  awk -v g="$gaps" 'BEGIN { split(g, a, " "); exit !(a[1] >= 3 && a[2] < 2.0) }' 
kill "$listener_pid" 2>/dev/null; listener_pid=""
check "data written to /var/lib/kmsd owned by kmsd" \
  test -n "$(find /var/lib/kmsd -mindepth 1 -user kmsd | head -1)"
check "nothing in /var/lib/kmsd readable by others" \
  test -z "$(find /var/lib/kmsd -mindepth 1 -perm /o+r)"

# --- 6. upgrade path (reinstall), remove (data kept), purge (everything gone) -------
echo "# local edit" >>/etc/kmsd/kmsd.yaml
uid_before=$(id -u kmsd)
store_before=$(find /var/lib/kmsd -type f | sort | md5sum)
if dpkg -i --force-confold "$deb" >"$tmp/dpkg-up.log" 2>&1; then ok "dpkg -i over the installed package"; else
  cat "$tmp/dpkg-up.log"; bad "dpkg -i (upgrade path)"; fi
check "upgrade: postinst says the running kmsd needs a manual restart" \
  grep -q "systemctl restart kmsd" "$tmp/dpkg-up.log"
check "upgrade: local conffile edit kept" grep -qx "# local edit" /etc/kmsd/kmsd.yaml
check "upgrade: same kmsd uid" test "$(id -u kmsd)" = "$uid_before"
check "upgrade: /var/lib/kmsd untouched" \
  test "$(find /var/lib/kmsd -type f | sort | md5sum)" = "$store_before" -a \
       "$(stat -c '%a %U:%G' /var/lib/kmsd)" = "700 kmsd:kmsd"
# --- 6. remove (data kept), purge (everything gone) -------------------------------
if dpkg -r kmsd kmsctl >"$tmp/dpkg-r.log" 2>&1; then ok "dpkg -r"; else
  cat "$tmp/dpkg-r.log"; bad "dpkg -r"; fi
check "after -r: binaries gone" test ! -e /usr/sbin/kmsd -a ! -e /usr/bin/kmsctl
check "after -r: state kmsd:kmsd 700 with data kept" \
  test "$(stat -c '%a %U:%G' /var/lib/kmsd 2>/dev/null)" = "700 kmsd:kmsd" -a -n "$(ls -A /var/lib/kmsd)"
check "after -r: conffile and certificates kept" test -f /etc/kmsd/kmsd.yaml -a -f /etc/kmsd/tls/node.key
check "after -r: user kept" test -n "$(getent passwd kmsd)"
check "after -r: dpkg state config-files" \
  grep -q "config-files" <<<"$(dpkg-query -W -f='${Status}' kmsd 2>/dev/null)"
if dpkg -P kmsd kmsctl >"$tmp/dpkg-p.log" 2>&1; then ok "dpkg -P"; else
  cat "$tmp/dpkg-p.log"; bad "dpkg -P"; fi
left=""
while read -r f; do
  case "$f" in
    /.|/etc|/lib|/lib/systemd|/lib/systemd/system|/usr|/usr/bin|/usr/sbin|/usr/lib|/usr/share|\
      /usr/share/doc) continue ;;
  esac
  [ -e "$f" ] && left="$left $f"
done <"$tmp/listed"
check "after -P: nothing dpkg -L listed is left (${left:-none})" test -z "$left"
for f in /var/lib/kmsd /etc/kmsd /usr/lib/kmsd /etc/systemd/system/multi-user.target.wants/kmsd.service \
         /etc/systemd/system/kmsd.service /var/lib/systemd/deb-systemd-helper-enabled/kmsd.service \
         /var/lib/systemd/deb-systemd-helper-masked/kmsd.service; do
  check "after -P: $f gone" test ! -e "$f" -a ! -L "$f"
done
check "after -P: user and group kmsd gone" \
  test -z "$(getent passwd kmsd)" -a -z "$(getent group kmsd)"
check "after -P: dpkg knows neither package" \
  test -z "$(dpkg-query -W -f='${Status}\n' kmsd kmsctl 2>/dev/null | grep -v not-installed)"
exit $fail
