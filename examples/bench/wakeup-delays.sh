#!/usr/bin/env bash
# Where a latency tail comes from: runs the bench under `perf sched record`
# and prints, for every busy thread of the bench's node processes and of
# the sidecars, how long it waited for a CPU after being woken, and how
# often it was woken onto an idle CPU (in a virtual machine, a halt exit).
#
#   examples/bench/wakeup-delays.sh --only cachecast --nodes 2 --workloads latency
#
# The arguments go to the bench as they are (`--no-memory` is added). Needs
# perf (linux-tools) and the right to trace the scheduler (root, or
# kernel.perf_event_paranoid <= 1); without them it says so and stops.
set -euo pipefail

if ! command -v perf >/dev/null; then
  echo "wakeup-delays: skipped: perf is not installed (apt-get install linux-perf, or linux-tools-\$(uname -r))" >&2
  exit 0
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
bench="$root/target/release/examples/bench"
if [ ! -x "$bench" ] || [ ! -x "$root/target/release/cachecast" ]; then
  echo "wakeup-delays: build first: cargo build --release --features cli --bin cachecast --example bench" >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! perf sched record -o "$work/sched.data" -- "$bench" --no-memory "$@" >"$work/bench.out" 2>"$work/bench.err"; then
  echo "wakeup-delays: perf sched record failed (no right to trace the scheduler?):" >&2
  tail -5 "$work/bench.err" >&2
  exit 2
fi
grep -E '^  p50|: latency|: throughput' "$work/bench.err" || true
perf sched timehist -i "$work/sched.data" >"$work/timehist" 2>/dev/null

# timehist columns: time, [cpu], task[tid/pid], wait, sch delay, run (ms).
# A thread's line is its switch-in; the line before it on the same CPU
# names what ran there, <idle> when the CPU was idle.
awk '
  NR > 3 && ($3 ~ /^(bench|cachecast)\[/) { n[$3]++ }
  END { for (t in n) if (n[t] >= 1000) print t }
' "$work/timehist" | sort | while read -r thread; do
  awk -v t="$thread" '
    NR > 3 {
      if ($3 == t) print $5 * 1000, (prev[$2] == "<idle>") ? 1 : 0
      prev[$2] = $3
    }
  ' "$work/timehist" | sort -n | awk -v t="$thread" '
    { d[NR] = $1; if ($2) idle++; if ($1 > 50) { long++; if ($2) longidle++ } }
    END {
      printf "%-24s woken %6d times, %3.0f%% onto an idle CPU; waited µs: p50 %4.0f  p99 %5.0f  p99.9 %5.0f;", \
        t, NR, 100 * idle / NR, d[int(NR * .5) + 1], d[int(NR * .99) + 1], d[int(NR * .999) + 1]
      printf " over 50 µs: %5d, %3.0f%% of them onto an idle CPU\n", long, long ? 100 * longidle / long : 0
    }'
done
