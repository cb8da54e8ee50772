#!/usr/bin/env bash
# The benchmark of docs/performance.md: cachecast vs Redis and NATS pub/sub
# vs raw TCP on loopback. Installs redis-server and nats-server (Debian's)
# when they are missing, builds the sidecar and the bench, then runs the
# bench with the arguments given (e.g. --json, --in-process). About two
# minutes with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "missing: ${missing[*]}: apt-get install -y ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  else
    echo "missing: ${missing[*]} (sudo apt-get install ${missing[*]}); skipped" >&2
  fi
fi

# One build at a time: the sidecar binary (for its idle RSS) and the bench.
cargo build --release --features cli --bin cachecast --example bench >&2
exec target/release/examples/bench "$@"
