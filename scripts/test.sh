#!/usr/bin/env bash
# Sets up and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
PY=${PYTHON:-python3}
"$PY" -m pytest "$@"
