#!/usr/bin/env bash
# The kv wire contract from a client that is not ours: the README's pika example, taken
# from README.md (so the two cannot drift), run against `weir kv serve` on a queue of its
# own, its replies checked: add, get found, getall in insertion order, malformed -> ok:false.
#
#   WEIR_BIN=target/release/weir AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f scripts/kv-pika.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${WEIR_BIN:-target/release/weir}
[ -x "$bin" ] || { echo "no weir executable at $bin (set WEIR_BIN or build --release)" >&2; exit 1; }
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
python3 -c 'import pika' 2>/dev/null || python3 -m pip install --quiet pika
export QUEUE_NAME="weir.kv.pika.$$.$(date +%s%N)"
work=$(mktemp -d -t weir-kv-pika.XXXXXX)

sed -n '/^<!-- kv-pika-example/,/^<!-- \/kv-pika-example -->/p' README.md \
  | sed '1,2d;$d' | sed '$d' >"$work/example.py"
grep -q 'basic_publish' "$work/example.py" || { echo "README.md has no pika example block" >&2; exit 1; }

"$bin" kv serve --amqp-url "$AMQP_URL" --queue "$QUEUE_NAME" --durability none \
  >"$work/server.out" 2>"$work/server.log" &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  python3 - <<'PY' || true
import os, pika
conn = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
ch = conn.channel()
for name in (os.environ["QUEUE_NAME"], os.environ["QUEUE_NAME"] + ".dead"):
    ch.queue_delete(name)
conn.close()
PY
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  grep -q '^kv: consuming' "$work/server.out" && break
  kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done

timeout 60 python3 "$work/example.py" >"$work/replies.jsonl"
python3 - "$work/replies.jsonl" <<'PY'
import json, sys
replies = [json.loads(line) for line in open(sys.argv[1])]
expected = [
    {"ok": True, "replaced": False},
    {"ok": True, "replaced": False},
    {"ok": True, "found": True, "key": "A", "value": "a"},
    {"ok": True, "items": [{"key": "A", "value": "a"}, {"key": "B", "value": "b"}], "next": None},
]
assert len(replies) == 5, f"expected 5 replies, got {replies}"
for got, want in zip(replies, expected):
    assert got == want, f"got {got}, want {want}"
bad = replies[4]
assert bad.get("ok") is False and bad.get("error"), f"malformed request answered {bad}"
print("kv pika contract: add, get, getall in order, malformed -> ok:false: all as documented")
PY
