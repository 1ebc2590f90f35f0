"""ONNX Runtime backend: the engine that works everywhere.

Build applies every graph optimization ONNX Runtime has for the chosen
execution providers *offline* and stores the optimized model as the payload,
so loading does no re-optimization. Those optimizations are hardware-specific
(the CPU provider rewrites convolutions into blocked NCHWc layouts sized for
the machine's vector width), which is why the engine's fingerprint records the
CPU's ISA features and the ONNX Runtime version.

With onnxruntime-gpu, the CUDA and TensorRT execution providers are accepted
(``--provider cuda`` / ``tensorrt``; TensorRT falls back to CUDA, then the CPU, for
subgraphs it cannot run). The TensorRT options of the TensorRT backend map onto the
provider's options, and its engines, timing cache and int8 calibration table are kept in
the bundle's cache entries: see :mod:`.ort_gpu`, which also says what has never run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import onnx

from ..errors import BackendUnavailableError, BuildError, MissingDependencyError, UnsupportedModelError, ValidationDataError
from ..host import cpu_flags, host_fingerprint, physical_cores
from ..signature import Signature, random_inputs
from ..graph.precision import convert_fp16  # noqa: F401 - re-exported: callers import it from here
from .base import Availability, Backend, BuildOptions, BuildResult, Calibration, ProgressCallback, Session
from . import ort_gpu
from .ort_gpu import CUDA_EP, TRT_EP, OrtGpuSettings, TrtEpPlan

_log = logging.getLogger("enginesmith.onnxruntime")
PAYLOAD_NAME = "model.optimized.onnx"

# Short names users type -> ONNX Runtime provider names, in preference order for "auto".
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
# Providers that compile subgraphs into their own kernels: ORT cannot save a
# model containing compiled nodes, so for those the payload keeps only the
# provider-independent optimizations and the rest happens at load.
COMPILING_PROVIDERS = {"TensorrtExecutionProvider", "OpenVINOExecutionProvider"}
PROVIDER_LABELS = {
    "CPUExecutionProvider": "CPU",
    "CUDAExecutionProvider": "CUDA",
    "TensorrtExecutionProvider": "TensorRT",
    "OpenVINOExecutionProvider": "OpenVINO",
}


# ONNX Runtime's process-wide log level, set by the CLI (errors only unless --verbose); None leaves ORT's default.
_LOG_SEVERITY: int | None = None


def set_log_verbosity(verbose: bool) -> None:
    """Keep ONNX Runtime's warnings (unused initializers, fallbacks) off the terminal unless ``verbose``."""
    global _LOG_SEVERITY
    _LOG_SEVERITY = 2 if verbose else 3  # 2: ONNX Runtime's own default (warnings)
    if "onnxruntime" in sys.modules:
        sys.modules["onnxruntime"].set_default_logger_severity(_LOG_SEVERITY)


def _ort():
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - onnxruntime is a core dependency
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime") from None
    if _LOG_SEVERITY is not None:
        onnxruntime.set_default_logger_severity(_LOG_SEVERITY)
    return onnxruntime


def resolve_providers(requested: list[str] | None) -> list[str]:
    """Provider names from user aliases; ``None`` means the CPU provider alone."""
    available = _ort().get_available_providers()
    if not requested:
        return ["CPUExecutionProvider"]
    if requested == ["auto"]:
        picked = [p for p in PROVIDER_ALIASES.values() if p in available]
        return picked or ["CPUExecutionProvider"]
    resolved = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise BackendUnavailableError(
                f"ONNX Runtime execution provider '{name}' is not available here (available: "
                f"{', '.join(available)}); install the onnxruntime build that has it (e.g. onnxruntime-gpu) "
                "or pick another provider"
            )
        resolved.append(full)
    if TRT_EP in resolved and CUDA_EP in available and CUDA_EP not in resolved:
        # Subgraphs TensorRT cannot run go to CUDA before the CPU (ONNX Runtime's recommended order).
        resolved.insert(resolved.index(TRT_EP) + 1, CUDA_EP)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")  # fallback for nodes the others cannot run
    return resolved


def _session_options(options: BuildOptions, optimize: bool):
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.intra_op_num_threads = options.threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only: warnings about unused initializers are noise to users
    return so


def _explain_ort_error(exc: Exception, model: onnx.ModelProto) -> UnsupportedModelError | BuildError:
    """Turn ONNX Runtime's error text into one line that names the op and the nodes."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    match = re.search(r"(?:([\w.]+):)?(\w+)\(-?\d+\) is not a registered function/op", text) or re.search(
        r"Could not find an implementation for (\w+)\(\d+\)", text
    )
    if match:
        op_type = match.groups()[-1]
        nodes = [n.name or f"<unnamed #{i}>" for i, n in enumerate(model.graph.node) if n.op_type == op_type]
        where = f" (nodes: {', '.join(nodes[:5])}{'...' if len(nodes) > 5 else ''})" if nodes else ""
        return UnsupportedModelError(
            f"ONNX Runtime cannot run op '{op_type}'{where}: {text}; replace the op in the model, "
            "register a custom-op library, or try another backend"
        )
    return BuildError(f"ONNX Runtime could not build the engine: {text}")


def _first_sample(feeds: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    """One sample of the build's inputs (inputs without a sample axis whole), for a profiled run."""
    if not feeds:
        return None
    total = max((v.shape[0] for v in feeds.values() if v.ndim), default=1)
    return {name: v[:1] if v.ndim and v.shape[0] == total else v for name, v in feeds.items()}


def _node_placement(session, signature: Signature, feeds: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, int]]:
    """op type -> {provider: count of nodes that ran on it}, read from one profiled run."""
    session.run(None, feeds if feeds is not None else random_inputs(signature.inputs, batch=1))
    profile_path = session.end_profiling()
    try:
        events = json.loads(Path(profile_path).read_text())
    finally:
        Path(profile_path).unlink(missing_ok=True)
    placement: dict[str, Counter] = {}
    seen: set[str] = set()
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") != "Node" or "provider" not in args or event["name"] in seen:
            continue
        seen.add(event["name"])
        placement.setdefault(args.get("op_name", "?"), Counter())[args["provider"]] += 1
    return {op: dict(counts) for op, counts in sorted(placement.items())}


GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
CALIBRATION_CACHE = "calibration_cache.json"


class _BatchReader:
    """Feeds calibration batches to ONNX Runtime's calibrator one at a time."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # pragma: no cover - used by strided calibration only
        pass


def _activation_type(quantization):
    """uint8 activations on x86 (the u8s8 kernels), int8 on Arm, per ONNX Runtime's guidance."""
    import platform

    if platform.machine().lower() in ("aarch64", "arm64"):
        return quantization.QuantType.QInt8
    return quantization.QuantType.QUInt8


def _equal_batches(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The calibration samples re-cut into batches of one size.

    ONNX Runtime's histogram calibrators (entropy, percentile) stack each tensor's values
    from all batches with np.asarray, which fails when the last batch is shorter
    ("inhomogeneous shape"); MinMax does not care, so its batches are left alone.
    """
    # 0-d inputs (a sample rate) are settings every batch carries whole, not samples to re-cut.
    merged = {name: np.concatenate([b[name] for b in batches]) if batches[0][name].ndim else batches[0][name]
              for name in batches[0]}
    total = next((v.shape[0] for v in merged.values() if v.ndim), 1)
    first = next((v.shape[0] for v in batches[0].values() if v.ndim), 1)
    size = max(d for d in range(1, min(first, total) + 1) if total % d == 0)
    return [{name: value[i : i + size] if value.ndim else value for name, value in merged.items()}
            for i in range(0, total, size)]


WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def float_tail(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes between the last weighted op and the graph outputs, which int8 leaves in float.

    They cost little, and one int8 scale per tensor cannot hold what such tails join: a YOLO head
    concatenates boxes in pixels (0-640) with class scores (0-1), so a quantized concat rounds every
    score below one step (640 / 255) to zero. Unnamed nodes are named here so they can be left out.
    """
    producers = {}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"enginesmith_node_{index}"
        for output in node.output:
            producers[output] = node
    tail, seen, pending = [], set(), [o.name for o in model.graph.output]
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in seen or node.op_type in WEIGHTED_OPS:
            continue
        seen.add(node.name)
        tail.append(node.name)
        if node.op_type not in ("Shape", "Size"):  # they read no values: what feeds them is not the tail
            pending.extend(node.input)
    return tail


# ONNX Runtime's symbolic shape inference saves the model it could not finish as this file (and its
# weights beside it, in files named by uuids) in the current directory, for debugging.
SHAPE_INFERENCE_LEFTOVER = "sym_shape_infer_temp.onnx"


@contextmanager
def _no_shape_inference_leftovers() -> Iterator[None]:
    """Remove the debugging copy ONNX Runtime leaves in the user's working directory (only one it wrote now)."""
    existed = os.path.exists(SHAPE_INFERENCE_LEFTOVER)
    try:
        yield
    finally:
        if not existed and os.path.exists(SHAPE_INFERENCE_LEFTOVER):
            try:
                leftover = onnx.load(SHAPE_INFERENCE_LEFTOVER, load_external_data=False)
                locations = {entry.value for tensor in onnx.external_data_helper._get_all_tensors(leftover)
                             for entry in tensor.external_data if entry.key == "location"}
            except Exception:  # noqa: BLE001 - an unreadable leftover is still ours to remove
                locations = set()
            for name in [SHAPE_INFERENCE_LEFTOVER, *locations]:
                if os.path.basename(name) == name:  # only plain names in this directory
                    with suppress(OSError):
                        os.remove(name)


def quantize_int8(model: onnx.ModelProto, calibration: Calibration, tmp: str, log: list[str]) -> tuple[onnx.ModelProto, bytes]:
    """Static QDQ quantization, per-channel weights; returns the model and the calibration cache.

    The cache holds the activation ranges; given one (from an earlier build of the same
    model), calibration inference is skipped and the ranges are reused exactly.
    """
    from onnxruntime import InferenceSession, quantization
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = os.path.join(tmp, "prepared.onnx")
    # ONNX Runtime logs a traceback of its own when its optimizer rejects the pre-processed model.
    quiet = logging.getLogger("onnxruntime.quantization.shape_inference")
    was_disabled, quiet.disabled = quiet.disabled, True
    try:
        with _no_shape_inference_leftovers():
            quant_pre_process(model, prepared)
        # Symbolic shape inference can record shapes ONNX Runtime then refuses to load (the Concat of a
        # converted TensorFlow NMS); calibration would fail on them, the model itself quantizes fine.
        InferenceSession(prepared, providers=["CPUExecutionProvider"])
    except Exception as exc:  # symbolic shape inference fails on some graphs; quantize without it
        log.append(f"quantization pre-processing skipped: {str(exc).splitlines()[0][:160]}")
        onnx.save(model, prepared)
    finally:
        quiet.disabled = was_disabled
    prepared_model = onnx.load(prepared)
    kept_float = float_tail(prepared_model)
    if kept_float:
        onnx.save(prepared_model, prepared)
        log.append(f"int8: {len(kept_float)} nodes after the last weighted layer stay in float")
    cache_path = os.path.join(tmp, CALIBRATION_CACHE)
    if calibration.cache is not None:
        Path(cache_path).write_bytes(calibration.cache)
        log.append("int8: calibration skipped, ranges reused from the calibration cache")
    elif not calibration.batches:
        raise ValidationDataError("int8 needs calibration data: give --calib DATA (or --calib-random for a smoke test)")
    else:
        samples = sum(next(iter(b.values())).shape[0] for b in calibration.batches)
        log.append(f"int8: calibrating with {calibration.method} on {samples} samples")
    methods = {
        "minmax": quantization.CalibrationMethod.MinMax,
        "entropy": quantization.CalibrationMethod.Entropy,
        "percentile": quantization.CalibrationMethod.Percentile,
    }
    # Without VNNI, u8 x s8 products can saturate the 16-bit accumulation; 7-bit weights avoid it.
    reduce_range = "avx512_vnni" not in cpu_flags() and "avx_vnni" not in cpu_flags() and "amx_int8" not in cpu_flags()
    quantized = os.path.join(tmp, "quantized.onnx")
    batches = calibration.batches
    if calibration.cache is None and calibration.method in ("entropy", "percentile"):
        batches = _equal_batches(batches)
    try:
        quantization.quantize_static(
            prepared,
            quantized,
            _BatchReader(batches) if calibration.cache is None else None,
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=_activation_type(quantization),
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=methods[calibration.method],
            calibration_cache_path=cache_path,
            nodes_to_exclude=kept_float,
        )
    except Exception as exc:
        raise BuildError(f"int8 quantization failed: {str(exc).splitlines()[0]}") from None
    log.append(f"int8: QDQ, per-channel weights, {'7-bit weights (no VNNI)' if reduce_range else '8-bit weights'}")
    return onnx.load(quantized), Path(cache_path).read_bytes()


class OnnxRuntimeSession(Session):
    def __init__(self, session: Any, output_names: list[str], profiles: Mapping[str, Any] | None = None,
                 folder: tempfile.TemporaryDirectory | None = None):
        self._session = session
        self._output_names = list(output_names)
        # TensorRT provider: the optimization profiles its engines were built for.
        self._profiles = dict(profiles or {})
        # TensorRT provider: engines, timing cache and calibration table; ONNX Runtime reads
        # (and after a shape outside the profile, rewrites) them while the session lives.
        self._folder = folder
        self._run = _cheapest_run(session)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._profiles:
            check_profiles(self._profiles, feeds)
        # InferenceSession.run is thread-safe, so no lock is needed here. ONNX Runtime takes a dict
        # and only reads it: the engine's checked feeds go in as they are.
        values = self._run(self._output_names, feeds if type(feeds) is dict else dict(feeds), None)
        return dict(zip(self._output_names, values))

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def close(self) -> None:
        self._session = None
        self._run = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def _cheapest_run(session: Any) -> Callable[[list[str], dict[str, np.ndarray], Any], list[np.ndarray]]:
    """``InferenceSession.run``, or on a CPU-only session the compiled ``run`` it wraps.

    The Python wrapper re-checks the feed's names (the engine's input checks did), looks for
    WebGPU graph capture and OrtValue ownership (neither is used here), and retries on a GPU
    provider's failure (no GPU provider here): about a microsecond per call, 5-10% of a model
    that runs in tens of microseconds. Sessions with other providers keep the wrapper, and so
    does an ONNX Runtime whose wrapper no longer holds the compiled session as ``_sess``.
    """
    compiled = getattr(session, "_sess", None)
    if list(session.get_providers()) == ["CPUExecutionProvider"] and callable(getattr(compiled, "run", None)):
        return compiled.run
    return session.run


def check_profiles(profiles: Mapping[str, Any], feeds: Mapping[str, np.ndarray]) -> None:
    """Refuse shapes outside the TensorRT profile: ONNX Runtime would rebuild the engine mid-call (minutes)."""
    from .tensorrt.options import check_in_profile

    for name, profile in profiles.items():
        if name in feeds:
            check_in_profile(name, tuple(feeds[name].shape), tuple(profile.min), tuple(profile.max))


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    display_name = "ONNX Runtime"
    auto_priority = 10

    def available(self) -> Availability:
        try:
            _ort()
        except MissingDependencyError as exc:
            return Availability(False, str(exc))
        return Availability(True)

    def version(self) -> str:
        return _ort().__version__

    def fingerprint(self, options: BuildOptions) -> dict[str, str]:
        providers = resolve_providers(options.backend_options.get("providers"))
        fingerprint = {
            **host_fingerprint(),
            "backend_version": self.version(),
            "providers": ",".join(providers),
        }
        if ort_gpu.GPU_PROVIDERS & set(providers):
            # Informative: the payload is portable ONNX; cached TensorRT engines are checked at load.
            gpu = ort_gpu.gpu_settings(options.backend_options, providers).gpu
            fingerprint.update(ort_gpu.gpu_fingerprint(providers, gpu))
        return fingerprint

    def must_match(self) -> list[str]:
        return ["os", "arch", "cpu_flags", "backend_version", "providers"]

    def precisions(self, options: BuildOptions) -> list[str]:
        providers = resolve_providers(options.backend_options.get("providers"))
        return ["fp32", "fp16", "int8"] if GPU_PROVIDERS & set(providers) else ["fp32", "int8"]

    def describe_platform(self, fingerprint: Mapping[str, str]) -> str:
        version = ".".join(fingerprint.get("backend_version", "?").split(".")[:2])
        first = fingerprint.get("providers", "CPUExecutionProvider").split(",")[0]
        text = f"{fingerprint.get('arch', '?')} / ONNX Runtime {version} {PROVIDER_LABELS.get(first, first)}"
        if fingerprint.get("gpu"):
            capability = fingerprint.get("compute_capability", "")
            text += f" on {fingerprint['gpu']}" + (f" (sm_{capability.replace('.', '')})" if capability else "")
        if first == TRT_EP and fingerprint.get("tensorrt"):
            text += f" / TensorRT {fingerprint['tensorrt']}"
        return text

    def build(
        self,
        model: onnx.ModelProto,
        signature: Signature,
        options: BuildOptions,
        progress: ProgressCallback | None = None,
        calibration: Calibration | None = None,
    ) -> BuildResult:
        ort = _ort()
        providers = resolve_providers(options.backend_options.get("providers"))
        settings = ort_gpu.gpu_settings(options.backend_options, providers)
        log = [f"ONNX Runtime {ort.__version__}, providers {', '.join(providers)}"]
        precision = options.precision
        if precision not in ("fp32", "fp16", "int8"):
            raise BuildError(f"the ONNX Runtime backend builds fp32, fp16 and int8 engines, not {precision}"
                             + ("; for bf16 use --backend openvino or --backend torch" if precision == "bf16" else ""))
        if precision == "fp16" and not GPU_PROVIDERS & set(providers) and not options.force_precision:
            log.append(
                "fp16 does not pay on the CPU provider (no fp16 kernels: ONNX Runtime would add casts around "
                "every node), so the engine stays fp32; pass --force-precision to build fp16 anyway"
            )
            precision = "fp32"
        if settings.trt is not None:
            return self._build_tensorrt(model, signature, options, precision, providers, settings, progress, calibration, log)
        resolved = replace(options, precision=precision,
                           backend_options=ort_gpu.resolved_backend_options(options.backend_options, providers, None))
        caches: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory(prefix="enginesmith-ort-") as tmp:
            if precision == "fp16":
                model = convert_fp16(model)
                log.append("fp16: weights and activations converted, inputs/outputs and sensitive ops kept fp32")
            elif precision == "int8":
                if calibration is None:
                    raise ValidationDataError("int8 needs calibration data: give --calib DATA")
                if progress:
                    progress("calibrating int8", 0, 1)
                model, caches[CALIBRATION_CACHE] = quantize_int8(model, calibration, tmp, log)
                if progress:
                    progress("calibrating int8", 1, 1)
            optimized_path = os.path.join(tmp, "optimized.onnx")
            so = _session_options(resolved, optimize=True)
            if any(p in COMPILING_PROVIDERS for p in providers):
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                log.append("compiling provider: payload keeps provider-independent optimizations only")
            so.optimized_model_filepath = optimized_path
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, "profile")
            if progress:
                progress("optimizing graph", 0, 1)
            try:
                session = ort.InferenceSession(
                    model.SerializeToString(), so, providers=ort_gpu.provider_list(providers, None, settings, "")
                )
            except Exception as exc:  # ORT raises its own pybind exception types
                raise _explain_ort_error(exc, model) from None
            _require_providers(providers, session, ort.__version__)
            try:
                placement = _node_placement(session, signature, _first_sample(options.sample_feeds))
            except Exception as exc:  # placement is informative only; never fail a build on it
                placement = {}
                log.append(f"node placement not recorded: {str(exc).splitlines()[0][:200]}")
            payload = Path(optimized_path).read_bytes()
            if progress:
                progress("optimizing graph", 1, 1)
        optimized = onnx.load_from_string(payload)
        log.append(f"graph optimized offline: {len(model.graph.node)} nodes -> {len(optimized.graph.node)}")
        return BuildResult(
            payload=payload,
            payload_name=PAYLOAD_NAME,
            resolved_options=resolved,
            log=log,
            details={"node_placement": placement, "nodes_before": len(model.graph.node), "nodes_after": len(optimized.graph.node)},
            caches=caches,
        )

    def _build_tensorrt(
        self,
        model: onnx.ModelProto,
        signature: Signature,
        options: BuildOptions,
        precision: str,
        providers: list[str],
        settings: OrtGpuSettings,
        progress: ProgressCallback | None,
        calibration: Calibration | None,
        log: list[str],
    ) -> BuildResult:
        """The TensorRT provider: a portable payload, then one session that builds (and caches) the engines.

        Never run (see :mod:`.ort_gpu`). The payload keeps ONNX Runtime's basic, provider-independent
        optimizations, made on the CPU provider because a session holding TensorRT-compiled nodes
        cannot be saved. The engines are then built by a session created exactly as :meth:`load`
        creates it (same file name, same options), so ONNX Runtime finds them in the cache at load.
        """
        ort = _ort()
        device = ort_gpu.gpu_facts(settings.gpu)
        trt_version = ort_gpu.tensorrt_version()
        caches: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory(prefix="enginesmith-ort-trt-") as tmp_text:
            tmp = Path(tmp_text)
            folder, model_dir = tmp / "cache", tmp / "model"
            folder.mkdir()
            model_dir.mkdir()
            model_path = model_dir / PAYLOAD_NAME
            _optimize_basic(model, model_path, options)
            table = False
            if precision == "int8":
                table = _calibration_table(model, model_path, calibration, tmp, folder, caches, progress, log)
            plan = ort_gpu.resolve_plan(settings, precision, signature, device, table)
            provider_options = ort_gpu.trt_provider_options(plan, str(folder))
            meta = ort_gpu.cache_meta(device, trt_version, ort.__version__, provider_options)
            _seed_caches(folder, options.previous_caches, meta, settings, table, log)
            if precision in ("fp16", "int8"):
                log.append(f"{precision}: TensorRT picks {precision} kernels per layer (trt_{precision}_enable); "
                           "subgraphs on CUDA/CPU stay fp32")
            if progress:
                progress("building TensorRT engines (ONNX Runtime)", 0, 1)
            placement = _build_engines(model_path, signature, options, providers, plan, settings, folder, tmp)
            if progress:
                progress("building TensorRT engines (ONNX Runtime)", 1, 1)
            timing = ort_gpu.shared_timing_folder(settings.trt.timing_cache if settings.trt else "off")
            if timing is not None and ort_gpu.copy_timing_caches(folder, timing):
                log.append(f"timing cache kept in {timing}")
            built = ort_gpu.collect_caches(folder, meta)
            payload = model_path.read_bytes()
        caches.update(built)
        engines = sorted(name for name in built if name.endswith(".engine"))
        log.append(f"TensorRT provider: {len(engines)} engine(s) cached in the bundle" if engines
                   else "TensorRT provider: no engine cached (engine_cache off, or no subgraph went to TensorRT)")
        resolved = replace(options, precision=precision,
                           backend_options=ort_gpu.resolved_backend_options(options.backend_options, providers, plan))
        details = {
            "node_placement": placement,
            "tensorrt_provider_options": ort_gpu.settings_key(provider_options),
            "profiles": {name: p.to_dict() for name, p in plan.profiles.items()},
            "cache_entries": sorted(built),
        }
        return BuildResult(payload, PAYLOAD_NAME, resolved, log, details, caches)

    def needs_caches_at_load(self, options: BuildOptions) -> bool:
        try:
            return TRT_EP in resolve_providers(options.backend_options.get("providers"))
        except BackendUnavailableError:
            return False

    def load(self, payload: bytes | Path, options: BuildOptions, signature: Signature) -> Session:
        return self.load_with_caches(payload, options, signature, {})

    def load_with_caches(
        self, payload: bytes | Path, options: BuildOptions, signature: Signature, caches: Mapping[str, bytes]
    ) -> Session:
        ort = _ort()
        providers = resolve_providers(options.backend_options.get("providers"))
        if TRT_EP in providers:
            return _load_tensorrt(payload, options, signature, providers, caches)
        settings = ort_gpu.gpu_settings(options.backend_options, providers)
        compiling = any(p in COMPILING_PROVIDERS for p in providers)
        so = _session_options(options, optimize=compiling)
        try:
            # A path lets ONNX Runtime read the file itself instead of copying Python bytes.
            source = payload if isinstance(payload, bytes) else str(payload)
            session = ort.InferenceSession(source, so, providers=ort_gpu.provider_list(providers, None, settings, ""))
        except Exception as exc:
            raise BuildError(f"ONNX Runtime could not load the engine payload: {str(exc).splitlines()[0]}") from None
        _require_providers(providers, session, ort.__version__)
        return OnnxRuntimeSession(session, signature.output_names)


def _require_providers(requested: list[str], session: Any, version: str) -> None:
    """ONNX Runtime only warns when a GPU provider fails to start (missing CUDA/TensorRT libraries): refuse instead."""
    missing = ort_gpu.missing_providers(requested, list(session.get_providers()))
    if missing:
        raise ort_gpu.explain_missing(missing, version)


def _optimize_basic(model: onnx.ModelProto, target: Path, options: BuildOptions) -> None:
    """Basic (provider-independent) graph optimizations on the CPU provider, saved to ``target``."""
    ort = _ort()
    so = _session_options(options, optimize=True)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(target)
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind exception types
        raise _explain_ort_error(exc, model) from None


def _calibration_table(
    model: onnx.ModelProto,
    model_path: Path,
    calibration: Calibration | None,
    tmp: Path,
    folder: Path,
    caches: dict[str, bytes],
    progress: ProgressCallback | None,
    log: list[str],
) -> bool:
    """Write the int8 calibration table into the cache folder; False when the model's Q/DQ nodes set the scales."""
    from .tensorrt.options import model_precisions

    if model_precisions(model).has_qdq:
        # TensorRT refuses a calibration table for a model with Q/DQ nodes (ONNX Runtime's TensorRT docs).
        log.append("int8: the model's Q/DQ nodes set the scales (explicit quantization), no calibration table")
        return False
    if calibration is None:
        raise ValidationDataError("int8 needs calibration data: give --calib DATA")
    if progress:
        progress("calibrating int8", 0, 1)
    ranges = ort_gpu.calibrate_ranges(model_path, calibration, tmp, log)
    (folder / ort_gpu.CALIBRATION_TABLE).write_bytes(ort_gpu.calibration_table(ranges, tmp))
    caches[CALIBRATION_CACHE] = ranges
    if progress:
        progress("calibrating int8", 1, 1)
    return True


def _seed_caches(folder: Path, previous: Mapping[str, bytes], meta: Mapping[str, Any], settings: OrtGpuSettings,
                 table: bool, log: list[str]) -> None:
    """Put the rebuilt bundle's engines and the shared timing cache where ONNX Runtime looks first."""
    timing = ort_gpu.shared_timing_folder(settings.trt.timing_cache if settings.trt else "off")
    if timing is not None and ort_gpu.copy_timing_caches(timing, folder):
        log.append(f"timing cache reused from {timing}")
    if not any(name.startswith(ort_gpu.CACHE_PREFIX) for name in previous):
        return
    stale = ort_gpu.stale_reason(previous, meta)
    fresh_table = (folder / ort_gpu.CALIBRATION_TABLE).read_bytes() if table else None
    restored = ort_gpu.restore_caches(previous, folder, keep_device_bound=stale is None)
    if fresh_table is not None:
        (folder / ort_gpu.CALIBRATION_TABLE).write_bytes(fresh_table)  # this build's ranges win
    if stale:
        log.append(f"TensorRT engines of the rebuilt bundle not reused: {stale}")
    elif restored:
        log.append(f"TensorRT provider caches reused from the rebuilt bundle: {', '.join(restored)}")


def _trt_session(model_path: Path, options: BuildOptions, providers: list[str], plan: TrtEpPlan,
                 settings: OrtGpuSettings, folder: Path, profile_prefix: str | None = None) -> Any:
    """A session on the TensorRT provider, created identically at build and at load (engine cache keys match)."""
    ort = _ort()
    so = _session_options(options, optimize=True)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    listed = ort_gpu.provider_list(providers, plan, settings, str(folder))
    try:
        session = ort.InferenceSession(str(model_path), so, providers=listed)
    except Exception as exc:  # ORT raises its own pybind exception types
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BuildError(f"ONNX Runtime's TensorRT provider could not build the engine: {text}") from None
    _require_providers(providers, session, ort.__version__)
    return session


def _build_engines(model_path: Path, signature: Signature, options: BuildOptions, providers: list[str], plan: TrtEpPlan,
                   settings: OrtGpuSettings, folder: Path, tmp: Path) -> dict[str, dict[str, int]]:
    """Create the session and run it once at the profiles' opt shapes, which makes ONNX Runtime build every engine."""
    session = _trt_session(model_path, options, providers, plan, settings, folder, str(tmp / "profile"))
    try:
        return _node_placement(session, signature, ort_gpu.warmup_feeds(signature, plan.profiles))
    except Exception as exc:  # noqa: BLE001 - the first run is where TensorRT builds: its failure fails the build
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BuildError(f"ONNX Runtime's TensorRT provider failed on its first run: {text}") from None


def _load_tensorrt(payload: bytes | Path, options: BuildOptions, signature: Signature, providers: list[str],
                   caches: Mapping[str, bytes]) -> OnnxRuntimeSession:
    """Restore the bundle's TensorRT caches into a folder the session owns, then open the payload next to them."""
    ort = _ort()
    table = (ort_gpu.CACHE_PREFIX + ort_gpu.CALIBRATION_TABLE) in caches
    plan = ort_gpu.plan_from_manifest(options.backend_options, providers, options.precision, table)
    assert plan is not None  # providers hold the TensorRT provider
    owned = tempfile.TemporaryDirectory(prefix="enginesmith-ort-trt-")
    root = Path(owned.name)
    folder, model_dir = root / "cache", root / "model"
    folder.mkdir()
    model_dir.mkdir()
    try:
        here = ort_gpu.cache_meta(ort_gpu.gpu_facts(plan.settings.gpu), ort_gpu.tensorrt_version(), ort.__version__,
                                  ort_gpu.trt_provider_options(plan, str(folder)))
        stale = ort_gpu.stale_reason(caches, here)
        if stale:
            _log.warning("the engine's cached TensorRT engines do not fit here (%s): ONNX Runtime builds them again "
                         "(minutes); rebuild the bundle here with 'enginesmith build' to keep them", stale)
        ort_gpu.restore_caches(caches, folder, keep_device_bound=stale is None)
        # The same file name as at build: ONNX Runtime's engine cache key includes it.
        model_path = model_dir / PAYLOAD_NAME
        model_path.write_bytes(payload if isinstance(payload, bytes) else Path(payload).read_bytes())
        session = _trt_session(model_path, options, providers, plan, plan.settings, folder)
    except BaseException:
        owned.cleanup()
        raise
    return OnnxRuntimeSession(session, signature.output_names, plan.profiles, owned)


def plain_session_runner(model_bytes: bytes, quiet: bool = False):
    """Run a model the way a user would by hand: a default ONNX Runtime CPU session.

    Used as the reference for ONNX sources and as the baseline in benchmarks. ``quiet`` keeps
    ONNX Runtime from logging run failures to stderr (the caller reports them itself).
    """
    ort = _ort()
    so = ort.SessionOptions()
    # Used for checks (graph passes, references, input probes): their failures become exceptions, so ONNX
    # Runtime's own error log would only repeat them on the terminal; --verbose (severity 2) lets it through,
    # except for probes (quiet), whose failures are expected.
    so.log_severity_level = 4 if quiet or _LOG_SEVERITY in (None, 3) else _LOG_SEVERITY
    try:
        session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BuildError(f"ONNX Runtime cannot run the reference model: {str(exc).splitlines()[0]}") from None
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, dict(feeds))))

    # Read by validate to check that an engine and a reference take the same inputs before running.
    run.input_names = [i.name for i in session.get_inputs()]  # type: ignore[attr-defined]
    return run


# --------------------------------------------------------------------------- per-node operator support
# Appended as a module-level function bound to the class so the code above stays untouched.

# ONNX Runtime's session option key that makes session creation fail instead of
# silently placing nodes on the CPU provider (kOrtSessionOptionsDisableCPUEPFallback).
_DISABLE_CPU_FALLBACK = "session.disable_cpu_ep_fallback"


def _probe_session(model_bytes: bytes, providers: list[str], no_fallback: bool = False) -> str | None:
    """None when ONNX Runtime creates a session for the model on ``providers``, else its error (one line)."""
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    if no_fallback:
        so.add_session_config_entry(_DISABLE_CPU_FALLBACK, "1")
    try:
        ort.InferenceSession(model_bytes, so, providers=providers)
    except Exception as exc:  # ORT raises its own pybind exception types
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)[:400]
    return None


def _single_node_model(model: onnx.ModelProto, node: onnx.NodeProto, elem: dict[str, int],
                       initializers: dict[str, onnx.TensorProto]) -> tuple[onnx.ModelProto, list[str]]:
    """A model holding only ``node``: its inputs become graph inputs (weights stay initializers)."""
    from onnx import helper

    notes: list[str] = []
    needed: list[str] = []
    for name in list(node.input) + sorted(_outer_names(node)):
        if name and name not in needed:
            needed.append(name)
    inputs, inits = [], []
    for name in needed:
        if name in initializers:
            inits.append(initializers[name])
            continue
        if not elem.get(name):
            notes.append(f"type of '{name}' unknown, probed as float")
        inputs.append(helper.make_tensor_value_info(name, elem.get(name) or onnx.TensorProto.FLOAT, None))
    outputs = []
    for name in node.output:
        if name:
            value = onnx.ValueInfoProto()
            value.name = name
            if elem.get(name):
                value.type.tensor_type.elem_type = elem[name]
            outputs.append(value)
    graph = helper.make_graph([node], "probe", inputs, outputs, inits)
    probe = helper.make_model(graph, opset_imports=list(model.opset_import))
    probe.ir_version = model.ir_version
    probe.functions.extend(model.functions)
    return probe, notes


def _outer_names(node: onnx.NodeProto) -> set[str]:
    found: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            local = {v.name for v in sub.input} | {t.name for t in sub.initializer}
            for inner in sub.node:
                found |= {n for n in list(inner.input) + sorted(_outer_names(inner)) if n and n not in local}
                local |= set(inner.output)
    return found


def _op_support(self: OnnxRuntimeBackend, model: onnx.ModelProto, options: BuildOptions) -> dict[str, tuple[str, str]]:
    """Real kernel availability: ONNX Runtime is asked to create a session for each distinct node.

    The whole model is tried first; when it loads on the CPU provider every node has a kernel.
    Otherwise (or for other providers) each distinct (op, domain, opset, input types, attributes)
    gets a one-node model. With a non-CPU provider first, a node that only the CPU provider can run
    is ``conditional`` (it runs, on the CPU fallback).
    """
    from .base import node_names

    providers = resolve_providers((options.backend_options if options else {}).get("providers"))
    primary = providers[0]
    label = PROVIDER_LABELS.get(primary, primary)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is best effort; unknown types are probed as float
        inferred = model
    graph = inferred.graph
    names = node_names(model)
    results: dict[str, tuple[str, str]] = {}
    whole_error = _probe_session(model.SerializeToString(), ["CPUExecutionProvider"])
    if whole_error is None and primary == "CPUExecutionProvider":
        return {name: ("supported", "ONNX Runtime CPU kernel") for name in names}
    elem: dict[str, int] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            elem.setdefault(value.name, value.type.tensor_type.elem_type)
    initializers = {t.name: t for t in graph.initializer}
    for init in graph.initializer:
        elem[init.name] = init.data_type
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    cache: dict[bytes, tuple[str, str]] = {}
    for name, node in zip(names, graph.node):
        key_parts = [node.domain, node.op_type, str(opsets.get(node.domain or "ai.onnx")),
                     ",".join(str(elem.get(i, 0)) if i else "-" for i in node.input)]
        key = "|".join(key_parts).encode() + b"".join(a.SerializeToString() for a in node.attribute)
        if key not in cache:
            probe, notes = _single_node_model(model, node, elem, initializers)
            raw = probe.SerializeToString()
            cpu_error = _probe_session(raw, ["CPUExecutionProvider"])
            note = f" ({'; '.join(notes)})" if notes else ""
            if primary == "CPUExecutionProvider":
                cache[key] = (("unsupported", f"ONNX Runtime: {cpu_error}") if cpu_error
                              else ("supported", "ONNX Runtime CPU kernel" + note))
            else:
                primary_error = _probe_session(raw, [primary], no_fallback=True)
                if primary_error is None:
                    cache[key] = ("supported", f"ONNX Runtime {label} kernel{note}")
                elif cpu_error is None:
                    cache[key] = ("conditional", f"no {label} kernel: runs on the CPU provider (fallback){note}")
                else:
                    cache[key] = ("unsupported", f"ONNX Runtime: {cpu_error}")
        results[name] = cache[key]
    if whole_error is not None and all(status != "unsupported" for status, _ in results.values()):
        results[""] = ("unsupported", f"ONNX Runtime: {whole_error}")
    return results


OnnxRuntimeBackend.op_support = _op_support  # type: ignore[method-assign]
