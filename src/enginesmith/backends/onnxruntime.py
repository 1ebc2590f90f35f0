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
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx

from ..errors import BackendUnavailableError, BuildError, MissingDependencyError, UnsupportedModelError, ValidationDataError
from ..host import host_fingerprint, physical_cores
from ..signature import Signature, random_inputs
from ..graph.precision import convert_fp16  # noqa: F401 - re-exported: callers import it from here
from .base import Availability, Backend, BuildOptions, BuildResult, Calibration, ProgressCallback, Session
from . import ort_gpu
from .onnxruntime_int8 import CALIBRATION_CACHE, quantize_int8
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

    def op_support(self, model: onnx.ModelProto, options: BuildOptions) -> dict[str, tuple[str, str]]:
        from .onnxruntime_support import op_support  # it imports this module: loaded on first use

        return op_support(model, options)

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
        raise BuildError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from None
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, dict(feeds))))

    # Read by validate to check that an engine and a reference take the same inputs before running.
    run.input_names = [i.name for i in session.get_inputs()]  # type: ignore[attr-defined]
    return run
