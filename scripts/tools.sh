#!/usr/bin/env bash
# Installs the external tools the tests and load scripts call, when missing, from Debian's
# packages: promtool (package prometheus; the default), wrk.
#   scripts/tools.sh [promtool|wrk]...
set -euo pipefail
[ $# -gt 0 ] || set -- promtool
for tool in "$@"; do
  command -v "$tool" >/dev/null && continue
  case $tool in
    promtool) package=prometheus ;;
    *) package=$tool ;;
  esac
  apt-get install -y "$package" >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y "$package" >/dev/null; }
done
