#!/usr/bin/env bash
# Prints every metric `weir up` exposes at start-up as a Markdown table (name, type, help),
# read from its own /metrics page: the README's metric reference is this output.
# Usage: scripts/metrics-reference.sh [path/to/weir]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/weir}")
addr=127.0.0.1:${METRICS_PORT:-19281}
workdir=$(mktemp -d -t weir-metrics.XXXXXX)
(cd "$workdir" && exec "$bin" --metrics-addr "$addr" up) >"$workdir/out" 2>"$workdir/log" &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$workdir"' EXIT
for _ in $(seq 1 100); do
  grep -q "weir is up" "$workdir/out" 2>/dev/null && break
  sleep 0.1
done
curl -fsS "http://$addr/metrics" | python3 -c '
import sys
help, kind = {}, {}
for line in sys.stdin:
    if line.startswith("# HELP "):
        name, _, text = line[7:].rstrip("\n").partition(" ")
        help[name] = text
    elif line.startswith("# TYPE "):
        name, _, text = line[7:].strip().partition(" ")
        kind[name] = text
print("| metric | type | meaning |")
print("|---|---|---|")
for name in sorted(kind):
    text = help.get(name, "-").replace("|", "/")
    print(f"| `{name}` | {kind[name]} | {text} |")
'
