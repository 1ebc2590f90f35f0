#!/usr/bin/env bash
# The PyTorch Inductor backend on the GPU machine (issue 7): its tests on CUDA and benchmarks/gpu.py.
#
# Run from the repository root on the GPU machine; results land in $OUT (default /tmp/gpu_torch_out):
#   scripts/gpu_torch_backend.sh a   env + API probe, tests on CUDA, MobileNetV2-like fp16 at batch 1 and 128
#                                    (mode reduce-overhead: CUDA graphs, no autotuning), AOTInductor probe
#   scripts/gpu_torch_backend.sh b   tests on CUDA, ResNet-50-like fp16 batch 1, max-autotune (cold build, then warm
#                                    load + bench); an AOTInductor MobileNetV2-like engine if time is left
#   scripts/gpu_torch_backend.sh c   ResNet-50-like fp16 batch 128, max-autotune (likewise); AOTInductor if time is left
# Each part fits one 10-minute device call (a max-autotune ResNet-50 compile takes minutes per batch size).
# Then, on any machine: python benchmarks/gpu.py merge <part outputs>/*.json --out benchmarks/results/gpu_torch.json
#
# Needs: python3 with torch (CUDA), onnx, onnxruntime, numpy, pytest; onnx2torch as a wheel in .whl/ if missing.
set -u
PART=${1:-a}
OUT=${OUT:-/tmp/gpu_torch_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import onnx2torch" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
LOG=$OUT/log_$PART.txt
EXTRA=${GPU_BENCH_ARGS:-}  # e.g. "--image-size 64 --device cpu" for a dry run on a CPU machine
START=$(date +%s)

BUDGET=${PART_BUDGET:-585}  # seconds this part may take in all (a device call allows 600)

# run LIMIT CMD...: full output to the log, the last lines and the exit status to the console.
# A step never runs past the part's budget: its limit shrinks to what is left.
run() {
  local limit=$1; shift
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 20 )); then echo "=== skipped (budget spent): $*" | tee -a "$LOG"; return 125; fi
  (( limit > left )) && limit=$left
  echo "=== +$(( $(date +%s) - START ))s [limit ${limit}s] $*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" >"$OUT/.step" 2>&1
  local rc=$?
  cat "$OUT/.step" >>"$LOG"
  grep -v -E "AUTOTUNE|^  (triton|convolution|mm|addmm|bmm|cutlass|cuda_|extern|_)" "$OUT/.step" | tail -n 8
  rm -f "$OUT/.step"
  echo "=== exit $rc after +$(( $(date +%s) - START ))s" | tee -a "$LOG"
  return $rc
}

build() {  # NAME MODEL LIMIT ARGS...: cold build (fresh cache key), engine in /tmp
  local name=$1 model=$2 limit=$3; shift 3
  run "$limit" python3 benchmarks/gpu.py build --model "$model" --engine "/tmp/$name.engine" --json "$OUT/build_$name.json" "$@" $EXTRA
}

bench() {  # NAME MODEL LIMIT ARGS...: warm load in a fresh process with empty Inductor/Triton caches, then timings
  local name=$1 model=$2 limit=$3; shift 3
  rm -rf "/tmp/cache_$name"
  run "$limit" env TORCHINDUCTOR_CACHE_DIR="/tmp/cache_$name/inductor" TRITON_CACHE_DIR="/tmp/cache_$name/triton" \
    python3 benchmarks/gpu.py bench --model "$model" --engine "/tmp/$name.engine" --json "$OUT/bench_$name.json" "$@" $EXTRA
}

aoti_if_time() {  # AOTInductor engine (CUDA graphs captured around it) when 150 s are left
  if (( BUDGET - ($(date +%s) - START) >= 150 )); then
    build mnv2_fp16_aoti mobilenet_v2_like 110 --precision fp16 --compile aoti --mode reduce-overhead --batches 1 128
    bench mnv2_fp16_aoti mobilenet_v2_like 60 --batches 1 128
  fi
}

tests() {  # the backend's test file on CUDA (cheap compile modes), summary line kept as JSON
  run 150 env ENGINESMITH_TEST_DEVICE=cuda python3 -m pytest tests/test_torch_backend.py -q -p no:cacheprovider
  echo "{\"step\": \"tests\", \"device\": \"cuda\", \"summary\": \"$(grep -E '(passed|failed|error)' "$LOG" | tail -n 1 | tr -d '"=')\"}" \
    >"$OUT/tests_cuda_$PART.json"
}

case "$PART" in
  a)
    run 60 python3 benchmarks/gpu.py env --json "$OUT/env.json"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv >>"$LOG" 2>&1
    tests
    build mnv2_fp16 mobilenet_v2_like 150 --precision fp16 --mode reduce-overhead --batches 1 128
    bench mnv2_fp16 mobilenet_v2_like 90 --batches 1 128
    run 150 python3 benchmarks/gpu.py aoti --model mobilenet_v2_like --precision fp16 --mode default --batches 1 \
      --engine /tmp/mnv2_aoti.engine --json "$OUT/aoti_mnv2.json" $EXTRA
    echo "aoti exit status: $? (124 = timed out, 139 = segfault)" | tee -a "$LOG"
    ;;
  b)
    tests
    build r50_fp16_b1 resnet50_like 420 --precision fp16 --mode max-autotune --batches 1
    bench r50_fp16_b1 resnet50_like 120 --batches 1
    aoti_if_time
    ;;
  c)
    build r50_fp16_b128 resnet50_like 420 --precision fp16 --mode max-autotune --batches 128
    bench r50_fp16_b128 resnet50_like 120 --batches 128 --runs 120
    # The same warm load without Inductor's pool of compile worker processes (fresh caches again).
    rm -rf /tmp/cache_r50_1t
    run 60 env TORCHINDUCTOR_COMPILE_THREADS=1 TORCHINDUCTOR_CACHE_DIR=/tmp/cache_r50_1t/inductor \
      TRITON_CACHE_DIR=/tmp/cache_r50_1t/triton python3 benchmarks/gpu.py bench --model resnet50_like \
      --engine /tmp/r50_fp16_b128.engine --batches 128 --load-only --json "$OUT/load_r50_fp16_b128_1thread.json" $EXTRA
    aoti_if_time
    ;;
  *)
    echo "unknown part '$PART': use a, b or c" >&2
    exit 2
    ;;
esac
ls "$OUT" >/dev/null
python3 benchmarks/gpu.py merge "$OUT"/*.json --out "$OUT/summary_$PART.json.txt" 2>&1 | tail -n 40
