#!/usr/bin/env bash
# The GPU measurements issues #17 and #18 ask for, as one prepared run for a lent H100/H200 (the device budget
# is 15 minutes per session, start-up included, so each part has its own time limit):
#   1. #18: the full FLUX.1-schnell transformer at random init, 1024², 4 steps: BF16 eager and regionally
#      compiled against W8A8 int8, FP8 and W4A8, with peak memory (benchmarks/flux_full_latency.py);
#   2. #17: a real-width FLUX.1-schnell --init random compile with a reduced recipe (MixDQ on two blocks, the
#      rehearsal recipe's prompt counts), measured stage by stage against `qcompile --plan --plan-measure`
#      (benchmarks/rehearsal.py): time, device and host memory, the text encoders leaving the device.
# Results land in $OUT (default bench-out/gpu). Smoke test on the CPU first, at tiny sizes:
#   scripts/gpu_checks.sh --smoke
set -u
MODE=${1:-gpu}
OUT=${OUT:-bench-out/gpu}
PY=${PY:-python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
TWO_BLOCKS='quantization.layers=["transformer_blocks.0.*", "single_transformer_blocks.37.*"]'

if [ "$MODE" = "--smoke" ]; then
  DEVICE=cpu
  LATENCY=(--device cpu --double-blocks 1 --single-blocks 1 --height 64 --width 64 --text-tokens 16
           --steps 1 --repeat 1 --warmup 0)
  REHEARSAL=(--device cpu --plan-device cpu --dtype float32 --widths 0.0417 --threads 2)
  LIMITS=(900 1200)
else
  DEVICE=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  LATENCY=(--device cuda --repeat 3 --warmup 1)
  REHEARSAL=(--device cuda --plan-device h200 --dtype bfloat16 --widths 1)
  LIMITS=(330 420)
fi

echo "== 1/2 latency ($DEVICE) $(date -u +%T)"
timeout "${LIMITS[0]}" "$PY" benchmarks/flux_full_latency.py "${LATENCY[@]}" --variants bf16 w8a8 fp8 w4a8 \
    --compile off regional --out "$OUT/flux-full-latency.json"
echo "latency rc=$?"

echo "== 2/2 rehearsal against the plan ($DEVICE) $(date -u +%T)"
timeout "${LIMITS[1]}" "$PY" benchmarks/rehearsal.py "${REHEARSAL[@]}" --measure --override "$TWO_BLOCKS" \
    --work "$OUT/rehearsal" --json "$OUT/rehearsal.json"
echo "rehearsal rc=$?"
rm -rf "$OUT/rehearsal"  # the artifact itself (6 GB at real width) is not a result
echo "== done $(date -u +%T)"
