#!/usr/bin/env bash
# An independent load tool against the increments service: wrk (Debian's package, installed
# if missing) with scripts/wrk/increment.lua (1,000 keys), -t2 -c64, against the bare 202
# handler, the embedded mode, the embedded mode with an Idempotency-Key on every request,
# and Redis + Postgres, interleaved round after round; ends with the median of each and its
# share of bare. Usage: scripts/increments-wrk.sh [path/to/weir] [rounds] [seconds]; TARGETS
# (e.g. "bare:3420:0 redis-postgres:3422:0") runs only some of them.
set -euo pipefail
cd "$(dirname "$0")/.."
WEIR=${1:-target/release/weir}
ROUNDS=${2:-3}
SECS=${3:-8}
bash scripts/tools.sh wrk
[ -x "$WEIR" ] || cargo build --release -p weir
source scripts/increments-scratch.sh
S=wrk_$(date +%s)
RESULTS="$DATA/results"
SCRATCH_PREFIXES=("$S")
"$WEIR" increments bench --bare 127.0.0.1:3420 >/dev/null 2>&1 &
"$WEIR" increments serve --bind-address 127.0.0.1 --port 3421 --data-dir "$DATA/e" >/dev/null 2>&1 &
"$WEIR" increments serve --bind-address 127.0.0.1 --port 3422 --data-dir "$DATA/r" \
  --queue "$REDIS" --database "$PG" --stream "$S" --table-prefix "$S" >/dev/null 2>&1 &
sleep 2
for round in $(seq "$ROUNDS"); do
  for target in ${TARGETS:-bare:3420:0 embedded:3421:0 embedded-keyed:3421:1 redis-postgres:3422:0 redis-postgres-keyed:3422:1}; do
    IFS=: read -r name port keyed <<<"$target"
    out=$(KEYED=$keyed wrk -t2 -c64 -d"${SECS}s" -s scripts/wrk/increment.lua "http://127.0.0.1:$port")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "Latency" {print $2; exit}' <<<"$out")
    bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    echo "round $round $name $rps ${p50:-?} ${bad:-0}" | tee -a "$RESULTS"
  done
done
python3 - "$RESULTS" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    _, _, name, rps, _, bad = line.split()
    runs.setdefault(name, []).append((float(rps), int(bad)))
bare = statistics.median(r for r, _ in runs["bare"])
print(f"{'target':<22} {'req/s (median)':>15} {'vs bare':>8} {'non-2xx':>8}")
for name, rs in runs.items():
    rps = statistics.median(r for r, _ in rs)
    print(f"{name:<22} {rps:>15.0f} {rps / bare:>8.0%} {sum(b for _, b in rs):>8}")
PY
