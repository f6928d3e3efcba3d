#!/usr/bin/env bash
# Checks that the increments API and the OpenAPI document it publishes agree, with
# schemathesis (every check) against a live `weir increments serve` on a free port.
#
# Env: WEIR_BIN (a built weir binary; default: build the debug one), SCHEMATHESIS_VENV
# (where schemathesis is installed if missing; default ~/.cache/weir/schemathesis),
# SCHEMATHESIS_MAX_EXAMPLES (per operation; default 500), SCHEMATHESIS_SEED.
# Exits non-zero on any failure, and always stops the server it started.
set -euo pipefail

SCHEMATHESIS_VERSION="4.32.5"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SCHEMATHESIS_VENV:-${HOME}/.cache/weir/schemathesis-${SCHEMATHESIS_VERSION}}"
max_examples="${SCHEMATHESIS_MAX_EXAMPLES:-500}"
seed="${SCHEMATHESIS_SEED:-$RANDOM}"

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

schemathesis="$venv/bin/schemathesis"
if ! "$schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    echo "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
        "schemathesis==$SCHEMATHESIS_VERSION"
fi

weir="${WEIR_BIN:-}"
if [[ -z "$weir" ]]; then
    (cd "$root" && cargo build --quiet -p weir)
    weir="${CARGO_TARGET_DIR:-$root/target}/debug/weir"
fi

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"
# The rate limit and auth stay off: schemathesis must see every rule the document states,
# not a 429 or 401 in front of them.
env -u REDIS_URL -u DATABASE_URL -u WEIR_INCREMENTS_API_KEYS \
    "$weir" increments serve --bind-address 127.0.0.1 --port "$port" \
    --data-dir "$work/data" >"$work/server.log" 2>&1 &
server_pid=$!

for _ in $(seq 100); do
    if curl --silent --fail --max-time 1 "$base/healthz" >/dev/null; then
        break
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "the server exited before answering:" >&2
        cat "$work/server.log" >&2
        exit 1
    fi
    sleep 0.1
done
curl --silent --fail --max-time 1 "$base/healthz" >/dev/null

echo "schemathesis against $base (seed $seed, $max_examples examples per operation)"
status=0
# --max-time would keep fuzzing until it is spent; the example count bounds the run, and
# timeout guards CI against a hang.
# From the temporary directory: schemathesis keeps its crash files under the current one.
cd "$work"
timeout 150 "$schemathesis" --config-file "$root/scripts/schemathesis.toml" \
    run "$base/openapi.json" \
    --checks all \
    --max-examples "$max_examples" \
    --seed "$seed" \
    --workers 2 \
    --request-timeout 5 \
    --generation-database none \
    --output-sanitize false \
    --no-color || status=$?

if [[ $status -ne 0 ]]; then
    echo "schemathesis failed (status $status); server log:" >&2
    tail -n 50 "$work/server.log" >&2
fi
exit "$status"
