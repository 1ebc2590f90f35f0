"""ONNX -> TensorRT network -> builder config -> serialized engine, for TensorRT 8.6, 10.x and 11.x.

Written against NVIDIA's Python API reference and following the Polygraphy loaders
(``tools/Polygraphy/polygraphy/backend/trt/{loader,config,calibrator}.py`` in
NVIDIA/TensorRT) where the versions differ:

=============================  ===========================  ===============================
what                           TensorRT 8.6                 TensorRT 10.x / 11.x
=============================  ===========================  ===============================
network flags                  EXPLICIT_BATCH required      implicit batch gone; STRONGLY_TYPED
                                                            (10.0+; always on in 11)
precision                      BuilderFlag.FP16/INT8        10: flags or strongly typed;
                                                            11: from the model only
int8                           IInt8*Calibrator             10: calibrator (deprecated) or Q/DQ;
                                                            11: Q/DQ only (no calibrators)
workspace                      set_memory_pool_limit (8.4+) set_memory_pool_limit
                               (max_workspace_size before)
build                          build_serialized_network     build_serialized_network
                               (build_engine before 8.0)    (build_engine removed in 10)
progress                       none                         IProgressMonitor
=============================  ===========================  ===============================

Nothing here has run: TensorRT cannot be installed where this was written (see the
package docstring).
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import onnx

from ...errors import BuildError, EnginesmithError, UnsupportedModelError, ValidationDataError
from ...signature import Signature
from ..base import Calibration, ProgressCallback
from ..caches import cache_dir
from ..onnxruntime_int8 import CalibrationReader
from . import cuda
from ._trt import captured_errors, import_tensorrt, trt_logger
from .calibration import (
    CalibrationFeeder,
    calibration_dtype,
    calibration_profiles,
    make_calibrator,
    trt_dtype_name,
    uniform_batches,
)
from .options import (
    ModelPrecisions,
    PrecisionPlan,
    Profile,
    TrtApi,
    TrtOptions,
    api_of,
    dla_core_problem,
    hardware_compatibility_problem,
    model_precisions,
    plan_precision,
    profile_max_batch,
    resolve_profiles,
)

CALIBRATION_CACHE = "calibration_cache.json"  # the name api.py reuses on rebuilds (see the package docstring)
TIMING_CACHE = "tensorrt_timing.cache"
MiB = 1 << 20


@dataclass
class BuiltEngine:
    plan: bytes
    options: TrtOptions
    log: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    caches: dict[str, bytes] = field(default_factory=dict)


def build_engine(
    model: onnx.ModelProto,
    signature: Signature,
    precision: str,
    calibration_method: str,
    options: TrtOptions,
    calibration: Calibration | None = None,
    progress: ProgressCallback | None = None,
    previous_caches: Mapping[str, bytes] | None = None,
) -> BuiltEngine:
    """``previous_caches``: the cache entries of the bundle being rebuilt (its timing cache seeds this build's)."""
    trt = import_tensorrt()
    api = api_of(trt)
    cuda.set_device(options.gpu)
    device = cuda.device_facts(options.gpu)
    options = resolve_defaults(options, signature, device)
    precisions = model_precisions(model)
    plan = plan_precision(precision, api, precisions, options.strongly_typed, calibration_method)
    check_dla(options, precision, precisions)
    problem = hardware_compatibility_problem(options.hardware_compatibility, api.version, device.compute_capability)
    if problem:
        raise BuildError(problem)
    log = [f"TensorRT {trt.__version__} on {device.name} ({device.sm}), CUDA {device.runtime_version} (driver {device.driver_version})"]
    log += list(plan.notes)
    caches: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="enginesmith-trt-") as tmp:
        model = _apply_model_precision(model, plan, calibration, calibration_method, Path(tmp), log, caches)
        started = time.perf_counter()
        builder = trt.Builder(trt_logger())
        network = builder.create_network(_network_flags(trt, api, plan))
        parser = trt.OnnxParser(network, trt_logger())
        if options.version_compatible or options.hardware_compatibility != "none":
            _native_instancenorm(trt, parser)
        _parse(trt, parser, model, Path(tmp))
        config = builder.create_builder_config()
        keep_alive = _configure(trt, api, builder, network, config, options, plan, calibration, progress, log)
        timing_path = timing_cache_path(options.timing_cache, trt.__version__, device)
        _load_timing_cache(config, timing_path, log, (previous_caches or {}).get(TIMING_CACHE))
        calibrator = keep_alive.get("calibrator")
        try:
            plan_bytes = _build(trt, builder, network, config, options, progress)
        except EnginesmithError:
            if calibrator is not None:
                calibrator.raise_failure()  # a failing calibration explains a failed build best
            raise
        finally:
            if calibrator is not None:
                calibrator.free()
        caches.update(_save_timing_cache(config, timing_path, log))
        if calibrator is not None:
            calibrator.raise_failure()
            if calibrator.written:
                caches[CALIBRATION_CACHE] = calibrator.written
        seconds = time.perf_counter() - started
    log.append(f"engine built in {seconds:.1f} s: {len(plan_bytes) / MiB:.1f} MiB, {network.num_layers} network layers")
    details = {
        "tensorrt": trt.__version__,
        "gpu": f"{device.name} ({device.sm})",
        "strongly_typed": plan.strongly_typed,
        "builder_flags": list(plan.builder_flags),
        "profiles": {name: p.to_dict() for name, p in options.profiles.items()},
        "optimization_profiles": _profile_copies(options),
        "workspace_mb": options.workspace_mb,
        "timing_cache": str(timing_path) if timing_path else "off",
        "build_seconds": round(seconds, 2),
        "engine_bytes": len(plan_bytes),
    }
    return BuiltEngine(plan_bytes, options, log, details, caches)


# --------------------------------------------------------------------------- defaults and checks


def default_workspace_mb(device: cuda.DeviceFacts) -> int:
    """Small on integrated GPUs (a Nano shares 4 GB with the OS), a quarter of the GPU up to 4 GiB elsewhere."""
    if device.integrated:
        return 256
    return int(max(256, min(4096, device.total_memory // 4 // MiB)))


def resolve_defaults(options: TrtOptions, signature: Signature, device: cuda.DeviceFacts) -> TrtOptions:
    profiles = resolve_profiles(signature, options, device.integrated)
    return replace(
        options,
        profiles=profiles,
        max_batch=profile_max_batch(profiles) if profiles else options.max_batch,
        workspace_mb=options.workspace_mb or default_workspace_mb(device),
        contexts=options.contexts or (1 if device.integrated else 2),
    )


def check_dla(options: TrtOptions, precision: str, precisions: ModelPrecisions) -> None:
    if options.dla_core is not None and precision == "fp32" and not precisions.own_precisions:
        raise BuildError("the DLA runs fp16 and int8 only: build with --precision fp16 (or int8) to use dla_core")


def _profile_copies(options: TrtOptions) -> int:
    """One identical profile per execution context: concurrent contexts must not share a profile."""
    return (options.contexts or 1) if options.profiles else 0


# --------------------------------------------------------------------------- model precision


def _apply_model_precision(
    model: onnx.ModelProto,
    plan: PrecisionPlan,
    calibration: Calibration | None,
    method: str,
    tmp: Path,
    log: list[str],
    caches: dict[str, bytes],
) -> onnx.ModelProto:
    """Strongly typed networks take precisions from the model: rewrite it to fp16, or insert Q/DQ nodes."""
    if plan.convert_fp16:
        from ...graph.precision import convert_fp16

        return convert_fp16(model)
    if plan.quantize_qdq:
        quantized, cache = quantize_qdq(model, _require_calibration(calibration), method, tmp, log)
        caches[CALIBRATION_CACHE] = cache
        return quantized
    return model


def _require_calibration(calibration: Calibration | None) -> Calibration:
    if calibration is None or (not calibration.batches and calibration.cache is None):
        raise ValidationDataError("int8 needs calibration data: give --calib DATA (or --calib-random for a smoke test)")
    return calibration


def quantize_qdq(
    model: onnx.ModelProto, calibration: Calibration, method: str, tmp: Path, log: list[str]
) -> tuple[onnx.ModelProto, bytes]:
    """Symmetric int8 Q/DQ (what TensorRT's explicit quantization takes), calibrated by ONNX Runtime.

    Returns the model and ONNX Runtime's JSON calibration cache; a cache from an earlier
    build (``calibration.cache``) skips calibration and reproduces the same scales.
    """
    from onnxruntime import quantization

    source, target, cache_path = tmp / "fp32.onnx", tmp / "qdq.onnx", tmp / CALIBRATION_CACHE
    onnx.save(model, source)
    reader = None
    if calibration.cache is not None and calibration.cache.lstrip().startswith(b"{"):
        cache_path.write_bytes(calibration.cache)
        log.append("int8: calibration skipped, scales reused from the calibration cache")
    elif calibration.batches:
        reader = CalibrationReader(calibration.batches)
    else:
        raise ValidationDataError(
            "the calibration cache was made by TensorRT's implicit quantization, which this TensorRT lacks; "
            "give calibration data (--calib DATA) to calibrate again"
        )
    methods = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
    try:
        quantization.quantize_static(
            str(source),
            str(target),
            reader,
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            activation_type=quantization.QuantType.QInt8,
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=getattr(quantization.CalibrationMethod, methods[method]),
            calibration_cache_path=str(cache_path),
            # TensorRT takes symmetric int8 only (zero points of 0).
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises many types
        raise BuildError(f"int8 Q/DQ quantization failed: {str(exc).splitlines()[0]}") from None
    return onnx.load(target), cache_path.read_bytes()


# --------------------------------------------------------------------------- network and parser


def _network_flags(trt: Any, api: TrtApi, plan: PrecisionPlan) -> int:
    flags = 0
    if api.explicit_batch_flag:  # TensorRT < 10: implicit batch is the default; ONNX needs explicit
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan.strongly_typed and api.weak_typing:  # 10.x; in 11 (no weak typing) the flag is a deprecated no-op
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def _native_instancenorm(trt: Any, parser: Any) -> None:
    """Version/hardware-compatible engines cannot embed plugins: InstanceNorm must use the native layer."""
    flag = getattr(getattr(trt, "OnnxParserFlag", None), "NATIVE_INSTANCENORM", None)
    if flag is not None:
        parser.set_flag(flag)


@dataclass(frozen=True)
class ParserIssue:
    node: str
    op: str
    code: str
    description: str

    def __str__(self) -> str:
        where = f"node '{self.node}' ({self.op})" if self.node else "the model"
        return f"{where}: {self.code}: {self.description}"


def parser_issues(parser: Any, model: onnx.ModelProto) -> list[ParserIssue]:
    """Every error the ONNX parser recorded, with the node's name and op.

    ``node_name()``/``node_operator()`` exist from TensorRT 10; 8.6 gives only the node's
    index in the graph (``node()``, -1 when the error is not about one node).
    """
    nodes = list(model.graph.node)
    issues = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        index = int(error.node())
        node = nodes[index] if 0 <= index < len(nodes) else None
        name = error.node_name() if hasattr(error, "node_name") else (node.name if node is not None else "")
        op = error.node_operator() if hasattr(error, "node_operator") else (node.op_type if node is not None else "")
        if not name and node is not None:
            name = f"<unnamed #{index}>"
        issues.append(ParserIssue(name, op, str(error.code()).split(".")[-1], str(error.desc()).strip()))
    return issues


def parse_failure(issues: list[ParserIssue], version: str) -> UnsupportedModelError | BuildError:
    """One error naming every node the parser rejected; unsupported ops are :class:`UnsupportedModelError`."""
    listed = "; ".join(str(issue) for issue in issues) or "no details (see the TensorRT log)"
    count = f"{len(issues)} error{'s' if len(issues) != 1 else ''}"
    if any(issue.code.startswith("UNSUPPORTED") for issue in issues):
        ops = sorted({issue.op for issue in issues if issue.op})
        return UnsupportedModelError(
            f"TensorRT {version}'s ONNX parser cannot build the model ({count}): {listed}; "
            f"replace {'the ops ' + ', '.join(ops) if ops else 'these nodes'} in the model, add a TensorRT plugin, "
            "or use --backend onnxruntime (which runs every op)"
        )
    return BuildError(f"TensorRT {version}'s ONNX parser failed ({count}): {listed}")


def _parse(trt: Any, parser: Any, model: onnx.ModelProto, tmp: Path) -> None:
    # parse_from_file lets the parser find external weight files next to the model (models over 2 GB).
    path = tmp / "model.onnx"
    try:
        onnx.save(model, path)
    except ValueError:  # protobuf's 2 GB limit: weights go to a side file
        onnx.save(model, path, save_as_external_data=True, location="model.weights")
    ok = parser.parse_from_file(str(path))
    issues = parser_issues(parser, model)
    if not ok or issues:
        raise parse_failure(issues, trt.__version__)


# --------------------------------------------------------------------------- builder config


def _configure(
    trt: Any,
    api: TrtApi,
    builder: Any,
    network: Any,
    config: Any,
    options: TrtOptions,
    plan: PrecisionPlan,
    calibration: Calibration | None,
    progress: ProgressCallback | None,
    log: list[str],
) -> dict[str, Any]:
    """Apply the options; returns the Python objects TensorRT only borrows (they must outlive the build)."""
    borrowed: dict[str, Any] = {}
    _set_workspace(trt, api, config, options.workspace_mb or 256)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if "FP16" in plan.builder_flags and not getattr(builder, "platform_has_fast_fp16", True):
        log.append("fp16: this GPU has no fast fp16; TensorRT keeps fp32 where fp16 would be slower")
    for _ in range(_profile_copies(options)):
        config.add_optimization_profile(_trt_profile(builder, options.profiles))
    if plan.calibrator:
        borrowed["calibrator"] = _set_calibrator(trt, builder, config, network, plan, options, calibration, log)
    _set_dla(trt, api, builder, config, options, log)
    _set_compatibility(trt, api, config, options, log)
    if progress is not None and api.progress_monitor:
        borrowed["monitor"] = config.progress_monitor = make_progress_monitor(trt, progress)
    return borrowed


def _set_workspace(trt: Any, api: TrtApi, config: Any, megabytes: int) -> None:
    if api.memory_pools:  # TensorRT >= 8.4
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, megabytes * MiB)
    else:  # TensorRT < 8.4 (deprecated in 8.4, removed in 10)
        config.max_workspace_size = megabytes * MiB


def _trt_profile(builder: Any, profiles: Mapping[str, Profile]) -> Any:
    profile = builder.create_optimization_profile()
    for name, p in profiles.items():
        profile.set_shape(name, p.min, p.opt, p.max)
    return profile


def _set_dla(trt: Any, api: TrtApi, builder: Any, config: Any, options: TrtOptions, log: list[str]) -> None:
    if options.dla_core is None:
        return
    problem = dla_core_problem(options.dla_core, int(builder.num_DLA_cores), api.version)
    if problem:
        raise BuildError(problem)
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = options.dla_core
    if options.gpu_fallback:
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    log.append(f"DLA core {options.dla_core}, {'with' if options.gpu_fallback else 'without'} GPU fallback")


def _set_compatibility(trt: Any, api: TrtApi, config: Any, options: TrtOptions, log: list[str]) -> None:
    wanted = options.optimization_level is not None or options.version_compatible or options.hardware_compatibility != "none"
    if wanted and not api.compatibility_options:
        raise BuildError(
            "optimization_level, version_compatible and hardware_compatibility need TensorRT 8.6 or newer; "
            f"this is TensorRT {api.version_text}"
        )
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        log.append("version-compatible engine: runs on later TensorRT releases of the same major version")
    if options.hardware_compatibility == "same_compute_capability" and not api.same_compute_capability:
        # Only when the version gate passed but the enum is missing (a TensorRT build without it).
        raise BuildError(f"this TensorRT {api.version_text} lacks HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY")
    if options.hardware_compatibility != "none":
        level = {"ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level[options.hardware_compatibility])
        log.append(f"hardware-compatible engine ({options.hardware_compatibility})")


# --------------------------------------------------------------------------- int8 calibration


def _set_calibrator(
    trt: Any,
    builder: Any,
    config: Any,
    network: Any,
    plan: PrecisionPlan,
    options: TrtOptions,
    calibration: Calibration | None,
    log: list[str],
) -> Any:
    calibration = _require_calibration(calibration)
    cache = calibration.cache if calibration.cache is not None and calibration.cache.startswith(b"TRT-") else None
    if calibration.cache is not None and cache is None:
        log.append("int8: the calibration cache is not TensorRT's (another backend made it); calibrating again")
    batches = uniform_batches(calibration.batches, log)
    if cache is None and not batches:
        raise ValidationDataError("int8 needs calibration data: give --calib DATA (a TensorRT calibration cache alone was not found)")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dtypes = {tensor.name: calibration_dtype(trt_dtype_name(tensor.dtype)) for tensor in inputs}
    feeder = CalibrationFeeder(batches, dtypes, options.gpu)
    calibrator = make_calibrator(trt, plan.calibrator, feeder, cache)
    config.int8_calibrator = calibrator
    # Dynamic networks need a calibration profile even when the cache means no batch is fed.
    pinned = calibration_profiles(options.profiles, batches)
    if pinned and not config.set_calibration_profile(_trt_profile(builder, pinned)):
        shapes = ", ".join(f"{name} {list(p.opt)}" for name, p in pinned.items())
        raise BuildError(f"TensorRT rejected the int8 calibration profile ({shapes}); see the TensorRT log")
    if cache is not None:
        log.append("int8: calibration skipped, scales reused from the TensorRT calibration cache")
    return calibrator


# --------------------------------------------------------------------------- progress


def make_progress_monitor(trt: Any, progress: ProgressCallback) -> Any:
    """A ``trt.IProgressMonitor`` (TensorRT >= 10) reporting each builder phase as ``progress(stage, done, total)``."""

    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()  # TensorRT may call from several builder threads
            self._totals: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                self._totals[phase_name] = int(num_steps)
            self._report(phase_name, 0)

        def step_complete(self, phase_name: str, step: int) -> bool:
            self._report(phase_name, int(step) + 1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self._report(phase_name, None)

        def _report(self, phase: str, done: int | None) -> None:
            """``done`` None means the phase finished."""
            with self._lock:
                total = self._totals.get(phase) or None
            if done is None:
                done = total or 1
            try:
                progress(f"TensorRT: {phase}", min(done, total) if total else done, total)
            except Exception:  # noqa: BLE001 - a broken progress bar must not break the build
                pass

    return Monitor()


# --------------------------------------------------------------------------- build and caches


_OUT_OF_MEMORY = re.compile(
    r"out of memory|cudaErrorMemoryAllocation|Requested amount of GPU memory|insufficient memory|"
    r"failed to allocate|std::bad_alloc|OutOfMemory",
    re.IGNORECASE,
)
_NO_TACTIC = re.compile(r"(?:Could not find any implementation for node|no implementation for) ([^\s,.]+[^\s,]*)", re.IGNORECASE)


def build_failure(errors: list[str], options: TrtOptions, version: str) -> BuildError | UnsupportedModelError:
    """Classify the errors TensorRT logged while ``build_serialized_network`` returned None."""
    text = " | ".join(errors[-5:]) or "TensorRT logged no error"
    if any(_OUT_OF_MEMORY.search(e) for e in errors):
        return BuildError(
            f"TensorRT {version} ran out of memory while building the engine ({text}); lower backend options "
            f"workspace_mb (now {options.workspace_mb}), max_batch or optimization_level, close other GPU programs, "
            "and on a Jetson add swap space"
        )
    layers = sorted({m.group(1) for e in errors for m in [_NO_TACTIC.search(e)] if m})
    if layers:
        hint = "set gpu_fallback (or drop dla_core)" if options.dla_core is not None else "raise workspace_mb"
        return UnsupportedModelError(
            f"TensorRT {version} found no implementation for layer(s) {', '.join(layers)} on this device ({text}); "
            f"{hint}, or use --backend onnxruntime"
        )
    return BuildError(f"TensorRT {version} could not build the engine: {text}")


def _build(trt: Any, builder: Any, network: Any, config: Any, options: TrtOptions, progress: ProgressCallback | None) -> bytes:
    if progress is not None:
        progress("building TensorRT engine", 0, None)
    with captured_errors() as errors:
        try:
            if hasattr(builder, "build_serialized_network"):  # TensorRT >= 8.0
                serialized = builder.build_serialized_network(network, config)
            else:  # TensorRT 7.x
                engine = builder.build_engine(network, config)
                serialized = engine.serialize() if engine is not None else None
        except (RuntimeError, TypeError, ValueError) as exc:  # pybind raises these for bad settings
            raise BuildError(f"TensorRT {trt.__version__} rejected the build settings: {exc}") from None
    if serialized is None:
        raise build_failure(errors, options, trt.__version__)
    if progress is not None:
        progress("building TensorRT engine", 1, 1)
    return bytes(serialized)


def timing_cache_path(option: str, version: str, device: cuda.DeviceFacts) -> Path | None:
    """Where builds on this GPU and TensorRT version share tactic timings (None when the option is "off")."""
    if option == "off":
        return None
    if option != "auto":
        return Path(option).expanduser()
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", device.name).strip("-").lower()
    return cache_dir() / "tensorrt" / f"timing-{version}-{gpu}-{device.sm}.cache"


def timing_cache_source(path: Path, bundled: bytes | None) -> tuple[bytes, str]:
    """The timing cache to start from and where it came from: the shared file (it grows with every
    build on this GPU, so it holds the bundle's timings too), else the rebuilt bundle's own, else none."""
    if path.is_file():
        blob = path.read_bytes()
        if blob:
            return blob, str(path)
    if bundled:
        return bundled, "the rebuilt bundle"
    return b"", ""


def _load_timing_cache(config: Any, path: Path | None, log: list[str], bundled: bytes | None = None) -> None:
    if path is None:
        return
    blob, origin = timing_cache_source(path, bundled)
    cache = config.create_timing_cache(blob)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        if blob:
            log.append(f"timing cache reused: {origin} ({len(blob) / 1024:.0f} KiB)")
        return
    # Unreadable, or rejected as written by another TensorRT version or GPU: start afresh.
    log.append(f"timing cache {path} was written for another TensorRT version or GPU; starting a new one")
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(config: Any, path: Path | None, log: list[str]) -> dict[str, bytes]:
    """Write the (grown) timing cache back atomically; it also goes into the bundle's caches."""
    if path is None:
        return {}
    cache = config.get_timing_cache()
    if cache is None:
        return {}
    blob = bytes(cache.serialize())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(blob)
        os.replace(partial, path)  # concurrent builds: the last complete file wins, none is torn
    except OSError as exc:  # a read-only cache folder must not fail a finished build
        log.append(f"timing cache not saved to {path}: {exc}")
    return {TIMING_CACHE: blob}
