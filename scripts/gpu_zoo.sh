#!/usr/bin/env bash
# Issue 15 on the GPU machine: real architectures through the PyTorch backend (benchmarks/gpu_zoo.py) and the
# backend's direct-torch / ONNX-converter tests on CUDA. Results (JSON per model, table.txt, logs) go to $OUT.
#
#   scripts/gpu_zoo.sh all     every model, one process per model per GPU (on nvidia-h200-x4: two waves, ~8 min)
#   scripts/gpu_zoo.sh cnn     resnet50, mobilenet_v3_large, efficientnet_b0      (one GPU: ~8 min)
#   scripts/gpu_zoo.sh rest    convnext_tiny, vit_b_16, yolov8s_like              (one GPU: ~8 min)
#   scripts/gpu_zoo.sh text    bert_base, minilm, then the CUDA tests             (one GPU: ~8 min)
#   scripts/gpu_zoo.sh tests   tests/test_torch_direct.py, test_torch_onnx_ops.py, test_torch_nms.py, test_torch_attention_fusion.py, test_torch_gelu_fusion.py,
#                              test_torch_onnx_rnn.py, test_torch_linear_fusion.py, test_torch_mha.py with ENGINESMITH_TEST_DEVICE=cuda
#   scripts/gpu_zoo.sh dry     the CPU dry run (toy YOLO and BERT), for a machine without a GPU
#   scripts/gpu_zoo.sh bg MODELS   start MODELS (comma list), then the CUDA tests, in a detached process session that
#                                  outlives this call (one device call is 10 minutes; a warm machine keeps running it)
#                                  ZOO_THEN_MODELS, ZOO_THEN_ARGS, ZOO_THEN_DEADLINE: a second plan run after the first
#                                  (its records in zoo_then/, table_then.txt; e.g. the same model with --skip-engine)
#                                  ZOO_TESTS_FIRST=1: the CUDA tests before the models (short, so sure to finish)
#                                  ZOO_TESTS_SELECT: pytest arguments instead of the eight test files (8 xdist workers; e.g. "-k clip FILE")
#                                  ZOO_TESTS_S: the tests' time limit in seconds (default 200; 0: no tests)
#   scripts/gpu_zoo.sh wait SECS   wait up to SECS for the detached run, then copy what it has so far to $OUT
#                                  (zoo.tgz with every JSON and log, gpu_zoo.json, table.txt, tests_cuda.txt)
#
# Every model runs in its own process with the deadline ZOO_DEADLINE seconds (default 480) from the start: a
# model that would start later is recorded as skipped and one still running then is stopped, so a 10-minute
# device call always comes back with results. Give a model its whole time: MiniLM with a max-autotune baseline
# and a max-autotune engine needs about 400 s, a convolutional model's max-autotune baseline 550–1,100 s.
# Extra flags for gpu_zoo.py in ZOO_ARGS (e.g. "--quick", "--mode max-autotune --models resnet50",
# "--train-steps 300": vision models trained briefly on a synthetic task first, for accuracy figures of
# trained-like weights; "--baseline-mode max-autotune --skip-onnx --skip-warm-load": what a user would compile,
# about 15 minutes per convolutional model on one H200).
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
# On the GPU machine a fresh process compiled the sources of ~1,500 modules again (5.6 s of a warm load, in a
# cProfile on the H200): their .pyc files were not there to read. An installed package has them, so the
# warm loads here read theirs from a bytecode cache the build process fills.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/gpu_zoo/pycache}
mkdir -p "$OUT"
DEADLINE=${ZOO_DEADLINE:-480}
ARGS=${ZOO_ARGS:-}

zoo() {  # zoo MODELS [DEADLINE [FOLDER]]: records in $OUT/FOLDER (default zoo)
  python3 benchmarks/gpu_zoo.py run --out "$OUT/${3:-zoo}" --models "$1" --deadline-s "${2:-$DEADLINE}" \
    --workdir /tmp/gpu_zoo/work $ARGS 2>&1 | tee -a "$OUT/zoo.log"
}

cuda_tests() {  # the whole report in tests_cuda.txt (tracebacks, no captured DEBUG logs); its end on the console
  [ "${1:-240}" = 0 ] && return 0  # ZOO_TESTS_S=0: no tests (a session whose device time is all for the models)
  # Newest tests first: a short time limit cuts the end of the list.
  # The trained SSD's tests read its frozen graph through TensorFlow, absent there: use its conversion when
  # `scripts/gpu_detect.sh prepare benchmarks/detection/models/ssd_mobilenet_v2_synth.pb` made one here.
  local ssd=.gpu_detect/models/ssd_mobilenet_v2_synth.onnx
  [ -f "$ssd" ] && export ENGINESMITH_SSD_ONNX=$REPO/$ssd
  # SIGINT first: pytest then still prints its failure summary when the time limit cuts the run.
  local select=${ZOO_TESTS_SELECT:--n 8 tests/test_torch_gelu_fusion.py tests/test_torch_mha.py tests/test_torch_linear_fusion.py tests/test_torch_attention_fusion.py tests/test_torch_onnx_rnn.py tests/test_torch_nms.py tests/test_torch_direct.py tests/test_torch_onnx_ops.py}
  # shellcheck disable=SC2086  # ZOO_TESTS_SELECT is a list of pytest arguments
  timeout -s INT -k 15 "${1:-240}" env ENGINESMITH_TEST_DEVICE=cuda python3 -m pytest $select \
    -q -p no:cacheprovider -p no:logging --tb=short -rfE > "$OUT/tests_cuda.txt" 2>&1
  tail -n 40 "$OUT/tests_cuda.txt"
}

BG=/tmp/gpu_zoo/bg
case "$WHAT" in
  bg)
    mkdir -p "$BG"; rm -f "$BG/done"
    # setsid: the device tool ends a call's processes when it returns, except those in a new process session.
    OUT="$BG/out" setsid nohup bash "$0" _bgjob "${2:?models}" > "$BG/log" 2>&1 < /dev/null &
    echo "started the detached zoo run (pid $!); follow it with: $0 wait SECONDS"; exit 0 ;;
  _bgjob)
    [ "${ZOO_TESTS_FIRST:-0}" = 1 ] && cuda_tests "${ZOO_TESTS_S:-200}"
    zoo "$2"
    # A second plan with its own flags and deadline (e.g. a max-autotune conv model, then transformers from ONNX).
    # Its records go to a folder of their own: the same model may be in both plans (engines, then the baseline alone).
    [ -n "${ZOO_THEN_MODELS:-}" ] && ARGS=${ZOO_THEN_ARGS:-} zoo "$ZOO_THEN_MODELS" "${ZOO_THEN_DEADLINE:-$DEADLINE}" zoo_then
    [ "${ZOO_TESTS_FIRST:-0}" = 1 ] || cuda_tests "${ZOO_TESTS_S:-200}"
    touch "$BG/done" ;;
  wait)
    # A fresh machine (the warm one was released) has no detached run: say so instead of waiting for nothing.
    [ -e "$BG/log" ] || { echo "no detached run on this machine (it was released and started afresh): start one with $0 bg" >&2; exit 3; }
    for _ in $(seq "${2:-0}"); do [ -e "$BG/done" ] && break; sleep 1; done
    tail -n 15 "$BG/log"
    [ -e "$BG/done" ] && echo "the detached run is done" || echo "the detached run is still going"
    OUT=$OUT BG=$BG python3 - <<'PY'
import json, os, pathlib, shutil, tarfile
out, bg = pathlib.Path(os.environ["OUT"]), pathlib.Path(os.environ["BG"])
records = [json.loads(p.read_text()) for folder in ("zoo", "zoo_then") for p in sorted((bg / "out" / folder).glob("*.json"))]
(out / "gpu_zoo.json").write_text(json.dumps(records, indent=1) + "\n")
for folder, name in (("zoo", "table.txt"), ("zoo_then", "table_then.txt")):
    if (bg / "out" / folder / "table.txt").exists():
        shutil.copy(bg / "out" / folder / "table.txt", out / name)
if (bg / "out" / "tests_cuda.txt").exists():
    shutil.copy(bg / "out" / "tests_cuda.txt", out / "tests_cuda.txt")
with tarfile.open(out / "zoo.tgz", "w:gz") as tar:
    tar.add(bg, arcname="gpu_zoo_bg")
PY
    exit 0 ;;
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
