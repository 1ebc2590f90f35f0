#!/usr/bin/env bash
# Issue 15 on the GPU machine: real architectures through the PyTorch backend (benchmarks/gpu_zoo.py) and the
# backend's direct-torch / ONNX-converter tests on CUDA. Results (JSON per model, table.txt, logs) go to $OUT.
#
#   scripts/gpu_zoo.sh all     every model, one process per model per GPU (on nvidia-h200-x4: two waves, ~8 min)
#   scripts/gpu_zoo.sh cnn     resnet50, mobilenet_v3_large, efficientnet_b0      (one GPU: ~8 min)
#   scripts/gpu_zoo.sh rest    convnext_tiny, vit_b_16, yolov8s_like              (one GPU: ~8 min)
#   scripts/gpu_zoo.sh text    bert_base, minilm, then the CUDA tests             (one GPU: ~8 min)
#   scripts/gpu_zoo.sh tests   tests/test_torch_direct.py, test_torch_onnx_ops.py, test_torch_nms.py with ENGINESMITH_TEST_DEVICE=cuda
#   scripts/gpu_zoo.sh dry     the CPU dry run (toy YOLO and BERT), for a machine without a GPU
#
# Every model runs in its own process with the deadline ZOO_DEADLINE seconds (default 480) from the start: a
# model that would start later is recorded as skipped, so a 10-minute device call always comes back with
# results. Extra flags for gpu_zoo.py in ZOO_ARGS (e.g. "--quick", "--mode max-autotune --models resnet50").
# Needs: python3 with torch (CUDA), torchvision, transformers, onnx, onnxruntime; onnx2torch and onnxscript (the
# dynamo ONNX exporter) as wheels in .whl/ when missing, made here with
#   pip download --no-deps -d .whl 'onnx2torch==1.5.15' 'onnxscript==0.7.2' 'onnx-ir==1.1.0'
# and carried (carry [".whl"]).
set -u
WHAT=${1:-all}
OUT=${OUT:-/tmp/gpu_zoo/out}
REPO=$(pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import onnx2torch, onnxscript" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
mkdir -p "$OUT"
DEADLINE=${ZOO_DEADLINE:-480}
ARGS=${ZOO_ARGS:-}

zoo() {  # zoo MODELS [DEADLINE]
  python3 benchmarks/gpu_zoo.py run --out "$OUT/zoo" --models "$1" --deadline-s "${2:-$DEADLINE}" \
    --workdir /tmp/gpu_zoo/work $ARGS 2>&1 | tee -a "$OUT/zoo.log"
}

cuda_tests() {  # the whole report in tests_cuda.txt (tracebacks, no captured DEBUG logs); its end on the console
  timeout -k 10 "${1:-240}" env ENGINESMITH_TEST_DEVICE=cuda python3 -m pytest tests/test_torch_direct.py \
    tests/test_torch_onnx_ops.py tests/test_torch_nms.py -q -p no:cacheprovider -p no:logging --tb=short -rfE > "$OUT/tests_cuda.txt" 2>&1
  tail -n 40 "$OUT/tests_cuda.txt"
}

case "$WHAT" in
  all) zoo resnet50,mobilenet_v3_large,efficientnet_b0,convnext_tiny,vit_b_16,yolov8s_like,bert_base,minilm ;;
  cnn) zoo resnet50,mobilenet_v3_large,efficientnet_b0 ;;
  rest) zoo convnext_tiny,vit_b_16,yolov8s_like ;;
  text) zoo bert_base,minilm 330; cuda_tests 200 ;;
  tests) cuda_tests 540 ;;
  dry) python3 benchmarks/gpu_zoo.py run --out "$OUT/zoo" --models yolo_tiny,bert_tiny --device cpu --quick --runs 5 ;;
  *) echo "usage: $0 all|cnn|rest|text|tests|dry" >&2; exit 2 ;;
esac
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
records = [json.loads(p.read_text()) for p in sorted((out / "zoo").glob("*.json"))]
(out / "gpu_zoo.json").write_text(json.dumps(records, indent=1) + "\n")  # one file with every model so far
PY
