#!/usr/bin/env bash
# Set up, then compile the embedded flux-tiny model at w4a8 into out/flux-tiny-w4a8 (the main job).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec .venv/bin/qcompile --model flux-tiny --bits w4a8 --out "${1:-out/flux-tiny-w4a8}" --overwrite
