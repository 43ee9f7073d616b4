#!/usr/bin/env bash
# The GPU measurements issues #17 and #18 ask for, as one prepared run for a lent H100/H200, in parts that each
# fit the device tool's 600 s per call (the budget is 15 minutes per session, start-up included; parts 1 and 2
# come first, part 3 if time is left):
#   1. #18: the full FLUX.1-schnell transformer at random init, 1024², 4 steps: BF16 eager and regionally
#      compiled against W8A8 int8, FP8 and W4A8, with peak memory (benchmarks/flux_full_latency.py);
#   2. #17: a real-width FLUX.1-schnell --init random compile with a reduced recipe (MixDQ on two blocks, the
#      rehearsal recipe's prompt counts), measured stage by stage against `qcompile --plan --plan-measure`
#      (benchmarks/rehearsal.py): time, device and host memory, the text encoders leaving the device;
#   3. #18: torchao's int8/FP8/int4 linears against ours on one FLUX linear (benchmarks/torchao_backends.py).
# The device image lacks diffusers, PuLP, DEAP, HiGHS and torchao and reaches no index: run
# scripts/gpu_wheels.sh here once, and name .whl in each run's carry; they are installed before anything runs.
#   device run:  bash scripts/gpu_checks.sh --part 1     (then --part 2, --part 3; no --part runs all three)
# Results land in $OUT (default bench-out/gpu). Smoke test on the CPU first, at tiny sizes:
#   scripts/gpu_checks.sh --smoke
set -u
MODE=gpu
PARTS="1 2 3"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=--smoke ;;
    --part) PARTS="$2"; shift ;;
    *) echo "gpu_checks.sh: unknown argument $1 (use --smoke and/or --part 1|2|3)" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-bench-out/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the device runs the tree as is: qsched is not installed
install() {  # install() TARGET WHEEL...: wheels scripts/gpu_wheels.sh fetched, into a folder of their own
  local target=$1; shift
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$@" \
      || echo "wheels: install into $target failed" >&2
}
TORCHAO_SITE=""
if [ -d .whl ]; then
  if [ "$MODE" != "--smoke" ]; then  # the CPU venv has the rest
    install /tmp/qsched-site $(ls .whl/*.whl | grep -v torchao) && export PYTHONPATH="$PYTHONPATH:/tmp/qsched-site"
  fi
  # torchao only for part 3: diffusers imports it whenever it is importable, so parts 1-2 run without it
  ls .whl/torchao-*.whl >/dev/null 2>&1 && install /tmp/torchao-site .whl/torchao-*.whl && TORCHAO_SITE=/tmp/torchao-site
fi
TWO_BLOCKS='quantization.layers=["transformer_blocks.0.*", "single_transformer_blocks.37.*"]'

if [ "$MODE" = "--smoke" ]; then
  DEVICE=cpu
  LATENCY=(--device cpu --double-blocks 1 --single-blocks 1 --height 64 --width 64 --text-tokens 16
           --steps 1 --repeat 1 --warmup 0)
  REHEARSAL=(--device cpu --plan-device cpu --dtype float32 --widths 0.0417 --threads 1)  # 2 threads crawl beside another job
  LIMITS=(900 1200 600)
  TORCHAO=(--device cpu --tokens 32 --repeats 1 --warmup 0)
else
  DEVICE=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  LATENCY=(--device cuda --repeat 3 --warmup 1)
  REHEARSAL=(--device cuda --plan-device h200 --dtype bfloat16 --widths 1)
  LIMITS=(330 420 150)
  TORCHAO=(--device cuda --tokens 4096 --repeats 20 --warmup 3)
fi

part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if part 1; then
  echo "== 1/3 latency ($DEVICE) $(date -u +%T)"
  timeout "${LIMITS[0]}" "$PY" benchmarks/flux_full_latency.py "${LATENCY[@]}" --variants bf16 w8a8 fp8 w4a8 \
      --compile off regional --out "$OUT/flux-full-latency.json"
  echo "latency rc=$?"
fi

if part 2; then
  echo "== 2/3 rehearsal against the plan ($DEVICE) $(date -u +%T)"
  timeout "${LIMITS[1]}" "$PY" benchmarks/rehearsal.py "${REHEARSAL[@]}" --measure --override "$TWO_BLOCKS" \
      --work "$OUT/rehearsal" --json "$OUT/rehearsal.json"
  echo "rehearsal rc=$?"
  rm -rf "$OUT/rehearsal"  # the artifact itself (6 GB at real width) is not a result
fi

if part 3; then
  echo "== 3/3 torchao against our layers ($DEVICE) $(date -u +%T)"
  PYTHONPATH="$PYTHONPATH${TORCHAO_SITE:+:$TORCHAO_SITE}" timeout "${LIMITS[2]}" "$PY" benchmarks/torchao_backends.py \
      "${TORCHAO[@]}" --out "$OUT/torchao-backends.json"
  echo "torchao rc=$?"
fi
echo "== done $(date -u +%T)"
