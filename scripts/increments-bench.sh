#!/usr/bin/env bash
# Reproduces the README's measurements: the bare 202 ceiling, embedded (with and without
# fsync), Redis + Postgres in one process, and as separate api + worker processes.
# Usage: scripts/increments-bench.sh [path/to/weir]
set -euo pipefail
cd "$(dirname "$0")/.."
WEIR=${1:-target/release/weir}
[ -x "$WEIR" ] || cargo build --release -p weir
source scripts/increments-scratch.sh
LOAD=(--connections "${CONNECTIONS:-64}" --duration-secs "${SECONDS_OF_LOAD:-10}" --keys 1000)
S=bench_$(date +%s)
S2=${S}_split
SCRATCH_PREFIXES=("$S" "$S2")

run() { # name, port, then the server command
  local name=$1 port=$2; shift 2
  "$@" >"$DATA/$name.log" 2>&1 &
  local pid=$!
  sleep 1.5
  echo "== $name"
  "$WEIR" increments bench --url "http://127.0.0.1:$port" "${LOAD[@]}" ${VERIFY:-} | tail -n +1
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

run bare 3400 "$WEIR" increments bench --bare 127.0.0.1:3400
VERIFY=--verify run embedded 3401 "$WEIR" increments serve --bind-address 127.0.0.1 --port 3401 --data-dir "$DATA/e1"
VERIFY=--verify run embedded-fsync 3402 "$WEIR" increments serve --bind-address 127.0.0.1 --port 3402 --data-dir "$DATA/e2" --fsync true
VERIFY=--verify run redis-postgres 3403 "$WEIR" increments serve --bind-address 127.0.0.1 --port 3403 \
  --queue "$REDIS" --database "$PG" --stream "$S" --table-prefix "$S"
"$WEIR" --metrics-addr 127.0.0.1:9191 increments worker --queue "$REDIS" --database "$PG" --stream "$S2" --table-prefix "$S2" >"$DATA/worker.log" 2>&1 &
VERIFY=--verify run api-plus-worker 3404 "$WEIR" increments api --bind-address 127.0.0.1 --port 3404 --database "$PG" --table-prefix "$S2" \
  --queue "$REDIS" --stream "$S2"
echo "worker: $(curl -s 127.0.0.1:9191/metrics | grep '^weir_increments_staleness_max_seconds')"
