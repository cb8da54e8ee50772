#!/usr/bin/env bash
# Runs every command of docs/getting-started.md, in order, as one shell
# session from the repository's root. Only the ports (1400N, 1410N, 1420N)
# and the folder (/tmp/cachecast-try) are replaced by free ones, so that a
# run never meets another. Fails on the first command that fails, or after
# 180 s; whatever the doc started is stopped either way.
set -euo pipefail
cd "$(dirname "$0")/.."
doc=docs/getting-started.md

free_prefix() {
  # A 4-digit prefix P with P1..P3 free, below the ephemeral range.
  python3 - "$@" <<'PY'
import random, socket, sys
taken = set(sys.argv[1:])
while True:
    p = random.randrange(2000, 3200)
    if str(p) in taken:
        continue
    try:
        for d in (1, 2, 3):
            s = socket.socket(); s.bind(("127.0.0.1", p * 10 + d)); s.close()
    except OSError:
        continue
    print(p)
    break
PY
}
mesh=$(free_prefix)
api=$(free_prefix "$mesh")
resp=$(free_prefix "$mesh" "$api")
dir=$(mktemp -d /tmp/cachecast-getting-started.XXXXXX)
rmdir "$dir"

script=$(mktemp)
trap 'rm -f "$script"' EXIT
{
  echo "set -euo pipefail"
  # The blocks fenced as sh, in order.
  awk '/^```sh$/ {on=1; next} /^```/ {on=0} on' "$doc" \
    | sed -e "s/1400/$mesh/g" -e "s/1410/$api/g" -e "s/1420/$resp/g" \
          -e "s#/tmp/cachecast-try#$dir#g"
} > "$script"
echo "running $(grep -c '' "$script") lines of $doc (ports ${mesh}N, ${api}N, ${resp}N; folder $dir)"

# Its own process group, so that everything it started can be stopped.
set +e
setsid timeout 180 bash "$script" &
pid=$!
wait "$pid"
rc=$?
set -e
kill -- -"$pid" 2>/dev/null || true
rm -rf "$dir"
if [ "$rc" -ne 0 ]; then
  echo "docs/getting-started.md: a command failed (exit $rc); the script was:"
  cat -n "$script"
  exit 1
fi
echo "docs/getting-started.md: every command ran"
