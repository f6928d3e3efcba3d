#!/usr/bin/env bash
# Runs Prometheus' own linter, `promtool check metrics`, on the /metrics page of each named
# service right after it starts: names, types, help text. Exits non-zero on any complaint.
#
#   scripts/promtool-check.sh [SERVICE...]   SERVICE: relay (default), increments, kv, distinct,
#                                            distinct-worker, up
#
# `up` runs `weir up` (every service, on its default ports) in a scratch directory.
#
# WEIR_BIN picks the binary (default target/debug/weir, built if missing); METRICS_PORT the
# first metrics port to use (default 19181).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/tools.sh

bin=${WEIR_BIN:-target/debug/weir}
[ -x "$bin" ] || cargo build -p weir
bin=$(realpath "$bin")
port=${METRICS_PORT:-19181}
services=("$@")
[ ${#services[@]} -gt 0 ] || services=(relay)
workdir=$(mktemp -d -t weir-promtool.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$workdir"
}
trap cleanup EXIT

start() {
  local service=$1 addr=$2
  case "$service" in
    relay)
      # The relay's own ports are picked by the system: only its metrics are read here.
      (cd "$workdir" && eventListenerPort=0 clientListenerPort=0 \
        exec "$bin" relay serve --metrics-addr "$addr") \
        >"$workdir/$service.out" 2>"$workdir/$service.log" &
      ;;
    increments)
      mkdir -p "$workdir/increments-data"
      "$bin" increments serve --port 0 --data-dir "$workdir/increments-data" \
        --metrics-addr "$addr" >"$workdir/$service.out" 2>"$workdir/$service.log" &
      ;;
    kv)
      # Metrics exist from start-up whether or not the broker is reachable.
      "$bin" kv serve --data-dir "$workdir/kv-data" --queue "weir.promtool.$$" \
        --metrics-addr "$addr" >"$workdir/$service.out" 2>"$workdir/$service.log" &
      ;;
    distinct)
      # The coordinator, with one worker process of its own on a port next to the metrics'.
      "$bin" distinct coordinator --port 0 --workers "127.0.0.1:$((port + 1000))" \
        --database "$workdir/distinct-data" --worker-logs "$workdir/distinct-logs" \
        --metrics-addr "$addr" >"$workdir/$service.out" 2>"$workdir/$service.log" &
      ;;
    distinct-worker)
      # A worker serves its metrics on its own API port.
      "$bin" distinct worker --listen "$addr" --database "$workdir/distinct-worker-data" \
        >"$workdir/$service.out" 2>"$workdir/$service.log" &
      ;;
    up)
      (cd "$workdir" && exec "$bin" --metrics-addr "$addr" up) \
        >"$workdir/$service.out" 2>"$workdir/$service.log" &
      ;;
    *)
      echo "unknown service: $service (relay, increments, kv, distinct, distinct-worker, up)" >&2
      return 2
      ;;
  esac
  pids+=($!)
}

status=0
for service in "${services[@]}"; do
  addr="127.0.0.1:$port"
  port=$((port + 1))
  start "$service" "$addr"
  # The first line on stdout announces that the service runs, its metrics registered.
  for _ in $(seq 1 100); do
    [ -s "$workdir/$service.out" ] && break
    sleep 0.1
  done
  if ! curl -fsS "http://$addr/metrics" >"$workdir/$service.metrics"; then
    echo "$service: no metrics on $addr" >&2
    tail -n 20 "$workdir/$service.log" >&2 || true
    status=1
    continue
  fi
  # promtool passes an empty page, but a metric missing at start-up breaks rate() and alerts.
  if ! grep -q '^# TYPE' "$workdir/$service.metrics"; then
    echo "$service: no metric exists at start-up"
    status=1
    continue
  fi
  if report=$(promtool check metrics <"$workdir/$service.metrics" 2>&1) && [ -z "$report" ]; then
    echo "$service: promtool check metrics passed ($(grep -c '^# TYPE' "$workdir/$service.metrics") metrics)"
  else
    echo "$service: promtool check metrics complains:"
    echo "$report" | sed 's/^/  /'
    status=1
  fi
done
exit "$status"
