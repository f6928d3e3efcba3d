#!/usr/bin/env bash
# Prints every metric `weir up` exposes at start-up as a Markdown table (name, type, help),
# read from its own /metrics page, then the metrics a distinct worker adds on its own page
# (its API port; `weir up` runs four, on 5001 to 5004): the README's metric reference is this
# output.
# Usage: scripts/metrics-reference.sh [path/to/weir]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/weir}")
addr=127.0.0.1:${METRICS_PORT:-19281}
worker=127.0.0.1:5001
workdir=$(mktemp -d -t weir-metrics.XXXXXX)
(cd "$workdir" && exec "$bin" --metrics-addr "$addr" up) >"$workdir/out" 2>"$workdir/log" &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$workdir"' EXIT
for _ in $(seq 1 100); do
  grep -q "weir is up" "$workdir/out" 2>/dev/null && break
  sleep 0.1
done
curl -fsS "http://$addr/metrics" >"$workdir/up.metrics"
curl -fsS "http://$worker/metrics" >"$workdir/worker.metrics"
python3 - "$workdir/up.metrics" "$workdir/worker.metrics" <<'PY'
import sys

def families(path):
    help, kind = {}, {}
    for line in open(path):
        if line.startswith("# HELP "):
            name, _, text = line[7:].rstrip("\n").partition(" ")
            help[name] = text
        elif line.startswith("# TYPE "):
            name, _, text = line[7:].strip().partition(" ")
            kind[name] = text
    return {name: (kind[name], help.get(name, "-")) for name in kind}

def table(rows):
    print("| metric | type | meaning |")
    print("|---|---|---|")
    for name in sorted(rows):
        kind, text = rows[name]
        print(f"| `{name}` | {kind} | {text.replace('|', '/')} |")

up = families(sys.argv[1])
table(up)
worker = {name: row for name, row in families(sys.argv[2]).items() if name not in up}
print()
print("A distinct worker's own page adds (beside the `weir_http_*` metrics above):")
print()
table(worker)
PY
