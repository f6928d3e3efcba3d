#!/usr/bin/env bash
# End-to-end run of the relay: `weir relay serve` in the background, `weir relay check`
# against it, then the server's peak resident memory. CI runs it with 1,000,000 events;
# with no argument it is the relay benchmark (10,000,000 events, the verifier's default).
#
#   scripts/relay-e2e.sh [EVENTS] [extra `weir relay check` flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
events=${1:-10000000}
shift || true
bin=${WEIR_BIN:-target/release/weir}
[ -x "$bin" ] || cargo build --release -p weir
event_port=${RELAY_EVENT_PORT:-19090}
client_port=${RELAY_CLIENT_PORT:-19099}
log=${RELAY_LOG:-$(mktemp -t weir-relay-e2e.XXXXXX)}

"$bin" relay serve --bind-address 127.0.0.1 \
  --event-listener-port "$event_port" --client-listener-port "$client_port" 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$client_port") 2>/dev/null; then break; fi
  sleep 0.1
done

status=0
"$bin" relay check --total-events "$events" \
  --event-listener-port "$event_port" --client-listener-port "$client_port" "$@" || status=$?

peak_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$server/status" 2>/dev/null || echo 0)
kill -INT "$server" 2>/dev/null || true
wait "$server" 2>/dev/null || true
trap - EXIT
echo "relay server peak RSS: $((peak_kib / 1024)) MiB (${peak_kib} KiB) for ${events} events"
if [ "$status" -ne 0 ]; then
  echo "relay check failed (exit $status); server log: $log" >&2
  tail -n 20 "$log" >&2 || true
fi
exit "$status"
