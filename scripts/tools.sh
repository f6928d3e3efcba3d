#!/usr/bin/env bash
# Installs the external tools the tests, checks and load scripts call, when missing: promtool
# (Debian's package prometheus; the default) and wrk from Debian's packages, cargo-machete from
# crates.io (pinned by its own lock file).
#   scripts/tools.sh [promtool|wrk|cargo-machete]...
set -euo pipefail
[ $# -gt 0 ] || set -- promtool
for tool in "$@"; do
  command -v "$tool" >/dev/null && continue
  case $tool in
    cargo-*)
      cargo install --locked --quiet "$tool"
      continue
      ;;
    promtool) package=prometheus ;;
    *) package=$tool ;;
  esac
  apt-get install -y "$package" >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y "$package" >/dev/null; }
done
