"""ONNX Runtime backend: the engine that works everywhere.

Build applies every graph optimization ONNX Runtime has for the chosen
execution providers *offline* and stores the optimized model as the payload,
so loading does no re-optimization. Those optimizations are hardware-specific
(the CPU provider rewrites convolutions into blocked NCHWc layouts sized for
the machine's vector width), which is why the engine's fingerprint records the
CPU's ISA features and the ONNX Runtime version.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from ..errors import BackendUnavailableError, BuildError, MissingDependencyError, UnsupportedModelError, ValidationDataError
from ..host import cpu_flags, host_fingerprint, physical_cores
from ..signature import Signature, random_inputs
from .base import Availability, Backend, BuildOptions, BuildResult, Calibration, ProgressCallback, Session

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


def _ort():
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - onnxruntime is a core dependency
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime") from None
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


def _node_placement(session, signature: Signature) -> dict[str, dict[str, int]]:
    """op type -> {provider: count of nodes that ran on it}, read from one profiled run."""
    session.run(None, random_inputs(signature.inputs, batch=1))
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
# Ops whose fp16 results drift (exponentials, reductions, normalizations) stay fp32.
FP16_KEEP_FP32 = ["Softmax", "LogSoftmax", "LayerNormalization", "Exp", "Log", "Pow", "Sqrt", "Reciprocal",
                  "ReduceMean", "ReduceSum", "ReduceProd", "ReduceLogSumExp", "TopK", "NonMaxSuppression", "Range"]
CALIBRATION_CACHE = "calibration_cache.json"


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations, fp32 inputs/outputs and numerically sensitive ops."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    return convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + FP16_KEEP_FP32
    )


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


def quantize_int8(model: onnx.ModelProto, calibration: Calibration, tmp: str, log: list[str]) -> tuple[onnx.ModelProto, bytes]:
    """Static QDQ quantization, per-channel weights; returns the model and the calibration cache.

    The cache holds the activation ranges; given one (from an earlier build of the same
    model), calibration inference is skipped and the ranges are reused exactly.
    """
    from onnxruntime import quantization
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = os.path.join(tmp, "prepared.onnx")
    try:
        quant_pre_process(model, prepared)
    except Exception as exc:  # symbolic shape inference fails on some graphs; quantize without it
        log.append(f"quantization pre-processing skipped: {str(exc).splitlines()[0][:160]}")
        onnx.save(model, prepared)
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
    try:
        quantization.quantize_static(
            prepared,
            quantized,
            _BatchReader(calibration.batches) if calibration.cache is None else None,
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=_activation_type(quantization),
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=methods[calibration.method],
            calibration_cache_path=cache_path,
        )
    except Exception as exc:
        raise BuildError(f"int8 quantization failed: {str(exc).splitlines()[0]}") from None
    log.append(f"int8: QDQ, per-channel weights, {'7-bit weights (no VNNI)' if reduce_range else '8-bit weights'}")
    return onnx.load(quantized), Path(cache_path).read_bytes()


class OnnxRuntimeSession(Session):
    def __init__(self, session: Any, output_names: list[str]):
        self._session = session
        self._output_names = output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # InferenceSession.run is thread-safe, so no lock is needed here.
        values = self._session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, values))

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())


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
        return {
            **host_fingerprint(),
            "backend_version": self.version(),
            "providers": ",".join(providers),
        }

    def must_match(self) -> list[str]:
        return ["os", "arch", "cpu_flags", "backend_version", "providers"]

    def precisions(self, options: BuildOptions) -> list[str]:
        providers = resolve_providers(options.backend_options.get("providers"))
        return ["fp32", "fp16", "int8"] if GPU_PROVIDERS & set(providers) else ["fp32", "int8"]

    def describe_platform(self, fingerprint: Mapping[str, str]) -> str:
        version = ".".join(fingerprint.get("backend_version", "?").split(".")[:2])
        first = fingerprint.get("providers", "CPUExecutionProvider").split(",")[0]
        return f"{fingerprint.get('arch', '?')} / ONNX Runtime {version} {PROVIDER_LABELS.get(first, first)}"

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
        log = [f"ONNX Runtime {ort.__version__}, providers {', '.join(providers)}"]
        precision = options.precision
        if precision == "fp16" and not GPU_PROVIDERS & set(providers) and not options.force_precision:
            log.append(
                "fp16 does not pay on the CPU provider (no fp16 kernels: ONNX Runtime would add casts around "
                "every node), so the engine stays fp32; pass --force-precision to build fp16 anyway"
            )
            precision = "fp32"
        resolved = BuildOptions(
            precision=precision,
            threads=options.threads,
            force_precision=options.force_precision,
            backend_options={**options.backend_options, "providers": providers},
        )
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
                session = ort.InferenceSession(model.SerializeToString(), so, providers=providers)
            except Exception as exc:  # ORT raises its own pybind exception types
                raise _explain_ort_error(exc, model) from None
            try:
                placement = _node_placement(session, signature)
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
            payload_name="model.optimized.onnx",
            resolved_options=resolved,
            log=log,
            details={"node_placement": placement, "nodes_before": len(model.graph.node), "nodes_after": len(optimized.graph.node)},
            caches=caches,
        )

    def load(self, payload: bytes | Path, options: BuildOptions, signature: Signature) -> Session:
        ort = _ort()
        providers = resolve_providers(options.backend_options.get("providers"))
        compiling = any(p in COMPILING_PROVIDERS for p in providers)
        so = _session_options(options, optimize=compiling)
        try:
            # A path lets ONNX Runtime read the file itself instead of copying Python bytes.
            source = payload if isinstance(payload, bytes) else str(payload)
            session = ort.InferenceSession(source, so, providers=providers)
        except Exception as exc:
            raise BuildError(f"ONNX Runtime could not load the engine payload: {str(exc).splitlines()[0]}") from None
        return OnnxRuntimeSession(session, signature.output_names)


def plain_session_runner(model_bytes: bytes):
    """Run a model the way a user would by hand: a default ONNX Runtime CPU session.

    Used as the reference for ONNX sources and as the baseline in benchmarks.
    """
    ort = _ort()
    try:
        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BuildError(f"ONNX Runtime cannot run the reference model: {str(exc).splitlines()[0]}") from None
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, dict(feeds))))

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
