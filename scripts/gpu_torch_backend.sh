#!/usr/bin/env bash
# The PyTorch Inductor backend on the GPU machine (issue 7): its tests on CUDA and benchmarks/gpu.py.
#
# A device call lasts at most 10 minutes but a machine stays ours for up to 30 while calls follow each
# other, and max-autotune builds of ResNet-50 take minutes each. So the plan runs in the background
# (its own process session, so it outlives the call that started it) and each call follows it:
#
#   scripts/gpu_torch_backend.sh start [STEPS]   launch the plan (default: all steps, in priority order)
#   scripts/gpu_torch_backend.sh wait SECONDS    follow it until it ends or SECONDS pass; then pack every
#                                                result so far into $OUT/results.tar.gz and print the table
#   scripts/gpu_torch_backend.sh run [STEPS]     the plan in the foreground (a dry run on a CPU machine:
#                                                GPU_BENCH_ARGS="--image-size 32 --device cpu --compile eager")
#
# First call:  scripts/gpu_torch_backend.sh start && scripts/gpu_torch_backend.sh wait 560   (carry .whl)
# Later calls: scripts/gpu_torch_backend.sh wait 580
# Then here:   python benchmarks/gpu.py merge <unpacked results>/*.json --out benchmarks/results/gpu_torch.json
#
# STEPS is a comma list of: env mnv2_ro r50_b1 r50_b128 tests aoti r50_b1_frz r50_b128_frz mnv2_ma
#   r50_b128_tma r50_b1_tma loads (the second round, after the first showed b128 short of its target)
#   mnv2_ma_aten r50_b128_aten (the third: max-autotune with convolutions left to cuDNN) r50_b128_mm r50_b128_cbl
#   r50_fused r50_fused_ma (the fourth: cuDNN-fused convolution epilogues)
# Every step runs in its own process with a time limit; a step that would pass the plan's budget
# (PLAN_BUDGET seconds from the start, default 1500) is skipped. Each build compiles cold (fresh
# Inductor and Triton cache folders); each bench loads the engine in a fresh process with empty cache
# folders, so its load time is the warm load from the compiler cache the engine carries.
#
# Needs: python3 with torch (CUDA), onnx, onnxruntime, numpy, pytest; onnx2torch as a wheel in .whl/ if missing.
set -u
CMD=${1:-run}
STATE=${STATE:-/tmp/gpu_torch}
OUT=${OUT:-$STATE/out}
ALL=env,mnv2_ro,r50_b1,r50_b128,tests,aoti,r50_b128_frz,r50_b1_frz,mnv2_ma
REPO=$(pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import onnx2torch" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
EXTRA=${GPU_BENCH_ARGS:-}
RES=$STATE/res
LOG=$STATE/log.txt
PROGRESS=$STATE/progress.txt

# step NAME LIMIT CMD...: full output to the log, one line per step to the progress file, exit status
# and seconds to $RES/status_NAME.json. A step never runs past the plan's budget.
step() {
  local name=$1 limit=$2; shift 2
  local now left
  now=$(date +%s); left=$(( BUDGET - (now - START) ))
  if (( left < 30 )); then
    echo "+$(( now - START ))s skip $name (budget spent)" | tee -a "$PROGRESS" >>"$LOG"
    echo "{\"step\": \"status\", \"name\": \"$name\", \"rc\": \"skipped\"}" >"$RES/status_$name.json"
    return 125
  fi
  (( limit > left )) && limit=$left
  echo "+$(( now - START ))s start $name [limit ${limit}s]" | tee -a "$PROGRESS" >>"$LOG"
  echo "=== $name: $*" >>"$LOG"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - now ))
  echo "+$(( $(date +%s) - START ))s end $name: exit $rc after ${took}s" | tee -a "$PROGRESS" >>"$LOG"
  echo "{\"step\": \"status\", \"name\": \"$name\", \"rc\": $rc, \"seconds\": $took, \"limit\": $limit}" >"$RES/status_$name.json"
  return $rc
}

gpu() { python3 benchmarks/gpu.py "$@" $EXTRA; }

build() {  # NAME MODEL LIMIT ARGS...: cold build in fresh cache folders
  local name=$1 model=$2 limit=$3; shift 3
  rm -rf "$STATE/cache/build_$name"
  step "build_$name" "$limit" env TORCHINDUCTOR_CACHE_DIR="$STATE/cache/build_$name/inductor" \
    TRITON_CACHE_DIR="$STATE/cache/build_$name/triton" \
    python3 benchmarks/gpu.py build --model "$model" --engine "$STATE/$name.engine" --json "$RES/build_$name.json" \
    --tag "$name" "$@" $EXTRA
}

bench() {  # NAME MODEL LIMIT ARGS...: warm load in a fresh process with empty cache folders, then timings
  local name=$1 model=$2 limit=$3; shift 3
  [ -f "$STATE/$name.engine" ] || { echo "no engine $name: bench skipped" | tee -a "$PROGRESS" >>"$LOG"; return 1; }
  rm -rf "$STATE/cache/bench_$name"
  step "bench_$name" "$limit" env TORCHINDUCTOR_CACHE_DIR="$STATE/cache/bench_$name/inductor" \
    TRITON_CACHE_DIR="$STATE/cache/bench_$name/triton" \
    python3 benchmarks/gpu.py bench --model "$model" --engine "$STATE/$name.engine" --json "$RES/bench_$name.json" \
    --tag "$name" "$@" $EXTRA
}

do_step() {
  case "$1" in
    env)
      step env 90 python3 benchmarks/gpu.py env --json "$RES/env.json"
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu,utilization.gpu \
        --format=csv >>"$LOG" 2>&1
      ;;
    mnv2_ro)  # cheap first: the whole build/load/bench path on CUDA, CUDA graphs without autotuning
      build mnv2_ro mobilenet_v2_like 300 --precision fp16 --mode reduce-overhead --batches 1 128
      bench mnv2_ro mobilenet_v2_like 240 --batches 1 128
      ;;
    mnv2_ma)
      build mnv2_ma mobilenet_v2_like 540 --precision fp16 --mode max-autotune --batches 1 128
      bench mnv2_ma mobilenet_v2_like 240 --batches 1 128
      ;;
    r50_b1)
      build r50_b1 resnet50_like 600 --precision fp16 --mode max-autotune --batches 1
      bench r50_b1 resnet50_like 240 --batches 1 --runs 300
      ;;
    r50_b128)
      build r50_b128 resnet50_like 600 --precision fp16 --mode max-autotune --batches 128
      bench r50_b128 resnet50_like 240 --batches 128 --runs 200
      ;;
    r50_b1_frz)  # Inductor freezing: weights become constants (folded, laid out once) inside the graph
      build r50_b1_frz resnet50_like 600 --precision fp16 --mode max-autotune --batches 1 --inductor freezing=1
      bench r50_b1_frz resnet50_like 240 --batches 1 --runs 300
      ;;
    r50_b128_frz)
      build r50_b128_frz resnet50_like 600 --precision fp16 --mode max-autotune --batches 128 --inductor freezing=1
      bench r50_b128_frz resnet50_like 240 --batches 128 --runs 200
      ;;
    r50_b128_tma)  # Hopper's persistent TMA matmul templates among the autotuning choices (1x1 convs run as mm)
      build r50_b128_tma resnet50_like 600 --precision fp16 --mode max-autotune --batches 128 \
        --inductor triton.enable_persistent_tma_matmul=1
      bench r50_b128_tma resnet50_like 240 --batches 128 --runs 200
      ;;
    r50_b1_tma)
      build r50_b1_tma resnet50_like 600 --precision fp16 --mode max-autotune --batches 1 \
        --inductor triton.enable_persistent_tma_matmul=1
      bench r50_b1_tma resnet50_like 240 --batches 1 --runs 300
      ;;
    mnv2_ma_aten)  # max-autotune with convolutions left to cuDNN (ATen): no Triton templates for grouped convs
      build mnv2_ma_aten mobilenet_v2_like 540 --precision fp16 --mode max-autotune --batches 1 128 \
        --inductor max_autotune_conv_backends=ATEN
      bench mnv2_ma_aten mobilenet_v2_like 240 --batches 1 128
      ;;
    r50_b128_aten)
      build r50_b128_aten resnet50_like 600 --precision fp16 --mode max-autotune --batches 128 \
        --inductor max_autotune_conv_backends=ATEN
      bench r50_b128_aten resnet50_like 240 --batches 128 --runs 200
      ;;
    r50_b128_mm)  # 1x1 convolutions lowered to matmuls, which max-autotune tunes (Triton and cuBLAS) with fused epilogues
      build r50_b128_mm resnet50_like 600 --precision fp16 --mode max-autotune --batches 128 --inductor conv_1x1_as_mm=1
      bench r50_b128_mm resnet50_like 240 --batches 128 --runs 200
      ;;
    r50_b128_cbl)  # cuDNN times every convolution algorithm (benchmark_limit 0) instead of its first 10
      build r50_b128_cbl resnet50_like 600 --precision fp16 --mode max-autotune --batches 128 --cudnn-benchmark-limit 0
      bench r50_b128_cbl resnet50_like 240 --batches 128 --runs 200
      ;;
    r50_fused)  # cuDNN-fused conv epilogues (the backend's default on CUDA since then), CUDA graphs, no autotuning
      build r50_b1_fused resnet50_like 300 --precision fp16 --mode reduce-overhead --batches 1
      bench r50_b1_fused resnet50_like 180 --batches 1 --runs 300
      build r50_b128_fused resnet50_like 300 --precision fp16 --mode reduce-overhead --batches 128
      bench r50_b128_fused resnet50_like 180 --batches 128 --runs 200
      ;;
    r50_fused_ma)  # the same with max-autotune for what is left unfused (4 convolutions, the classifier)
      build r50_b128_fused_ma resnet50_like 600 --precision fp16 --mode max-autotune --batches 128
      bench r50_b128_fused_ma resnet50_like 180 --batches 128 --runs 200
      build r50_b1_fused_ma resnet50_like 600 --precision fp16 --mode max-autotune --batches 1
      bench r50_b1_fused_ma resnet50_like 180 --batches 1 --runs 300
      ;;
    loads)  # warm load alone, fresh caches each time: as built, and without Inductor's compile-worker pool
      local engine
      engine=$(ls -t "$STATE"/r50_b128*.engine 2>/dev/null | head -n 1)
      [ -n "$engine" ] || return 0
      local threads setting
      for threads in default 1; do
        setting=ENGINESMITH_LOAD_VARIANT=default  # a no-op assignment: an empty TORCHINDUCTOR_COMPILE_THREADS breaks torch
        [ "$threads" = 1 ] && setting=TORCHINDUCTOR_COMPILE_THREADS=1
        rm -rf "$STATE/cache/load_$threads"
        step "load_threads_$threads" 120 env TORCHINDUCTOR_CACHE_DIR="$STATE/cache/load_$threads/inductor" \
          TRITON_CACHE_DIR="$STATE/cache/load_$threads/triton" "$setting" \
          python3 benchmarks/gpu.py bench --model resnet50_like --engine "$engine" --batches 128 --load-only \
          --tag "load_threads_$threads" --json "$RES/load_threads_$threads.json" $EXTRA
      done
      ;;
    tests)
      step tests_cuda 420 env ENGINESMITH_TEST_DEVICE=cuda python3 -m pytest tests/test_torch_backend.py \
        tests/test_torch_conv_fusion.py -q \
        -p no:cacheprovider -rA
      local line
      line=$(grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$LOG" | tail -n 1 | tr -d '"=' | sed 's/^ *//;s/ *$//')
      echo "{\"step\": \"tests\", \"device\": \"cuda\", \"summary\": \"$line\"}" >"$RES/tests_cuda.json"
      ;;
    aoti)  # AOTInductor (crashed once on this image): a plain probe first, then an engine with CUDA graphs
      step aoti_probe 300 python3 benchmarks/gpu.py aoti --model mobilenet_v2_like --precision fp16 --mode default \
        --batches 1 --engine "$STATE/aoti_probe.engine" --json "$RES/aoti_probe.json" $EXTRA \
        && { build mnv2_aoti mobilenet_v2_like 300 --precision fp16 --compile aoti --mode reduce-overhead --batches 1 128
             bench mnv2_aoti mobilenet_v2_like 180 --batches 1 128; }
      ;;
    *) echo "unknown step '$1'" | tee -a "$PROGRESS" ;;
  esac
}

plan() {  # the steps in order; a failing step does not stop the plan
  START=$(date +%s)
  BUDGET=${PLAN_BUDGET:-1500}
  mkdir -p "$RES"
  echo "plan ${1:-$ALL} from $(date -u +%FT%TZ), budget ${BUDGET}s, repo $REPO" | tee -a "$PROGRESS" >>"$LOG"
  local s
  for s in ${1//,/ }; do do_step "$s"; done
  echo "+$(( $(date +%s) - START ))s plan done" | tee -a "$PROGRESS" >>"$LOG"
  touch "$STATE/done"
}

pack() {  # every result so far into $OUT (at most 8 files come back from a device call)
  mkdir -p "$OUT"
  cp "$LOG" "$OUT/log.txt" 2>/dev/null
  [ -s "$OUT/log.txt" ] && [ "$(stat -c %s "$OUT/log.txt")" -gt 15000000 ] && tail -c 15000000 "$LOG" >"$OUT/log.txt"
  cp "$PROGRESS" "$OUT/progress.txt" 2>/dev/null
  ls "$RES"/*.json >/dev/null 2>&1 || return 0
  tar -czf "$OUT/results.tar.gz" -C "$RES" .
  python3 benchmarks/gpu.py merge "$RES"/*.json --out "$OUT/gpu_torch.json" >"$OUT/summary.txt" 2>&1
  cat "$OUT/summary.txt"
}

case "$CMD" in
  start)
    rm -rf "$STATE"; mkdir -p "$STATE/res"
    OUT=$STATE/out setsid nohup bash "$0" run "${2:-$ALL}" >"$STATE/plan.out" 2>&1 </dev/null &
    echo "plan started (pid $!), state in $STATE"
    ;;
  run)
    rm -f "$STATE/done"; mkdir -p "$STATE/res"
    plan "${2:-$ALL}"
    pack
    ;;
  wait)
    limit=${2:-560}; t0=$(date +%s); shown=0
    while :; do
      if [ -f "$PROGRESS" ]; then
        total=$(wc -l <"$PROGRESS")
        (( total > shown )) && { sed -n "$((shown + 1)),${total}p" "$PROGRESS"; shown=$total; }
      fi
      [ -f "$STATE/done" ] && break
      (( $(date +%s) - t0 >= limit )) && { echo "(plan still running after ${limit}s of waiting)"; break; }
      sleep 5
    done
    grep -E "Error|error:|Traceback|FAILED|Segmentation|core dumped" "$LOG" 2>/dev/null | grep -v -E "AUTOTUNE|^\s*$" | tail -n 25
    pack
    ;;
  *)
    echo "usage: $0 start [STEPS] | wait SECONDS | run [STEPS]" >&2
    exit 2
    ;;
esac
