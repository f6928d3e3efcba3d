#!/usr/bin/env bash
# `weir top` end to end, in a real terminal: the binary runs in tmux against `weir relay serve`
# while `weir relay check` loads the relay, and the screen is read with `tmux capture-pane`.
# Passes when the relay's event rate on the screen is non-zero during the load, back to 0/s
# after it ends, and `q` quits.
#
#   scripts/top-e2e.sh [EVENTS]     (default 3,000,000: several seconds of load)
#
# WEIR_BIN picks the binary (default target/debug/weir, built if missing); TOP_E2E_PORT the
# first of three consecutive ports (default 19290: events, metrics, +9 clients);
# TOP_E2E_CAPTURE a file to keep the screen seen under load in.
set -euo pipefail
cd "$(dirname "$0")/.."
events=${1:-3000000}

if ! command -v tmux >/dev/null; then
  apt-get install -y tmux >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y tmux >/dev/null; }
fi

bin=${WEIR_BIN:-target/debug/weir}
[ -x "$bin" ] || cargo build -p weir
bin=$(realpath "$bin")
base=${TOP_E2E_PORT:-19290}
event_port=$base
metrics_addr=127.0.0.1:$((base + 1))
client_port=$((base + 9))
session=weir-top-e2e-$$
workdir=$(mktemp -d -t weir-top-e2e.XXXXXX)
capture=${TOP_E2E_CAPTURE:-$workdir/under-load.txt}
server=
check=
cleanup() {
  tmux kill-session -t "$session" 2>/dev/null || true
  [ -z "$check" ] || kill "$check" 2>/dev/null || true
  [ -z "$server" ] || { kill -INT "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
  rm -rf "$workdir"
}
trap cleanup EXIT
fail() {
  echo "top-e2e: $*" >&2
  echo "--- last screen ---" >&2
  tmux capture-pane -p -t "$session" >&2 2>/dev/null || true
  exit 1
}

(cd "$workdir" && exec "$bin" relay serve --bind-address 127.0.0.1 \
  --event-listener-port "$event_port" --client-listener-port "$client_port" \
  --metrics-addr "$metrics_addr") >"$workdir/relay.out" 2>"$workdir/relay.log" &
server=$!
for _ in $(seq 1 100); do
  [ -s "$workdir/relay.out" ] && break
  sleep 0.1
done
[ -s "$workdir/relay.out" ] || fail "the relay did not start: $(tail -n 5 "$workdir/relay.log")"

tmux new-session -d -s "$session" -x 120 -y 40 "$bin top --url http://$metrics_addr/metrics"

# The relay's event rate as the screen shows it, e.g. "12.3k", or nothing yet.
event_rate() {
  tmux capture-pane -p -t "$session" |
    grep -o 'events_received  *[0-9.]*[kMG]\{0,1\}/s' | awk '{print $2}' | sed 's|/s$||' | head -n 1
}
# Polls the screen until "$1" holds for the rate, for at most $2 seconds.
wait_for_rate() {
  local condition=$1 deadline=$((SECONDS + $2)) rate
  while [ "$SECONDS" -lt "$deadline" ]; do
    rate=$(event_rate)
    if [ -n "$rate" ] && eval "$condition"; then
      echo "$rate"
      return 0
    fi
    sleep 0.3
  done
  return 1
}

# Other groups (the runtime's weir_http_* listener metrics) may come first: tab to the relay.
for _ in $(seq 1 50); do
  tmux capture-pane -p -t "$session" | grep -q '┌ relay' && break
  tmux send-keys -t "$session" Tab
  sleep 0.2
done
tmux capture-pane -p -t "$session" | grep -q '┌ relay' || fail "no relay tab"

wait_for_rate '[ "$rate" = 0 ]' 15 >/dev/null || fail "no zero event rate before the load"

"$bin" relay check --total-events "$events" \
  --event-listener-port "$event_port" --client-listener-port "$client_port" \
  >"$workdir/check.out" 2>"$workdir/check.log" &
check=$!

busy=$(wait_for_rate '[ "$rate" != 0 ]' 30) || fail "the event rate stayed at zero under load"
tmux capture-pane -p -t "$session" >"$capture"
echo "under load: events_received $busy/s"

status=0
wait "$check" || status=$?
check=
[ "$status" -eq 0 ] || fail "weir relay check failed (exit $status): $(tail -n 5 "$workdir/check.log")"

wait_for_rate '[ "$rate" = 0 ]' 10 >/dev/null || fail "the event rate did not fall back to zero after the load"
echo "after the load: events_received 0/s"

tmux send-keys -t "$session" q
for _ in $(seq 1 50); do
  tmux has-session -t "$session" 2>/dev/null || break
  sleep 0.1
done
if tmux has-session -t "$session" 2>/dev/null; then fail "q did not quit"; fi
echo "q quit weir top"
echo "top-e2e: passed; the screen under load:"
cat "$capture"
