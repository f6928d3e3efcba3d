#!/usr/bin/env bash
# The same load against the bare 202 ceiling, embedded, and Redis + Postgres, interleaved
# round after round so that whatever else the machine does hits all three alike; ends with
# the median of each. This is the benchmark behind the README's increments table.
# Usage: scripts/increments-bench-interleaved.sh [path/to/weir] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
WEIR=${1:-target/release/weir}
ROUNDS=${2:-5}
[ -x "$WEIR" ] || cargo build --release -p weir
source scripts/increments-scratch.sh
S=bench_$(date +%s)
RESULTS="$DATA/results"
SCRATCH_PREFIXES=("$S")
"$WEIR" increments bench --bare 127.0.0.1:3410 >/dev/null 2>&1 &
"$WEIR" increments serve --bind-address 127.0.0.1 --port 3411 --data-dir "$DATA/e" >/dev/null 2>&1 &
"$WEIR" increments serve --bind-address 127.0.0.1 --port 3412 --data-dir "$DATA/r" \
  --queue "$REDIS" --database "$PG" --stream "$S" --table-prefix "$S" >/dev/null 2>&1 &
sleep 2
for round in $(seq "$ROUNDS"); do
  for target in bare:3410 embedded:3411 redis-postgres:3412; do
    name=${target%%:*} port=${target##*:}
    verify=; [ "$name" != bare ] && verify=--verify
    line=$("$WEIR" increments bench --url "http://127.0.0.1:$port" --connections 64 --duration-secs 8 --keys 1000 $verify | tail -1)
    echo "round $round $name $line" | tee -a "$RESULTS"
  done
done
python3 - "$RESULTS" <<'PY' || true
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    _, _, name, doc = line.split(" ", 3)
    runs.setdefault(name, []).append(json.loads(doc))
bare = statistics.median(r["rps"] for r in runs["bare"])
print(f"{'target':<15} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'staleness s':>12} {'vs bare':>8} verified")
for name, rs in runs.items():
    rps = statistics.median(r["rps"] for r in rs)
    stale = max((r["max_staleness_s"] or 0) for r in rs)
    print(f"{name:<15} {rps:>8.0f} {statistics.median(r['p50_ms'] for r in rs):>7.2f} "
          f"{statistics.median(r['p99_ms'] for r in rs):>7.2f} {stale:>12.3f} {rps / bare:>8.0%} "
          f"{all(r['passed'] for r in rs)}")
PY
