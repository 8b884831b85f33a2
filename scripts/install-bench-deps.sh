#!/usr/bin/env bash
# System packages that `make bench-store` compares shoal with: GNU parallel (Debian's package).
set -euo pipefail
if ! command -v parallel >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq parallel >/dev/null
fi
parallel --version | head -1
