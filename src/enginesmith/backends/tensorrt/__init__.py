"""TensorRT backend: serialized TensorRT engines for NVIDIA GPUs and Jetsons (TensorRT 8.6, 10.x, 11.x).

Build
    The ONNX parser turns the model into a TensorRT network (every parser error is
    reported with its node's name and op); the builder config gets the precision
    (builder flags, or a strongly typed network when the model carries its own
    precisions, and always on TensorRT 11), optimization profiles for dynamic inputs,
    a workspace limit suited to small devices, DLA, optimization level and
    version/hardware compatibility where the version has them. int8 calibrates with
    ``IInt8EntropyCalibrator2`` (or ``IInt8MinMaxCalibrator``) on TensorRT 8.6/10 and
    with Q/DQ nodes from ONNX Runtime's calibration on TensorRT 11, which dropped
    calibrators. See :mod:`.options` for the backend options and :mod:`.builder`.

Payload
    The serialized engine (``model.plan``). The bundle's cache folder keeps the
    calibration cache (``calibration_cache.json``, the name api.py reuses on rebuilds;
    TensorRT's own cache format when TensorRT calibrated) and the timing cache
    (``tensorrt_timing.cache``), which is also kept in enginesmith's cache folder and
    reused by every build on the same GPU and TensorRT version; when that shared file is
    missing, a rebuilt bundle's own timing cache seeds the build (api passes the bundle's
    cache entries as ``BuildOptions.previous_caches``).

Runtime
    :class:`.runtime.TensorRTSession`: named tensors, dynamic shapes checked against the
    optimization profile, pinned and device buffers reused per shape, one stream per
    execution context, several contexts for concurrent calls, optional CUDA graphs, and
    ``run_device`` for torch/cupy tensors in and out without copies (:mod:`.cuda`).

What has run
    The CUDA layer (:mod:`.cuda`, :mod:`._dlpack`) ran on an H100 (``scripts/gpu_cuda_layer.sh``);
    option validation, profiles, precision plans, fingerprints and Jetson parsing ran on
    CPU; the CUDA tests of :mod:`.alignment` and of the calibration feeder (issue 20) ran on
    one and two H200s. Nothing that calls TensorRT has run: TensorRT could not be installed where this
    was written, so building, loading and running engines are untested against a real
    TensorRT; ``tests/test_tensorrt_backend.py`` holds those tests, skipped where
    ``import tensorrt`` fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import onnx

from ...errors import BuildError, MissingDependencyError
from ...host import host_fingerprint
from ...signature import Signature
from ..base import Availability, Backend, BuildOptions, BuildResult, Calibration, ProgressCallback, Session
from . import cuda, facts
from ._trt import MISSING_HINT, import_tensorrt, trt_logger
from .options import TrtOptions, parse_options

PAYLOAD_NAME = "model.plan"
# The precisions this backend builds (the base list also has bf16, which it does not build yet).
TENSORRT_PRECISIONS = ("fp32", "fp16", "int8")


def fast_precisions(compute_capability: tuple[int, int]) -> list[str]:
    """The precisions with fast kernels on a GPU (TensorRT's support matrix), slowest first.

    fp16: sm_53 (Nano/TX1), sm_60, sm_62 (TX2) and sm_70+ (not sm_61 consumer Pascal).
    int8: sm_61 and sm_70+ (DP4A / tensor cores); not the Nano, TX2 or sm_60.
    """
    cc = compute_capability
    precisions = ["fp32"]
    if cc in ((5, 3), (6, 0), (6, 2)) or cc >= (7, 0):
        precisions.append("fp16")
    if cc == (6, 1) or cc >= (7, 0):
        precisions.append("int8")
    return precisions


class TensorRTBackend(Backend):
    name = "tensorrt"
    display_name = "TensorRT"
    # Above ONNX Runtime (10) and PyTorch Inductor on a GPU (15): where TensorRT runs, it is the fastest.
    auto_priority = 20

    def available(self) -> Availability:
        try:
            trt = import_tensorrt()
        except MissingDependencyError as exc:
            return Availability(False, str(exc))
        try:
            count = cuda.device_count()
        except MissingDependencyError as exc:
            return Availability(False, f"TensorRT {trt.__version__} is installed, but {exc}")
        if count == 0:
            return Availability(
                False,
                f"TensorRT {trt.__version__} is installed, but no CUDA GPU is usable here ({cuda.no_device_reason()}); "
                "use --backend onnxruntime",
            )
        return Availability(True)

    def version(self) -> str:
        return str(import_tensorrt().__version__)

    def fingerprint(self, options: BuildOptions) -> dict[str, str]:
        trt_options = parse_options(options.backend_options)
        device = cuda.device_facts(trt_options.gpu)
        version = self.version()
        fingerprint = {
            **host_fingerprint(),
            **facts.jetson_facts(),
            "backend_version": version,
            "tensorrt": facts.tensorrt_target(version, trt_options.version_compatible),
            "gpu": device.name,
            "compute_capability": "{}.{}".format(*device.compute_capability),
            "gpu_target": facts.gpu_target(device.name, device.compute_capability, trt_options.hardware_compatibility),
            "cuda_runtime": device.runtime_version,
            "cuda_driver": device.driver_version,
        }
        if trt_options.dla_core is not None:
            fingerprint["dla"] = self._dla_fact(trt_options.dla_core)
        return fingerprint

    def _dla_fact(self, core: int) -> str:
        cores = int(import_tensorrt().Runtime(trt_logger()).num_DLA_cores)
        return f"DLA core {core}" if core < cores else f"DLA core {core} missing ({cores} DLA cores)"

    def must_match(self) -> list[str]:
        return list(facts.MUST_MATCH)

    def describe_platform(self, fingerprint: Mapping[str, str]) -> str:
        return facts.describe_platform(fingerprint)

    def precisions(self, options: BuildOptions) -> list[str]:
        return fast_precisions(cuda.device_facts(parse_options(options.backend_options).gpu).compute_capability)

    def build(
        self,
        model: onnx.ModelProto,
        signature: Signature,
        options: BuildOptions,
        progress: ProgressCallback | None = None,
        calibration: Calibration | None = None,
    ) -> BuildResult:
        from .builder import build_engine

        if options.precision not in TENSORRT_PRECISIONS:
            raise BuildError(f"unknown precision '{options.precision}' for TensorRT: choose one of "
                             f"{', '.join(TENSORRT_PRECISIONS)}")
        trt_options = parse_options(options.backend_options)
        built = build_engine(
            model, signature, options.precision, options.calibration_method, trt_options, calibration, progress,
            previous_caches=options.previous_caches,
        )
        if trt_options.ignored:
            built.log.append(f"options of other backends ignored: {', '.join(trt_options.ignored)}")
        resolved = BuildOptions(
            precision=options.precision,
            threads=options.threads,
            force_precision=options.force_precision,
            calibration_method=options.calibration_method,
            backend_options=built.options.to_backend_options(),
        )
        return BuildResult(
            payload=built.plan,
            payload_name=PAYLOAD_NAME,
            resolved_options=resolved,
            log=built.log,
            details=built.details,
            caches=built.caches,
        )

    def load(self, payload: bytes | Path, options: BuildOptions, signature: Signature) -> Session:
        from .runtime import TensorRTSession

        plan = payload if isinstance(payload, bytes) else Path(payload).read_bytes()
        return TensorRTSession(plan, parse_options(options.backend_options), signature)


__all__ = ["MISSING_HINT", "PAYLOAD_NAME", "TensorRTBackend", "TrtOptions", "fast_precisions"]
