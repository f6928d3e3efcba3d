#!/usr/bin/env bash
# Memory of the relay under stuck clients: `weir relay serve` in the background, CLIENTS
# user clients that send their id and never read, a flood of EVENTS broadcasts, then the
# server's peak resident memory and its resident memory 3 s and 15 s after the clients are
# gone and the relay is idle (read from /proc/<pid>/status: VmHWM, VmRSS), and the relay's
# drop counters.
#
#   scripts/relay-stuck-clients.sh [CLIENTS] [EVENTS] [extra `weir relay serve` flags...]
#
# e.g. scripts/relay-stuck-clients.sh 500 200000 --max-queued-bytes 1099511627776 shows the
# relay without an overall cap.
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-500}
events=${2:-200000}
shift 2 || shift $# || true
bin=${WEIR_BIN:-target/release/weir}
[ -x "$bin" ] || cargo build --release -p weir
event_port=${RELAY_EVENT_PORT:-19190}
client_port=${RELAY_CLIENT_PORT:-19199}
metrics_port=${RELAY_METRICS_PORT:-19100}
log=${RELAY_LOG:-$(mktemp -t weir-relay-stuck.XXXXXX)}

"$bin" --metrics-addr "127.0.0.1:$metrics_port" relay serve --bind-address 127.0.0.1 \
  --event-listener-port "$event_port" --client-listener-port "$client_port" "$@" 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$client_port") 2>/dev/null; then break; fi
  sleep 0.1
done

kib() { awk -v key="$1:" '$1 == key {print $2}' "/proc/$server/status"; }
echo "relay RSS at start: $(($(kib VmRSS) / 1024)) MiB"

python3 - "$clients" "$events" "$event_port" "$client_port" "$server" "$metrics_port" <<'PY'
import socket, sys, time, urllib.request

clients, events, event_port, client_port, pid, metrics_port = map(int, sys.argv[1:])

def kib(key):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0

stuck = []
for user in range(1, clients + 1):
    s = socket.socket()
    # A small receive window, and never a read: the relay must queue or drop.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", client_port))
    s.sendall(f"{user}\n".encode())
    stuck.append(s)
time.sleep(0.5)
source = socket.create_connection(("127.0.0.1", event_port))
chunk = 10_000
started = time.monotonic()
for first in range(1, events + 1, chunk):
    last = min(first + chunk, events + 1)
    source.sendall("".join(f"{seq}|B\n" for seq in range(first, last)).encode())
source.close()
time.sleep(2)
print(f"flood of {events} broadcasts to {clients} stuck clients sent in "
      f"{time.monotonic() - started:.1f} s")
print(f"relay peak RSS (VmHWM): {kib('VmHWM') // 1024} MiB; RSS after the flood: {kib('VmRSS') // 1024} MiB")
for s in stuck:
    s.close()
# Allocators give memory back on their own schedules (jemalloc decays dirty pages over ~10 s).
for idle in (3, 15):
    time.sleep(idle - (3 if idle > 3 else 0))
    print(f"relay RSS {idle} s after the clients are gone (idle): {kib('VmRSS') // 1024} MiB")
with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as metrics:
    for line in metrics.read().decode().splitlines():
        if line.startswith(("weir_relay_clients_dropped", "weir_relay_queued_bytes")):
            print(line)
PY

kill -INT "$server" 2>/dev/null || true
wait "$server" 2>/dev/null || true
trap - EXIT
echo "server log: $log"
