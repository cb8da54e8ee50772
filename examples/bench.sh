#!/usr/bin/env bash
# The benchmark of docs/performance.md: cachecast vs Redis pub/sub vs raw
# TCP on loopback. Installs redis-server (Debian's) when it is missing,
# builds the sidecar and the bench, then runs the bench with the arguments
# given (e.g. --json, --processes). About a minute with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "redis-server is missing: apt-get install -y redis-server" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2
  else
    echo "redis-server is missing (sudo apt-get install redis-server); Redis is skipped" >&2
  fi
fi

# One build at a time: the sidecar binary (for its idle RSS) and the bench.
cargo build --release --features cli --bin cachecast --example bench >&2
exec target/release/examples/bench "$@"
