#!/usr/bin/env bash
# Issue 19 part 5 on the GPU machine's 2-GPU kind: the torch backend's ResNet-50 engine served by Ray Serve on one
# and two GPUs (benchmarks/ray_serve.py --gpus 2) and scored by `enginesmith map` with one and two GPU workers
# (benchmarks/gpu_scale.py map). Ray must be installed first (scripts/gpu_ray_setup.sh part1, then part2, on the
# same warm machine); this script expects it in /tmp/site.
#   scripts/gpu_scale.sh serve    build the engine (if missing), then the Ray Serve benchmark -> $OUT/ray_serve_gpu.json
#   scripts/gpu_scale.sh map      build the engine (if missing), then the map benchmark      -> $OUT/map_gpu.json
set -u
WHAT=${1:-serve}
OUT=${OUT:-/tmp/gpu_scale/out}
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd)/src:/tmp/site RAY_USAGE_STATS_ENABLED=0
ENGINE=/tmp/gpu_scale/r50.engine
mkdir -p "$OUT"
[ -f "$ENGINE" ] || python3 benchmarks/gpu_scale.py engine --out "$ENGINE" 2>&1 | tail -3
case "$WHAT" in
  serve) timeout -k 10 ${SERVE_TIMEOUT:-420} python3 benchmarks/ray_serve.py --engine "$ENGINE" --gpus 2 --trust-code \
           --json "$OUT/ray_serve_gpu.json" ${SERVE_ARGS:-} 2>&1 | tail -40 ;;
  map) timeout -k 10 ${MAP_TIMEOUT:-420} python3 benchmarks/gpu_scale.py map --engine "$ENGINE" --json "$OUT/map_gpu.json" \
           ${MAP_ARGS:-} 2>&1 | tail -40 ;;
  *) echo "usage: $0 serve|map" >&2; exit 2 ;;
esac
