#!/usr/bin/env bash
# Installs the external tools the tests and checks call, when missing: promtool (Debian's
# prometheus package), which tests run on the services' /metrics pages.
set -euo pipefail
if ! command -v promtool >/dev/null; then
  apt-get install -y prometheus >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y prometheus >/dev/null; }
fi
