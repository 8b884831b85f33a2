#!/usr/bin/env bash
# System tools the MPI tests need besides what pip installs (MPI itself comes from PyPI): iproute2
# and util-linux for the simulated hosts of the cross-host test (network namespaces; root only).
set -euo pipefail
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v unshare >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
