#!/usr/bin/env bash
# Create .venv and install qsched into it. torch==2.13.0 goes first so that nothing pulls the multi-GB CUDA
# build on a CPU machine (on a GPU machine, install your CUDA torch first; the pin is then already met).
# Usage: bash scripts/setup.sh [extras]     e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
extras=${1:-}
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
