"""What is in a model: inputs, outputs, a layer table with shapes, parameters and FLOPs, an op histogram.

Shapes come from ONNX shape inference. FLOPs and MACs are counted per sample of the
shapes shape inference gives; symbolic dimensions (``batch``) count as 1 unless given
in ``dims``. Conventions (one multiply-add = 1 MAC = 2 FLOPs):

* Conv: MACs = N x prod(output spatial) x prod(weight shape); FLOPs = 2 MACs (+ one add per output with a bias)
* ConvTranspose: MACs = N x prod(input spatial) x prod(weight shape); FLOPs likewise
* Gemm: MACs = M x N x K; FLOPs = 2 MACs (+ M x N with C); MatMul: MACs = prod(output) x K
* BatchNormalization (inference, folded scale and shift): 1 MAC, 2 FLOPs per element
* pooling: one FLOP per window element per output; global pooling: one per input element
* element-wise ops: one FLOP per output element (per extra operand for variadic ones)
* Softmax/LogSoftmax: 3 FLOPs per element; reductions: one per input element
* data movement (Reshape, Transpose, Concat, Gather, ...): 0
* anything else: not counted (``None``), listed in ``totals["not_counted"]``
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx

from ..signature import Dim
from ._onnx import TensorTypes, attribute_summary, infer_shapes, node_labels, resolve_shape, user_inputs

ELEMENTWISE = {
    "Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "BitShift", "Ceil", "Celu", "Clip",
    "Cos", "Cosh", "Div", "Elu", "Equal", "Erf", "Exp", "Floor", "Gelu", "Greater", "GreaterOrEqual", "HardSigmoid",
    "HardSwish", "IsInf", "IsNaN", "LeakyRelu", "Less", "LessOrEqual", "Log", "Max", "Mean", "Min", "Mish", "Mod",
    "Mul", "Neg", "Not", "Or", "PRelu", "Pow", "Reciprocal", "Relu", "Round", "Selu", "Shrink", "Sigmoid", "Sign",
    "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Where", "Xor",
}
VARIADIC = {"Max", "Min", "Mean", "Sum"}
DATA_MOVEMENT = {
    "Cast", "CastLike", "Compress", "Concat", "Constant", "ConstantOfShape", "DepthToSpace", "Dropout", "Expand",
    "Flatten", "Gather", "GatherElements", "GatherND", "Identity", "NonZero", "Pad", "Range", "Reshape", "Resize",
    "Shape", "Size", "Slice", "SpaceToDepth", "Split", "Squeeze", "Tile", "Transpose", "Unsqueeze", "Upsample",
}
POOLING = {"MaxPool", "AveragePool", "LpPool"}
GLOBAL_POOLING = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
REDUCTIONS = {
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
    "ReduceSum", "ReduceSumSquare", "ArgMax", "ArgMin",
}


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[Dim] | None

    def shape_text(self) -> str:
        if self.shape is None:
            return "?"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclass
class LayerInfo:
    index: int
    name: str
    op_type: str
    domain: str
    # Activations the node reads (weights and constants are in ``weights``).
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    weights: list[TensorInfo]
    params: int
    macs: int | None
    flops: int | None
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def op(self) -> str:
        return f"{self.domain}:{self.op_type}" if self.domain not in ("", "ai.onnx") else self.op_type


@dataclass
class ModelInspection:
    graph_name: str
    producer: str
    ir_version: int
    opsets: dict[str, int]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    layers: list[LayerInfo]
    op_histogram: dict[str, int]
    totals: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for layer, raw in zip(self.layers, data["layers"]):
            raw["op"] = layer.op
        return data

    def summary(self) -> str:
        t = self.totals
        flops = f"{human(t['flops'])} FLOPs" if t["flops"] is not None else "FLOPs unknown"
        return (f"{t['nodes']} nodes, {len(self.op_histogram)} op types, {human(t['params'])} parameters "
                f"({human(t['param_bytes'])}B), {human(t['macs'])} MACs, {flops}")


def human(value: int | float | None) -> str:
    """1234567 -> '1.23M', 92 -> '92'."""
    if value is None:
        return "?"
    value = float(value)
    for unit in ("", "K", "M", "G", "T"):
        if abs(value) < 1000:
            return f"{value:.0f}" if unit == "" else f"{value:.3g}{unit}"
        value /= 1000
    return f"{value:.3g}P"


def _prod(values) -> int:
    return int(np.prod(values, dtype=np.int64)) if len(values) else 1


def _count(node: onnx.NodeProto, ins: list[tuple[int, ...] | None], outs: list[tuple[int, ...] | None],
           attrs: dict[str, Any]) -> tuple[int | None, int | None]:
    """(MACs, FLOPs) of one node from concrete shapes; (None, None) when unknown."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None, None
    out0 = outs[0] if outs else None
    if op in DATA_MOVEMENT:
        return 0, 0
    if op == "Conv":
        if out0 is None or len(ins) < 2 or ins[1] is None:
            return None, None
        macs = out0[0] * _prod(out0[2:]) * _prod(ins[1])
        bias = _prod(out0) if len(ins) > 2 and ins[2] is not None else 0
        return macs, 2 * macs + bias
    if op == "ConvTranspose":
        if out0 is None or not ins or ins[0] is None or len(ins) < 2 or ins[1] is None:
            return None, None
        macs = ins[0][0] * _prod(ins[0][2:]) * _prod(ins[1])
        bias = _prod(out0) if len(ins) > 2 and ins[2] is not None else 0
        return macs, 2 * macs + bias
    if op == "Gemm":
        if out0 is None or not ins or ins[0] is None or len(out0) != 2:
            return None, None
        k = ins[0][0] if attrs.get("transA", 0) else ins[0][-1]
        macs = out0[0] * out0[1] * k
        bias = _prod(out0) if len(ins) > 2 and ins[2] is not None else 0
        return macs, 2 * macs + bias
    if op == "MatMul":
        if out0 is None or not ins or ins[0] is None or not ins[0]:
            return None, None
        macs = _prod(out0) * ins[0][-1]
        return macs, 2 * macs
    if op == "BatchNormalization":
        if out0 is None:
            return None, None
        return _prod(out0), 2 * _prod(out0)
    if op in POOLING:
        kernel = attrs.get("kernel_shape")
        if out0 is None or not kernel:
            return None, None
        return 0, _prod(out0) * _prod(kernel)
    if op in GLOBAL_POOLING or op in REDUCTIONS:
        if not ins or ins[0] is None:
            return None, None
        return 0, _prod(ins[0])
    if op in ("Softmax", "LogSoftmax"):
        return (None, None) if out0 is None else (0, 3 * _prod(out0))
    if op in ELEMENTWISE:
        if out0 is None:
            return None, None
        extra = max(1, len([i for i in node.input if i]) - 1) if op in VARIADIC else 1
        return 0, _prod(out0) * extra
    return None, None


def inspect_model(model: onnx.ModelProto, dims: Mapping[str, int] | None = None) -> ModelInspection:
    """The layer table of an ONNX model; ``dims`` gives sizes to symbolic dimensions for FLOPs."""
    inferred = infer_shapes(model)
    types = TensorTypes(inferred)
    graph = inferred.graph
    weights = {t.name: t for t in graph.initializer}
    notes: list[str] = []
    sizes = dict(dims or {})

    def info(name: str) -> TensorInfo:
        return TensorInfo(name, types.dtype(name), types.shape(name))

    layers: list[LayerInfo] = []
    labels = node_labels(inferred)
    not_counted: Counter[str] = Counter()
    symbolic_used: set[str] = set()
    for index, (label, node) in enumerate(zip(labels, graph.node)):
        attrs = attribute_summary(node, limit=64)
        ins = [info(n) for n in node.input if n and n not in types.constants]
        consts = [info(n) for n in node.input if n and n in types.constants]
        outs = [info(n) for n in node.output if n]
        params = sum(_prod(list(weights[n].dims)) for n in dict.fromkeys(node.input) if n in weights)
        if node.op_type == "Constant":
            params += sum(_prod(list(t.dims)) for t in (types.constants.get(o) for o in node.output) if t is not None)
        for t in ins + outs + consts:
            symbolic_used |= {d for d in (t.shape or []) if isinstance(d, str) and d not in sizes}
        in_shapes = [resolve_shape(types.shape(n), sizes) if n else None for n in node.input]
        out_shapes = [resolve_shape(t.shape, sizes) for t in outs]
        macs, flops = _count(node, in_shapes, out_shapes, attrs)
        if flops is None:
            not_counted[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"] += 1
        layers.append(LayerInfo(index, label, node.op_type, node.domain, ins, outs, consts, params, macs, flops,
                                dict(list(attrs.items())[:8])))
    histogram = Counter(layer.op for layer in layers)
    unique_params = sum(_prod(list(t.dims)) for t in graph.initializer)
    unique_params += sum(l.params for l in layers if l.op_type == "Constant")
    param_bytes = sum(_tensor_bytes(t) for t in graph.initializer)
    counted = [l for l in layers if l.flops is not None]
    totals = {
        "nodes": len(layers),
        "params": unique_params,
        "param_bytes": param_bytes,
        "macs": sum(l.macs or 0 for l in counted),
        "flops": sum(l.flops or 0 for l in counted) if counted or not layers else None,
        "not_counted": dict(not_counted),
        "symbolic_dims_as_1": sorted(symbolic_used),
    }
    if symbolic_used:
        notes.append(f"FLOPs/MACs count symbolic dimensions {', '.join(sorted(symbolic_used))} as 1")
    if not_counted:
        notes.append("FLOPs not counted for: " + ", ".join(f"{op} x{n}" for op, n in sorted(not_counted.items())))
    return ModelInspection(
        graph_name=model.graph.name,
        # tf2onnx writes its git hash into the version, "None" when it has none
        producer=" ".join(w for w in f"{model.producer_name} {model.producer_version}".split() if w != "None"),
        ir_version=int(model.ir_version),
        opsets={o.domain or "ai.onnx": int(o.version) for o in model.opset_import},
        inputs=[info(v.name) for v in user_inputs(graph)],
        outputs=[info(v.name) for v in graph.output],
        layers=layers,
        op_histogram=dict(histogram.most_common()),
        totals=totals,
        notes=notes,
    )


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return _prod(list(tensor.dims)) * itemsize


__all__ = ["LayerInfo", "ModelInspection", "TensorInfo", "human", "inspect_model"]
