#!/usr/bin/env bash
# Installs kvrelay (and the demo model), then runs the shared-prefix demo on a local cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
kvrelay demo "$@"
