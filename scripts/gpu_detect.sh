#!/usr/bin/env bash
# Issue 16 on the GPU machine: live detection at 640x480 with pre- and post-processing on the GPU
# (benchmarks/detect.py --device cuda): the detector built with --backend torch --precision fp16, p50 ms per
# frame end to end at batch 1 (target <= 3 ms), and 4 sources batched vs one (target >= 3x).
#
# Here first (this machine has the registry; the GPU machine has no network, no TensorFlow, maybe no OpenCV,
# and the device code path needs none of it):
#   scripts/gpu_detect.sh prepare [MODEL ...]   fills .gpu_detect/ (gitignored): the nudenet YOLOv8n (from the
#                                               cache, fetched once), each MODEL as ONNX (a frozen graph .pb or
#                                               SavedModel is converted here; .onnx and .engine are copied), and
#                                               the onnx2torch wheel the torch backend converts ONNX with
# Then on the GPU machine, carrying .gpu_detect (carry [".gpu_detect"]):
#   scripts/gpu_detect.sh dry      the same plan on the CPU, small (seconds: a check before device time)
#   scripts/gpu_detect.sh tests    tests/test_vision_device.py on CUDA (torchvision's batched_nms)
#   scripts/gpu_detect.sh run [MODEL ...]   the benchmark on the MODELs given (an .engine, or an ONNX built here
#                                  with --backend torch --precision fp16), else every model in .gpu_detect/models,
#                                  else the colour detector at 640 and nudenet; 200 frames each -> $OUT/detect_cuda.json
#   scripts/gpu_detect.sh all      tests, then run
#   scripts/gpu_detect.sh probe [ARGS]   scripts/gpu_detect_probe.py: where the time of 4 batched sources goes
# Output: $OUT/detect_cuda.json (copy to benchmarks/results/), $OUT/log.txt, $OUT/tests_cuda.txt.
# Extra flags for benchmarks/detect.py in DETECT_ARGS (e.g. "--frames 400 --sources 8").
set -u
WHAT=${1:-all}
shift || true
OUT=${OUT:-/tmp/gpu_detect/out}
REPO=$(pwd)
PREP=$REPO/.gpu_detect
export PYTHONUNBUFFERED=1 PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
# The nudenet model travels in the fixture cache layout tests/vision_models.py reads.
export ENGINESMITH_VISION_CACHE=$PREP/cache
PY=${PYTHON:-python3}

site() {  # carried wheels the machine lacks, into a private folder on the path
  if ! $PY -c "import onnx2torch" 2>/dev/null && ls "$PREP"/whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_detect/site \
      "$PREP"/whl/*.whl
  fi
  [ -d /tmp/gpu_detect/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/gpu_detect/site
  return 0
}

models() {  # --model flags for every model named on the command line, else every prepared one
  local m
  if [ $# -gt 0 ]; then
    for m in "$@"; do printf -- '--model %s ' "$m"; done
    return
  fi
  for m in "$PREP"/models/*; do
    [ -e "$m" ] && printf -- '--model %s ' "$m"
  done
}

mkdir -p "$OUT"
case "$WHAT" in
  prepare)
    mkdir -p "$PREP/cache" "$PREP/models" "$PREP/whl"
    env -u ENGINESMITH_VISION_CACHE $PY - "$PREP" "$@" <<'PY'
import shutil, sys
from pathlib import Path
sys.path.insert(0, "tests")
import enginesmith as es
from vision_models import fetch_real_detector
prep = Path(sys.argv[1])
nudenet, kept = fetch_real_detector("nudenet_yolov8n_320"), prep / "cache" / "nudenet_yolov8n_320.onnx"
if Path(nudenet).resolve() != kept.resolve():  # a second prepare finds it in the cache already
    shutil.copy(nudenet, kept)
for given in map(Path, sys.argv[2:]):
    if given.suffix in (".onnx", ".engine"):
        shutil.copy(given, prep / "models" / given.name)
        continue
    # A frozen graph or SavedModel: the GPU machine has no TensorFlow, so it goes as the ONNX enginesmith imports.
    import onnx
    from enginesmith.importers import import_model
    onnx.save(import_model(given).model, prep / "models" / f"{given.stem or given.name}.onnx")
print("prepared:", *sorted(p.relative_to(prep).as_posix() for p in prep.rglob("*") if p.is_file()))
PY
    $PY -m pip download --no-deps -q -d "$PREP/whl" 'onnx2torch==1.5.15' || echo "no onnx2torch wheel: the GPU machine must have it"
    du -sh "$PREP"
    ;;
  dry)
    site
    $PY benchmarks/detect.py --dry-run --frames 20 $(models "$@") ${DETECT_ARGS:-} --json "$OUT/detect_dry_run.json" 2>&1 \
      | grep -v -e '^W[0-9]' -e 'Warning' | tee -a "$OUT/log.txt"
    ;;
  probe)
    site
    timeout -k 10 ${PROBE_TIMEOUT:-300} $PY scripts/gpu_detect_probe.py --json "$OUT/detect_probe.json" "$@" 2>&1 \
      | grep -v -e '^W[0-9]' -e 'Warning' | tee -a "$OUT/log.txt"
    ;;
  tests|run|all)
    site
    $PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')
try:
    import torchvision; print('torchvision', torchvision.__version__)
except ImportError: print('torchvision missing: NMS runs on the torch fallback')
try:
    import cv2; print('opencv', cv2.__version__)
except ImportError: print('no OpenCV: fine for the device path (synthetic frames, GPU preprocessing)')" | tee -a "$OUT/log.txt"
    if [ "$WHAT" != run ]; then
      timeout -k 10 240 env ENGINESMITH_TEST_DEVICE=cuda $PY -m pytest tests/test_vision_device.py -q -p no:cacheprovider \
        --tb=short -rfEs > "$OUT/tests_cuda.txt" 2>&1
      tail -n 15 "$OUT/tests_cuda.txt"
    fi
    if [ "$WHAT" != tests ]; then
      timeout -k 10 ${DETECT_TIMEOUT:-480} $PY benchmarks/detect.py --device cuda $(models "$@") ${DETECT_ARGS:-} \
        --json "$OUT/detect_cuda.json" 2>&1 | grep -v -e '^W[0-9]' -e 'Warning' | tee -a "$OUT/log.txt"
    fi
    ;;
  *) echo "usage: $0 prepare [MODEL...] | dry | tests | run | all | probe" >&2; exit 2 ;;
esac
