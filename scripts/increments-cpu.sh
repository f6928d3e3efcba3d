#!/usr/bin/env bash
# Where the CPU of one accepted increment goes: wrk (-t2 -c64, scripts/wrk/increment.lua)
# against the bare 202 handler, then against Redis + Postgres with `api` and `worker` as
# separate processes; CPU time of each process (and of Redis, Postgres and wrk itself) from
# /proc around the run, divided by the requests wrk completed.
# Usage: scripts/increments-cpu.sh [path/to/weir] [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
WEIR=${1:-target/release/weir}
SECS=${2:-8}
bash scripts/tools.sh wrk
[ -x "$WEIR" ] || cargo build --release -p weir
source scripts/increments-scratch.sh
S=cpu_$(date +%s)
SCRATCH_PREFIXES=("$S")
TICK=$(getconf CLK_TCK)

# Sum of utime + stime, in ticks, over the given pids (gone ones count 0).
ticks() {
  local total=0 pid
  for pid in "$@"; do
    [ -r "/proc/$pid/stat" ] || continue
    total=$((total + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat")))
  done
  echo "$total"
}

# Runs wrk against $1 (port) while counting the CPU of the named groups of pids ("name=pid pid").
measure() {
  local port=$1 label=$2
  shift 2
  local names=() before=() group
  for group in "$@"; do
    names+=("${group%%=*}")
    before+=("$(ticks ${group#*=})")
  done
  wrk -t2 -c64 -d"${SECS}s" -s scripts/wrk/increment.lua "http://127.0.0.1:$port" >"$DATA/wrk.out" &
  local wrk_pid=$!
  sleep 0.2
  local wrk_before
  wrk_before=$(ticks "$wrk_pid")
  local wrk_last=$wrk_before now
  while kill -0 "$wrk_pid" 2>/dev/null; do
    now=$(ticks "$wrk_pid")
    [ "$now" -gt 0 ] && wrk_last=$now
    sleep 0.1
  done
  wait "$wrk_pid"
  local requests
  requests=$(awk '/requests in/ {print $1}' "$DATA/wrk.out")
  local rps
  rps=$(awk '/^Requests\/sec/ {print $2}' "$DATA/wrk.out")
  printf '%-16s %10s req/s ' "$label" "$rps"
  local i after
  for i in "${!names[@]}"; do
    group=${*:$((i + 1)):1}
    after=$(ticks ${group#*=})
    awk -v n="${names[$i]}" -v t=$((after - ${before[$i]})) -v hz="$TICK" -v r="$requests" \
      'BEGIN { printf " %s %.1f us", n, t / hz * 1e6 / r }'
  done
  awk -v t=$((wrk_last - wrk_before)) -v hz="$TICK" -v r="$requests" \
    'BEGIN { printf "  wrk %.1f us (from 0.2 s in)\n", t / hz * 1e6 / r }'
}

redis_pids=$(pgrep -x redis-server | tr '\n' ' ')
postgres_pids() { pgrep -x postgres | tr '\n' ' '; }

"$WEIR" increments bench --bare 127.0.0.1:3430 >/dev/null 2>&1 &
bare=$!
"$WEIR" increments api --bind-address 127.0.0.1 --port 3431 \
  --queue "$REDIS" --database "$PG" --stream "$S" --table-prefix "$S" >/dev/null 2>&1 &
api=$!
"$WEIR" increments worker --queue "$REDIS" --database "$PG" --stream "$S" --table-prefix "$S" \
  >/dev/null 2>&1 &
worker=$!
sleep 2
measure 3430 bare "bare=$bare"
measure 3431 redis-postgres "api=$api" "worker=$worker" "redis=$redis_pids" "postgres=$(postgres_pids)"
