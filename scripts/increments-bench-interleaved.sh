#!/usr/bin/env bash
# The same load against the bare 202 ceiling, embedded, and Redis + Postgres, interleaved
# round after round so that whatever else the machine does hits all three alike.
# Usage: crates/weir-increments/scripts/bench-interleaved.sh [path/to/weir] [rounds]
set -euo pipefail
WEIR=${1:-target/release/weir}
ROUNDS=${2:-3}
PG=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
REDIS=${REDIS_URL:-redis://127.0.0.1:6379}
DATA=$(mktemp -d)
S=bench_$(date +%s)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DATA"; redis-cli -u "$REDIS" del "$S" >/dev/null 2>&1 || true' EXIT
export RUST_LOG=warn
unset DATABASE_URL REDIS_URL
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
    echo "round $round $name $line"
  done
done
