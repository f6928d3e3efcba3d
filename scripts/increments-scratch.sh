# Sourced by the increments load scripts: the Redis keys and Postgres tables a run makes
# under its prefixes, and a scratch directory, all removed at exit with the run's servers.
# Sets PG, REDIS and DATA; the caller names its prefixes in SCRATCH_PREFIXES.
PG=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
REDIS=${REDIS_URL:-redis://127.0.0.1:6379}
DATA=$(mktemp -d)
SCRATCH_PREFIXES=()
scratch_cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  local s t
  for s in "${SCRATCH_PREFIXES[@]}"; do
    redis-cli -u "$REDIS" --scan --pattern "$s*" 2>/dev/null | xargs -r redis-cli -u "$REDIS" del >/dev/null 2>&1 || true
    for t in counts marks applied dead_letters idempotency_keys flushes applied_batches; do
      psql "$PG" -qc "DROP TABLE IF EXISTS ${s}_$t" >/dev/null 2>&1 || true
    done
  done
  rm -rf "$DATA"
}
trap scratch_cleanup EXIT
export RUST_LOG=warn
unset DATABASE_URL REDIS_URL
