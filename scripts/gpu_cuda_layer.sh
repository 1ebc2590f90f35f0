#!/usr/bin/env bash
# The TensorRT backend's CUDA layer (issue 6) on a GPU machine: its tests for real, then its timings,
# then the backend's tests (which build real engines only where TensorRT is installed; the project's
# GPU machine has no TensorRT, so there they skip and only the TensorRT-free half runs).
#
# Run from the repository root on the GPU machine; results land in $OUT (default /tmp/gpu_cuda_out):
#   scripts/gpu_cuda_layer.sh
# Files: environment.txt (GPU, driver, package versions), cuda_layer.log (pytest -v output),
#        cuda_layer.xml (JUnit), issue20.log / issue20.xml (issue 20's CUDA tests alone),
#        cuda_layer_timings.json (benchmarks/cuda_layer.py), tensorrt_backend.log.
# Needs: python3 with cuda-python (cuda.bindings), numpy, pytest, onnx, onnxruntime; torch with CUDA for the
# DLPack/__cuda_array_interface__ tests (skipped without it). Installs nothing.
set -u
OUT=${OUT:-/tmp/gpu_cuda_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 - <<'EOF'
import sys
from importlib.metadata import version
print("python", sys.version.split()[0])
for name in ("cuda-bindings", "cuda-python", "numpy", "torch", "pytest"):
    try:
        print(name, version(name))
    except Exception as exc:  # noqa: BLE001 - report what is missing
        print(name, "missing:", type(exc).__name__)
EOF
} 2>&1 | tee "$OUT/environment.txt"

timeout -k 10 420 python3 -m pytest tests/test_cuda_layer.py -v -rs -s -p no:cacheprovider \
  --junitxml="$OUT/cuda_layer.xml" >"$OUT/cuda_layer.log" 2>&1
status=$?
tail -n 45 "$OUT/cuda_layer.log"
echo "=== pytest exit status $status"

# Issue 20, exactly its CUDA tests (no TensorRT needed): misaligned torch views staged through aligned
# buffers, the runtime's device I/O preparation, the int8 calibration feeder called from other threads.
ISSUE20_TESTS=(
  tests/test_cuda_layer.py::test_dlpack_hands_over_a_views_misaligned_address
  tests/test_cuda_layer.py::test_misaligned_torch_input_is_staged_through_an_aligned_pooled_buffer
  tests/test_cuda_layer.py::test_misaligned_torch_output_gets_the_result_copied_in
  tests/test_cuda_layer.py::test_runtime_device_io_stages_misaligned_tensors
  tests/test_cuda_layer.py::test_calibration_feeder_from_another_thread_feeds_the_network_types
  tests/test_cuda_layer.py::test_calibration_feeder_allocates_on_the_engines_gpu_and_restores_the_thread
)
timeout -k 10 180 python3 -m pytest "${ISSUE20_TESTS[@]}" -v -rs -p no:cacheprovider \
  --junitxml="$OUT/issue20.xml" >"$OUT/issue20.log" 2>&1
issue20_status=$?
tail -n 20 "$OUT/issue20.log"
echo "=== pytest (issue 20 CUDA tests) exit status $issue20_status"

timeout -k 10 120 python3 benchmarks/cuda_layer.py --json "$OUT/cuda_layer_timings.json" 2>&1 | tee "$OUT/cuda_layer_timings.txt"

# The backend's own tests: real engines where TensorRT is installed, skipped (with the reason) where it is not.
timeout -k 10 300 python3 -m pytest tests/test_tensorrt_backend.py -q -rs -p no:cacheprovider >"$OUT/tensorrt_backend.log" 2>&1
trt_status=$?
tail -n 15 "$OUT/tensorrt_backend.log"
echo "=== pytest (TensorRT backend) exit status $trt_status"
[ "$status" -ne 0 ] && exit $status
[ "$issue20_status" -ne 0 ] && exit $issue20_status
exit $trt_status
