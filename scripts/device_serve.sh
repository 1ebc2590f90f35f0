#!/usr/bin/env bash
# Issue 18 on the GPU machine: benchmarks/serve.py (enginesmith serve vs the engine in-process, tritonclient
# clients, 16-client batching, the long run) on its 16 host cores, the MobileNetV2-like engine on the H200.
#
#   scripts/device_serve.sh cuda [ARGS]   the MobileNetV2-like engine: torch backend, fp16, CUDA, batches 1-16
#   scripts/device_serve.sh cpu [ARGS]    the same benchmark with ONNX Runtime on the host's CPU cores
#
# ARGS go to serve.py (e.g. "--requests 20000 --duration 10"). Results: $OUT/serve_<what>.json and the console.
# Needs the serve extra and tritonclient[http]: when they are missing there, they are installed from wheels carried
# in .whl/serve (carry [".whl"]), made here with
#   pip download --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 -d .whl/serve \
#     'aiohttp>=3.9,<4' 'grpcio>=1.81.1,<2' 'protobuf>=6.33.5,<8' 'tritonclient[http]>=2.73,<3' typer rich
# (then the numpy wheel deleted: the machine has numpy, and the carry limit is 64 MiB).
set -u
WHAT=${1:-cuda}
shift || true
OUT=${OUT:-/tmp/device_serve}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import aiohttp, grpc, tritonclient.http, typer, rich" 2>/dev/null; then
  WANT=(aiohttp grpcio protobuf 'tritonclient[http]' typer rich)
  # Into the environment where it is writable, else beside it (a folder put on PYTHONPATH, the subprocesses too).
  if ! python3 -m pip install -q --no-index --find-links .whl/serve "${WANT[@]}"; then
    python3 -m pip install -q --no-index --find-links .whl/serve --target /tmp/serve-site "${WANT[@]}" \
      || { echo "could not install the serve wheels from .whl/serve"; exit 2; }
    export PYTHONPATH=$PYTHONPATH:/tmp/serve-site
  fi
fi
# The CUDA engine is built from ONNX: the torch backend converts it with onnx2torch (a wheel in .whl/, see gpu_zoo.sh).
if ! python3 -c "import onnx2torch" 2>/dev/null && ls .whl/onnx2torch-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
python3 -c "import tritonclient, grpc, aiohttp; print('tritonclient', tritonclient.__version__ if hasattr(tritonclient, '__version__') else '?', 'grpcio', grpc.__version__, 'aiohttp', aiohttp.__version__)"
nproc
python3 benchmarks/serve.py --device "$WHAT" --json "$OUT/serve_$WHAT.json" "$@" 2>&1 | tee "$OUT/serve_$WHAT.log"
