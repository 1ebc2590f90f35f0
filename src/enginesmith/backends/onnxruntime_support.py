"""Which nodes ONNX Runtime can run, asked of ONNX Runtime itself (``onnxruntime`` backend's ``op_support``).

A session is created for the whole model, then for each distinct node alone, on the CPU provider
and on the requested one with the CPU fallback disabled: real kernel availability rather than a
list kept by hand. Used by ``enginesmith inspect --target onnxruntime``.
"""

from __future__ import annotations

import re

import onnx

from ..graph._onnx import outer_scope_names
from .base import BuildOptions
from .onnxruntime import PROVIDER_LABELS, _ort, resolve_providers


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
    for name in list(node.input) + sorted(outer_scope_names(node)):
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


def op_support(model: onnx.ModelProto, options: BuildOptions) -> dict[str, tuple[str, str]]:
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

