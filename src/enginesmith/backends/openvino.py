"""OpenVINO backend: ONNX compiled by Intel's OpenVINO for the CPU.

Build reads the ONNX model with OpenVINO's ONNX frontend (dynamic dimensions stay
dynamic), optionally quantizes it to int8 with NNCF's post-training quantization, compiles
it for the CPU plugin and stores the *compiled model* (``CompiledModel.export_model``) as the
payload: importing it skips the frontend and the plugin's graph transformations, which made
loading 2-5x faster than reading an IR (xml+bin) and compiling it (measured on a 2-core
AMD EPYC: MobileNetV2-like 27 ms vs 134 ms, ResNet-50-like 99 ms vs 252 ms, same size).

The compiled model is tied to the OpenVINO version and to the CPU's instruction sets (the
plugin picks its kernels and weight layouts from them), so both are in the fingerprint and
must match. It does not carry the compile properties: :meth:`load` passes the recorded ones
again (without them an fp32 engine would come back as bf16 on a CPU that has bf16).

Precisions: ``fp32`` (``INFERENCE_PRECISION_HINT=f32``), ``bf16`` where the CPU has native
bf16 (AVX512-BF16 or AMX-BF16; OpenVINO's default on such CPUs), ``fp16`` where the plugin
has fp16 kernels (AVX512-FP16/AMX-FP16 x86 CPUs, Arm), ``int8`` through ``nncf.quantize``.
int8 (NNCF, and the quantized model kept for rebuilds) lives in :mod:`.openvino_int8`. Only these
two modules import ``openvino`` and ``nncf``, and only inside functions.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from ..errors import BuildError, InputError, MissingDependencyError, UnsupportedModelError
from ..host import cpu_flags, host_fingerprint
from ..signature import Signature
from .base import Availability, Backend, BuildOptions, BuildResult, Calibration, ProgressCallback, Session, node_names

PAYLOAD_NAME = "model.openvino.blob"
DEVICE = "CPU"
INSTALL_HINT = "pip install 'enginesmith[openvino]'"

# enginesmith precision -> OpenVINO's INFERENCE_PRECISION_HINT. int8 engines keep the layers NNCF
# left unquantized in fp32 (the hint would otherwise run them in bf16 on a bf16 CPU).
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
# Host ISA flags (see host.RELEVANT_CPU_FLAGS) under which the CPU plugin has native kernels.
NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16", "bf16"), "fp16": ("avx512_fp16", "fphp", "asimdhp")}
PERFORMANCE_HINTS = ("latency", "throughput")
# OpenVINO types of frontend nodes that stand for ONNX nodes it could not convert.
UNCONVERTED_NODE_TYPES = ("ONNXFrameworkNode", "NotSupportedONNXNode", "FrameworkNode")
# The bundle's cache entry holding the model NNCF quantized (see openvino_int8.pack_int8_model).
INT8_MODEL_CACHE = "openvino_int8_model.npz"


def _ov():
    try:
        import openvino
    except ImportError:
        raise MissingDependencyError(f"OpenVINO is not installed: {INSTALL_HINT}") from None
    return openvino


_core: Any = None


def core() -> Any:
    """One ``openvino.Core`` per process: creating it loads the plugins."""
    global _core
    if _core is None:
        _core = _ov().Core()
    return _core


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class OpenVinoSettings:
    """The backend options users set (``--option performance_hint=throughput``)."""

    performance_hint: str = "latency"
    num_streams: int | str | None = None  # None: what the hint picks; "auto" or a count
    int8_preset: str = "performance"  # NNCF: performance (symmetric) or mixed (asymmetric activations)
    subset_size: int = 300  # NNCF: calibration samples used

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> "OpenVinoSettings":
        known = {"performance_hint", "num_streams", "int8_preset", "subset_size"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise BuildError(f"unknown OpenVINO option(s) {', '.join(unknown)}: the OpenVINO backend takes "
                             f"{', '.join(sorted(known))}")
        hint = str(raw.get("performance_hint", "latency")).lower()
        if hint not in PERFORMANCE_HINTS:
            raise BuildError(f"unknown performance_hint '{hint}': use latency or throughput")
        streams = raw.get("num_streams")
        if streams is not None and str(streams).lower() != "auto":
            try:
                streams = int(streams)
            except (TypeError, ValueError):
                raise BuildError(f"num_streams must be a positive number or 'auto', not '{streams}'") from None
            if streams < 1:
                raise BuildError(f"num_streams must be a positive number or 'auto', not {streams}")
        elif streams is not None:
            streams = "auto"
        preset = str(raw.get("int8_preset", "performance")).lower()
        if preset not in ("performance", "mixed"):
            raise BuildError(f"unknown int8_preset '{preset}': use performance or mixed")
        try:
            subset = int(raw.get("subset_size", 300))
        except (TypeError, ValueError):
            raise BuildError(f"subset_size must be a number of samples, not '{raw.get('subset_size')}'") from None
        return cls(hint, streams, preset, max(1, subset))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"performance_hint": self.performance_hint, "int8_preset": self.int8_preset,
                                "subset_size": self.subset_size}
        if self.num_streams is not None:
            data["num_streams"] = self.num_streams
        return data


def compile_config(precision: str, settings: OpenVinoSettings, threads: int | None) -> dict[str, str]:
    """The CPU plugin properties an engine is compiled (and its blob imported) with."""
    config = {
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision],
        "PERFORMANCE_HINT": settings.performance_hint.upper(),
    }
    if settings.num_streams is not None:
        config["NUM_STREAMS"] = str(settings.num_streams).upper()
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(int(threads))
    return config


def native_precisions() -> list[str]:
    """Reduced float precisions this CPU runs natively: its ISA flags and OpenVINO both say so."""
    flags = set(cpu_flags())
    capabilities = {c.upper() for c in core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")}
    found = []
    for precision, needed in NATIVE_FLAGS.items():
        if precision.upper() in capabilities and flags & set(needed):
            found.append(precision)
    return found


def _resolve_precision(options: BuildOptions, log: list[str]) -> str:
    precision = options.precision
    if precision not in INFERENCE_PRECISION:
        raise BuildError(f"unknown precision '{precision}' for the OpenVINO backend: use fp32, bf16, fp16 or int8")
    if precision not in ("bf16", "fp16") or precision in native_precisions():
        return precision
    flags = " ".join(NATIVE_FLAGS[precision][:2]).upper()
    alternative = "bf16" if "bf16" in native_precisions() else "int8"
    if precision == "fp16" and not options.force_precision:
        log.append(f"fp16: this CPU has no fp16 kernels for OpenVINO (needs {flags}), so the engine stays fp32; "
                   f"its reduced precision here is {alternative} (--precision {alternative})")
        return "fp32"
    raise BuildError(
        f"{precision} needs a CPU with {flags.replace(' ', ' or ')}, which this one "
        f"({host_fingerprint()['cpu']}) does not have: build fp32 or --precision {alternative} instead"
    )


# --------------------------------------------------------------------------- reading ONNX


# Ops with subgraphs and how many: asking for a subgraph index past the last one crashes the process.
SUBGRAPH_COUNTS = {"If": 2, "Loop": 1, "TensorIterator": 1}


def _bodies(op: Any) -> list[Any]:
    """The subgraphs of an If/Loop/TensorIterator op (none for other ops)."""
    return [op.get_function(index) for index in range(SUBGRAPH_COUNTS.get(op.get_type_name(), 0))]


def _unconverted_ops(ov_model: Any) -> list[Any]:
    return [op for op in ov_model.get_ordered_ops() if op.get_type_name() in UNCONVERTED_NODE_TYPES]


def _onnx_type(op: Any) -> str:
    attrs = op.get_attributes() if hasattr(op, "get_attributes") else {}
    domain = attrs.get("ONNX_META_domain", "")
    return f"{domain + '.' if domain else ''}{attrs.get('ONNX_META_type', op.get_type_name())}"


def frontend_reasons(text: str) -> dict[str, str]:
    """ONNX op type -> why the frontend could not convert it, from its "detailed log" error text."""
    reasons: dict[str, str] = {}
    op, lines = None, []
    for line in text.splitlines() + ["-- end"]:
        line = line.strip()
        if line.startswith("-- "):
            if op and lines:
                reasons.setdefault(op, lines[-1])
            head = line[3:].split(" with a message:")[0]
            op, lines = head.rsplit("-", 1)[0] if "-" in head else head, []
        elif op and line and not line.startswith(("Check ", "While validating", "FrontEnd API failed", "Summary")):
            lines.append(line.rstrip(":"))
        elif line.startswith("Summary"):
            if op and lines:
                reasons.setdefault(op, lines[-1])
            op, lines = None, []
    return reasons


def unconverted_nodes(ov_model: Any, model: onnx.ModelProto, reasons: Mapping[str, str]) -> list[tuple[str, str]]:
    """(node label, what failed) for the top-level ONNX nodes the frontend left unconverted.

    A node whose own subgraph holds the unconverted ops (an If, a Loop) is named with them.
    """
    by_output = {}
    for label, node in zip(node_names(model), model.graph.node):
        for name in node.output:
            by_output[name] = (label, f"{node.domain + '.' if node.domain else ''}{node.op_type}")

    def explain(op_types: list[str]) -> str:
        return "; ".join(f"{t}: {reasons.get(t.split('.')[-1], 'no conversion rule for this op')}" for t in op_types)

    found: dict[str, str] = {}
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in UNCONVERTED_NODE_TYPES:
            inner = [_onnx_type(op)]
        else:
            inner = sorted({_onnx_type(x) for body in _bodies(op) for x in _unconverted_ops(body)})
            if not inner:
                continue
        names = [n for out in op.outputs() for n in out.get_names()]
        label, op_type = next((by_output[n] for n in names if n in by_output), (op.get_friendly_name(), _onnx_type(op)))
        found.setdefault(label, explain(inner) if inner == [op_type] else
                         f"{op_type} with {', '.join(inner)} in its subgraph: {explain(inner)}")
    return list(found.items())


def _partial_model(path: Path) -> tuple[Any, ...]:
    """The model as far as the frontend converts it: unconvertible nodes stay framework nodes.

    Returns (model, frontend, input model): the framework nodes point into the frontend's copy of
    the ONNX graph, so reading their attributes after the other two are freed crashes the process.
    """
    from openvino.frontend import FrontEndManager

    frontend = FrontEndManager().load_by_framework("onnx")
    source = frontend.load(str(path))
    return frontend.convert_partially(source), frontend, source


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith("Exception from")
             and "failed at src/" not in line]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _last_line(exc: BaseException) -> str:
    """The innermost reason of a nested OpenVINO error ("Exception from ... / Check ... failed ...")."""
    noise = ("Exception from", "Check '", "While validating", "[CPU]")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.strip().startswith(noise)]
    return (lines[-1] if lines else _first_line(exc))[:300]


def _save_for_openvino(model: onnx.ModelProto, path: Path) -> None:
    # A file (not bytes) lets OpenVINO read models over protobuf's 2 GB limit, with external data.
    if model.ByteSize() < 2**31 - 2**20:
        onnx.save(model, path)
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving as external data moves the weights out of the proto it is given
    onnx.save(copy, path, save_as_external_data=True, location=path.name + ".data")


def _conversion_failures(path: Path, model: onnx.ModelProto, exc: BaseException) -> list[tuple[str, str]]:
    try:
        partial, frontend, source = _partial_model(path)
        failures = unconverted_nodes(partial, model, frontend_reasons(str(exc)))
        del partial, frontend, source  # in this order: the model's nodes point into the other two
        return failures
    except Exception:  # noqa: BLE001 - the partial conversion failing too says nothing more
        return []


def read_onnx(model: onnx.ModelProto, tmp: Path) -> Any:
    """ONNX -> ``openvino.Model``; a node the frontend cannot convert is named in the error."""
    path = tmp / "model.onnx"
    _save_for_openvino(model, path)
    try:
        return core().read_model(str(path))
    except Exception as exc:  # OpenVINO raises RuntimeError / its own OpConversionFailure
        failures = _conversion_failures(path, model, exc)
        if failures:
            listed = "; ".join(f"'{label}' ({detail})" for label, detail in failures[:3])
            more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
            raise UnsupportedModelError(
                f"OpenVINO {core_version()} cannot convert node(s) {listed}{more}: replace or simplify those "
                "nodes (static shapes, --input NAME:SHAPE, often help) or use another backend (--backend onnxruntime)"
            ) from None
        raise UnsupportedModelError(f"OpenVINO could not read the ONNX model: {_first_line(exc)}") from None


def core_version() -> str:
    return _ov().__version__.split("-")[0]


# --------------------------------------------------------------------------- session


class OpenVinoSession(Session):
    """Runs a compiled model; thread-safe through a pool of infer requests (one per concurrent call).

    Each call sets the inputs as tensors over the caller's arrays (no copy), runs, and copies the
    outputs out of the request's buffers before the request goes back to the pool, so arrays
    handed out are never overwritten by a later call. ``InferRequest.infer(dict)`` does the same
    through OpenVINO's Python data dispatcher, which re-inspects every input (its dtype, flags,
    the request's tensor) and builds a results dict: with share_inputs (this session before) 12-100 us
    more per call on 0.1 ms models, with its default copies 55-230 us (benchmarks/engine_overhead.py).
    """

    def __init__(self, compiled: Any, signature: Signature):
        self._compiled = compiled
        self._idle: list[Any] = []  # list.pop/append are atomic: a pool without a lock
        self._tensor = _ov().Tensor
        # Inputs by the signature's names -> (port index, dtype to cast to when the port's differs).
        self._inputs = {}
        for spec in signature.inputs:
            index, port = _port_index(compiled.inputs, spec.name, "input")
            wanted = np.dtype(port.get_element_type().to_dtype())
            self._inputs[spec.name] = (index, None if wanted == np.dtype(spec.dtype) else wanted)
        # Outputs by the signature's names; OpenVINO keeps ONNX tensor names as port names.
        self._outputs = [(spec.name, _port_index(compiled.outputs, spec.name, "output")[0], np.dtype(spec.dtype))
                         for spec in signature.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            request = self._idle.pop()
        except IndexError:
            request = self._compiled.create_infer_request()
        try:
            for name, array in feeds.items():
                index, cast = self._inputs[name]
                request.set_input_tensor(index, self._input_tensor(array if cast is None else array.astype(cast)))
            # share_outputs: views of the request's buffers, copied (and cast) once right here.
            values = request.infer(share_outputs=True).to_tuple()
            return {name: np.array(values[index], dtype=dtype, copy=True) for name, index, dtype in self._outputs}
        except RuntimeError as exc:  # the plugin's shape inference refusing these inputs, mostly
            shapes = ", ".join(f"{name}{list(np.shape(value))}" for name, value in feeds.items())
            raise InputError(f"OpenVINO could not run the engine on inputs {shapes}: {_last_line(exc)}") from None
        finally:
            self._idle.append(request)

    def _input_tensor(self, array: np.ndarray) -> Any:
        try:
            return self._tensor(array, shared_memory=True)
        except ValueError:  # a read-only array cannot be shared: OpenVINO copies it
            return self._tensor(array, shared_memory=False)

    def close(self) -> None:
        self._compiled = None
        self._idle = []


def _port_index(ports: Any, name: str, kind: str) -> tuple[int, Any]:
    for index, port in enumerate(ports):
        if name in port.get_names():
            return index, port
    known = ", ".join(sorted(n for p in ports for n in p.get_names()))
    raise BuildError(f"the OpenVINO engine has no {kind} '{name}' (it has {known})")


# --------------------------------------------------------------------------- backend


class OpenVinoBackend(Backend):
    name = "openvino"
    display_name = "OpenVINO"
    # Below ONNX Runtime (10): a build without selection takes ONNX Runtime; `--backend auto` times both.
    auto_priority = 5
    int8_cache_names = (INT8_MODEL_CACHE,)

    def available(self) -> Availability:
        try:
            _ov()
        except MissingDependencyError as exc:
            return Availability(False, str(exc))
        try:
            devices = core().available_devices
        except Exception as exc:  # noqa: BLE001 - a broken install: say so instead of failing later
            return Availability(False, f"OpenVINO cannot start: {_first_line(exc)}")
        if DEVICE not in devices:
            return Availability(False, f"OpenVINO's CPU plugin is not available here (devices: {', '.join(devices)})")
        return Availability(True)

    def version(self) -> str:
        return core_version()

    def fingerprint(self, options: BuildOptions) -> dict[str, str]:
        return {**host_fingerprint(), "backend_version": self.version(), "device": DEVICE}

    def must_match(self) -> list[str]:
        # The compiled blob holds kernels and weight layouts picked for these ISA flags by this
        # OpenVINO version; OpenVINO refuses blobs of other versions, enginesmith says why first.
        return ["os", "arch", "cpu_flags", "backend_version", "device"]

    def describe_platform(self, fingerprint: Mapping[str, str]) -> str:
        return f"{fingerprint.get('arch', '?')} / OpenVINO {fingerprint.get('backend_version', '?')} CPU"

    def precisions(self, options: BuildOptions) -> list[str]:
        return ["fp32", *native_precisions(), "int8"]

    def op_support(self, model: onnx.ModelProto, options: BuildOptions) -> dict[str, tuple[str, str]]:
        """The frontend's conversion per node, then the CPU plugin's ``query_model`` on what converted."""
        labels = node_names(model)
        with tempfile.TemporaryDirectory(prefix="enginesmith-ov-") as tmp:
            path = Path(tmp) / "model.onnx"
            _save_for_openvino(model, path)
            try:
                converted = core().read_model(str(path))
            except Exception as exc:  # noqa: BLE001 - some nodes do not convert: find which
                failures = dict(_conversion_failures(path, model, exc))
                if not failures:
                    return {**{label: ("conditional", "not checked") for label in labels},
                            "": ("unsupported", f"OpenVINO: {_first_line(exc)}")}
                prefix = f"OpenVINO {core_version()}'s ONNX frontend cannot convert it: "
                return {label: ("unsupported", prefix + failures[label]) if label in failures
                        else ("supported", "converted by OpenVINO's ONNX frontend") for label in labels}
        try:
            placed = core().query_model(converted, DEVICE)
        except Exception as exc:  # noqa: BLE001
            return {**{label: ("supported", "converted by OpenVINO's ONNX frontend") for label in labels},
                    "": ("unsupported", f"OpenVINO CPU plugin: {_first_line(exc)}")}
        missing = {op.get_friendly_name() for op in converted.get_ordered_ops() if op.get_friendly_name() not in placed
                   and op.get_type_name() not in ("Parameter", "Result", "Constant")}
        result = {}
        for label, node in zip(labels, model.graph.node):
            if label in missing or any(name in missing for name in node.output):
                result[label] = ("unsupported", "OpenVINO's CPU plugin has no kernel for it")
            else:
                result[label] = ("supported", "OpenVINO CPU plugin")
        return result

    def build(
        self,
        model: onnx.ModelProto,
        signature: Signature,
        options: BuildOptions,
        progress: ProgressCallback | None = None,
        calibration: Calibration | None = None,
    ) -> BuildResult:
        settings = OpenVinoSettings.parse(options.backend_options)
        log = [f"OpenVINO {self.version()}, device {DEVICE} ({core().get_property(DEVICE, 'FULL_DEVICE_NAME')})"]
        precision = _resolve_precision(options, log)
        caches: dict[str, bytes] = {}
        if precision == "int8":
            ov_model, caches[INT8_MODEL_CACHE] = self._int8_model(model, signature, options, settings, calibration,
                                                                   log, progress)
        else:
            ov_model = self._convert(model, progress)
        config = compile_config(precision, settings, options.threads)
        if progress:
            progress("compiling for the CPU", 0, 1)
        try:
            compiled = core().compile_model(ov_model, DEVICE, config)
        except Exception as exc:  # noqa: BLE001 - the plugin's error, as one line
            raise BuildError(f"OpenVINO could not compile the model for the CPU: {_first_line(exc)}") from None
        chosen = _compiled_properties(compiled)
        if chosen["INFERENCE_PRECISION_HINT"] != config["INFERENCE_PRECISION_HINT"]:
            raise BuildError(f"OpenVINO compiled {precision} as {chosen['INFERENCE_PRECISION_HINT']} on this CPU: "
                             "build fp32 instead")
        exported = compiled.export_model()
        payload = exported.getvalue() if hasattr(exported, "getvalue") else bytes(exported)
        if progress:
            progress("compiling for the CPU", 1, 1)
        log.append(f"compiled for the CPU: {', '.join(f'{k}={v}' for k, v in chosen.items())}; "
                   f"payload is the exported compiled model ({len(payload) / 1e6:.1f} MB)")
        resolved = replace(options, precision=precision, backend_options=settings.to_dict())
        details = {
            "compile_config": config,
            "openvino_chose": chosen,
            "ops": _op_histogram(ov_model),
            "cpu_capabilities": list(core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")),
        }
        return BuildResult(payload, PAYLOAD_NAME, resolved, log, details, caches)

    def _convert(self, model: onnx.ModelProto, progress: ProgressCallback | None) -> Any:
        with tempfile.TemporaryDirectory(prefix="enginesmith-ov-") as tmp:
            if progress:
                progress("converting ONNX to OpenVINO", 0, 1)
            ov_model = read_onnx(model, Path(tmp))
            if progress:
                progress("converting ONNX to OpenVINO", 1, 1)
        return ov_model

    def _int8_model(self, model: onnx.ModelProto, signature: Signature, options: BuildOptions,
                    settings: OpenVinoSettings, calibration: Calibration | None, log: list[str],
                    progress: ProgressCallback | None) -> tuple[Any, bytes]:
        """The rebuilt bundle's quantized model where it fits this build, else NNCF's quantization
        of ``model``; and the cache entry that keeps it for the next rebuild."""
        from . import openvino_int8 as int8

        record = int8.int8_record(signature, options.calibration_method, settings)
        quantized = int8.stored_int8_model(options.previous_caches, record, calibration, log)
        if quantized is None:
            ov_model = self._convert(model, progress)
            if progress:
                progress("calibrating int8 (NNCF)", 0, 1)
            quantized = int8.quantize_int8(ov_model, calibration, settings, log)
            if progress:
                progress("calibrating int8 (NNCF)", 1, 1)
        return quantized, int8.pack_int8_model(quantized, record)

    def load(self, payload: bytes | Path, options: BuildOptions, signature: Signature) -> Session:
        settings = OpenVinoSettings.parse(options.backend_options)
        config = compile_config(options.precision, settings, options.threads)
        data = payload if isinstance(payload, bytes) else Path(payload).read_bytes()
        try:
            compiled = core().import_model(data, DEVICE, config)
        except Exception as exc:  # noqa: BLE001 - a blob from another OpenVINO or CPU
            raise BuildError(f"OpenVINO {self.version()} could not load the engine payload ({_first_line(exc)}); "
                             "rebuild the engine on this machine with 'enginesmith build ENGINE'") from None
        return OpenVinoSession(compiled, signature)


def _compiled_properties(compiled: Any) -> dict[str, str]:
    """What the plugin resolved the hints to (streams, threads, precision): recorded, not replayed."""
    chosen = {}
    for key in ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS"):
        value = compiled.get_property(key)
        # The precision comes back as an openvino.Type ("f32"), the others as str or int.
        chosen[key] = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return chosen


def _op_histogram(ov_model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ov_model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("Parameter", "Result", "Constant"):
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))
