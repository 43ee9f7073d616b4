#!/usr/bin/env bash
# Fetch, on this machine, the wheels a lent GPU machine lacks, so scripts/gpu_checks.sh runs there. The device
# image has Python 3.12 with torch, transformers, accelerate, safetensors, onnx and onnxruntime, but not
# diffusers, PuLP, DEAP, HiGHS or torchao, and it cannot reach a package index. The wheels land in .whl/
# (gitignored, about 30 MB); name .whl in the device run's `carry` and gpu_checks.sh installs them first.
# The versions are the ones the CPU test suite runs with (torchao: the one benchmarks/torchao_backends.py was
# written against).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl \
    diffusers==0.42.1 PuLP==3.3.2 deap==1.4.4 highspy==1.16.0 torchao==0.18.0
ls -l .whl
