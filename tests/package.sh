#!/usr/bin/env bash
# The Debian package, as an operator meets it: built by
# debian/build-package, checked by lintian (no errors) and by
# systemd-analyze, installed on this machine, its unit's commands run as
# the unit runs them (user, environment file, ExecStartPre, ExecStart,
# SIGTERM), then purged. Needs root, cargo-deb, lintian and dpkg-dev.
#
#   tests/package.sh [DEB]   (DEB: a package already built; else it builds)
#
# It installs the package on the machine it runs on, so it refuses to run
# where cachecast is already installed: it would replace and then purge it.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "package test FAILED: $*" >&2
  exit 1
}
step() { echo "-- $*"; }

[ "$(id -u)" -eq 0 ] || fail "needs root (it installs and purges the package)"
if dpkg-query -W -f='${Status}' cachecast 2>/dev/null | grep -q 'installed'; then
  fail "cachecast is already installed here; this test would replace and purge it"
fi

if [ $# -ge 1 ]; then
  deb=$1
  [ -f "$deb" ] || fail "no such package: $deb"
else
  step "build"
  # cargo deb prints the paths it wrote: the package's is the .deb one.
  deb=$(debian/build-package | grep -E '/cachecast_[^/]*\.deb$')
fi

step "lintian (errors fail)"
lintian --fail-on error --info "$deb"

work=$(mktemp -d)
installed=0
api_pid=
cleanup() {
  [ -n "$api_pid" ] && kill -KILL "$api_pid" 2>/dev/null || true
  if [ "$installed" = 1 ]; then
    dpkg --purge cachecast >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

step "install"
dpkg -i "$deb"
installed=1
unit=/usr/lib/systemd/system/cachecast.service
[ -x /usr/bin/cachecast ] || fail "/usr/bin/cachecast missing"
[ -f "$unit" ] || fail "$unit missing"
getent passwd cachecast >/dev/null || fail "no user cachecast"
state=$(stat -c '%U:%G %a' /var/lib/cachecast)
[ "$state" = "cachecast:cachecast 750" ] || fail "/var/lib/cachecast is $state"
dpkg-query -W -f='${Conffiles}\n' cachecast | grep -q /etc/default/cachecast \
  || fail "/etc/default/cachecast is not a conffile"
# Installed, not enabled: it needs a configured dhis.conf first.
if [ -e /etc/systemd/system/multi-user.target.wants/cachecast.service ]; then
  fail "the unit was enabled on install"
fi

step "systemd-analyze verify"
# verify loads the unit as systemd would and checks that its commands
# exist; any output is a finding.
out=$(systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify said: $out"
systemd-analyze security --offline=true "$unit" 2>/dev/null | tail -n 1

step "manual pages and completions"
for page in cachecast cachecast-run cachecast-check cachecast-status cachecast-completions; do
  [ -f /usr/share/man/man1/$page.1.gz ] || fail "no manual page $page(1)"
done
zcat /usr/share/man/man1/cachecast.1.gz | grep -q '^\.SH ENVIRONMENT' \
  || fail "cachecast(1) lacks its ENVIRONMENT section"
bash -c 'source /usr/share/bash-completion/completions/cachecast && complete -p cachecast' \
  >/dev/null || fail "bash completion does not load"

# The unit's own lines, as systemd would run them: its user, its
# environment file (with DHIS2_HOME pointed at a test directory).
exec_line() { sed -n "s/^$1=//p" "$unit"; }
pre=$(exec_line ExecStartPre)
start=$(exec_line ExecStart)
[ "$pre" = "/usr/bin/cachecast check" ] || fail "ExecStartPre is '$pre'"
user=$(exec_line User)
home="$work/dhis2"
mkdir -p "$home"
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
mesh=$(free_port)
api=$(free_port)
cat >"$home/dhis.conf" <<EOF
cluster.instance0.hostname = 127.0.0.1
cluster.instance0.cache.port = $mesh
cluster.instance1.hostname = 127.0.0.1
cluster.instance1.cache.port = $(free_port)
cachecast.bind = 127.0.0.1
cachecast.api.port = $api
cachecast.state.file = /var/lib/cachecast/node.state
EOF
# The service user reads dhis.conf as docs/operations.md says to allow it.
chmod 0711 "$work"
chgrp "$user" "$home" "$home/dhis.conf"
chmod 0750 "$home"
chmod 0640 "$home/dhis.conf"
sed "s|^DHIS2_HOME=.*|DHIS2_HOME=$home|" /etc/default/cachecast >"$work/env"
# The unit's view: EnvironmentFile= (this simple KEY=value file), its
# user and group.
mapfile -t unit_env < <(grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$work/env")
as_unit=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "${unit_env[@]}"
  setpriv --reuid="$user" --regid="$user" --init-groups)

step "ExecStartPre ($pre) as $user"
"${as_unit[@]}" $pre >"$work/check.out" 2>&1 || { cat "$work/check.out"; fail "check failed"; }
grep -q '^valid$' "$work/check.out" || fail "check did not say valid"

step "ExecStartPre on a broken dhis.conf exits 2, naming the problem"
cp "$home/dhis.conf" "$work/good.conf"
echo "cluster.instance1.cache.port = 99999" >>"$home/dhis.conf"
set +e
"${as_unit[@]}" $pre >"$work/bad.out" 2>&1
code=$?
set -e
[ "$code" = 2 ] || { cat "$work/bad.out"; fail "check exited $code on a bad port"; }
grep -q 'cluster.instance1.cache.port' "$work/bad.out" || fail "check did not name the key"
cp "$work/good.conf" "$home/dhis.conf"

step "ExecStart ($start) as $user, then SIGTERM"
"${as_unit[@]}" $start >"$work/run.log" 2>&1 &
api_pid=$!
up=0
for _ in $(seq 1 300); do
  if curl -fsS "http://127.0.0.1:$api/v1/status" >/dev/null 2>&1; then
    up=1
    break
  fi
  kill -0 "$api_pid" 2>/dev/null || break
  sleep 0.1
done
[ "$up" = 1 ] || { cat "$work/run.log"; fail "the API did not answer"; }
kill -TERM "$api_pid"
set +e
wait "$api_pid"
code=$?
set -e
api_pid=
[ "$code" = 0 ] || { cat "$work/run.log"; fail "run exited $code after SIGTERM"; }
[ -s /var/lib/cachecast/node.state ] || fail "no state file written in /var/lib/cachecast"

step "purge"
dpkg --purge cachecast
installed=0
for gone in /usr/bin/cachecast "$unit" /etc/default/cachecast /var/lib/cachecast; do
  [ ! -e "$gone" ] || fail "$gone is left after purge"
done
echo "package test passed: $(basename "$deb")"
