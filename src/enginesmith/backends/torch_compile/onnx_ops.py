"""Converters for what current ONNX exporters emit (opsets 17-21) that onnx2torch 1.5.15 lacks or refuses.

Registered in onnx2torch's converter registry (``register()``, called once after onnx2torch is
imported), so ``get_converter`` and ``inspect --target torch`` see them like onnx2torch's own:

- Reduce* at opset 18 (and ReduceMax/ReduceMin at 20): ``axes`` is an input, read when constant;
- Reshape with ``allowzero=1`` (torch.onnx's dynamo exporter writes it for every ``view``): a 0 in
  the shape then means an empty axis, which is what ``torch.reshape`` does with a literal list;
- Gelu (opset 20), CastLike, Split with ``num_outputs`` (opset 18), GlobalMaxPool;
- EyeLike, made on its input's device (onnx2torch's lands on the CPU whatever the engine's device);
- Clip whose min/max are computed at run time (onnx2torch takes constants only);
- GRU and LSTM, which onnx2torch lacks: ``onnx_rnn``; If decided by shapes: ``onnx_if``;
- NonMaxSuppression (opsets 10/11) with constant thresholds, in plain torch ops that torch.export
  traces (onnx2torch's reads its thresholds with ``.item()`` and calls torchvision): see
  ``onnx_nms.exportable_nms``;
- inputs onnx2torch reads as tensor values on every call (torch.export cannot), made Python values
  when constant: Pad's pads and value, TopK's k (a stable sort: ties keep the lower index, as ONNX
  says), CumSum's axis; ScatterND as ``index_put`` and GatherND (with ``batch_dims``) as indexing;
- ops whose newer versions only widened the accepted types (Cast 19/21 outside float8, Shape
  19/21, Transpose/Flatten/Unsqueeze 21, ...): onnx2torch's converter for the older version,
  refused at conversion when the node uses what the new version added (Pad's ``axes``, Resize's
  ``antialias``, AveragePool's ``dilations``).

Each converter is checked against ONNX Runtime on a one-node model in tests/test_torch_onnx_ops.py
(NonMaxSuppression in tests/test_torch_nms.py).
"""

from __future__ import annotations

from typing import Any, Callable

from .common import _torch
from .onnx_if import convert_if
from .onnx_op_modules import op_modules
from .onnx_rnn import convert_recurrent

# Ops whose newer versions changed types only: (op, new version, version onnx2torch converts).
TYPE_ONLY_VERSIONS: tuple[tuple[str, int, int], ...] = (
    ("Cast", 19, 13), ("Cast", 21, 13), ("Constant", 19, 13), ("Constant", 21, 13),
    ("Identity", 19, 16), ("Identity", 21, 16), ("Equal", 19, 13), ("Shape", 19, 15), ("Shape", 21, 15),
    ("Flatten", 21, 13), ("Unsqueeze", 21, 13), ("Transpose", 21, 13),
    ("ConstantOfShape", 20, 9), ("ConstantOfShape", 21, 9), ("IsInf", 20, 10), ("IsNaN", 20, 13),
)
REDUCE_OPS = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare")
_REGISTERED = False


def _const_values(name: str, graph: Any, kind: Callable[[Any], Any] = int) -> list | None:
    """The values of a constant input (initializer or Constant node) as ``kind``; None when computed at run time."""
    from onnx2torch.utils.common import get_const_value

    try:
        value = get_const_value(name, graph)
    except KeyError:
        return None
    torch = _torch()
    if isinstance(value, torch.Tensor):
        return [kind(v) for v in value.reshape(-1).tolist()]
    return [kind(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _const_ints(name: str, graph: Any) -> list[int] | None:
    return _const_values(name, graph, int)


def _const_floats(name: str, graph: Any) -> list[float] | None:
    return _const_values(name, graph, float)


def _result(module: Any, node: Any, inputs: tuple[str, ...] | None = None) -> Any:
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    mapping = OnnxMapping(inputs=tuple(node.input_values if inputs is None else inputs), outputs=tuple(node.output_values))
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping)


def _reduce_converter(op: str) -> Callable[[Any, Any], Any]:
    def convert(node: Any, graph: Any) -> Any:
        inputs = [v for v in node.input_values if v]
        axes = None
        if len(inputs) > 1:
            axes = _const_ints(inputs[1], graph)
            if axes is None:
                raise NotImplementedError(f"{op} with axes computed at run time (not a constant) is not supported")
        keepdims = bool(node.attributes.get("keepdims", 1))
        noop = bool(node.attributes.get("noop_with_empty_axes", 0))
        return _result(op_modules()["reduce"](op, axes, keepdims, noop), node, (inputs[0],))

    return convert


def _reshape_converter(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def convert(node: Any, graph: Any) -> Any:
        if node.attributes.get("allowzero", 0) != 1:
            return original(node, graph)
        return _result(op_modules()["reshape"](), node)

    return convert


def _gelu(node: Any, graph: Any) -> Any:
    approximate = str(node.attributes.get("approximate", "none"))
    if approximate not in ("none", "tanh"):
        raise NotImplementedError(f"Gelu approximate='{approximate}' is not an ONNX value")
    return _result(op_modules()["gelu"](approximate), node)


def _cast_like(node: Any, graph: Any) -> Any:
    return _result(op_modules()["cast_like"](), node)


def _eye_like(node: Any, graph: Any) -> Any:
    from onnx2torch.utils.dtype import onnx_dtype_to_torch_dtype

    dtype = node.attributes.get("dtype")
    return _result(op_modules()["eye_like"](None if dtype is None else onnx_dtype_to_torch_dtype(dtype),
                                          int(node.attributes.get("k", 0))), node)


def _split_converter(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def convert(node: Any, graph: Any) -> Any:
        parts = node.attributes.get("num_outputs")
        if parts is None or len([v for v in node.input_values if v]) > 1:
            return original(node, graph)
        return _result(op_modules()["split"](int(node.attributes.get("axis", 0)), int(parts)), node,
                       (node.input_values[0],))

    return convert


def _guarded(original: Callable[[Any, Any], Any], refuse: Callable[[Any], str | None]) -> Callable[[Any, Any], Any]:
    """onnx2torch's older converter, refused when the node uses what the newer version added."""

    def convert(node: Any, graph: Any) -> Any:
        why = refuse(node)
        if why:
            raise NotImplementedError(why)
        return original(node, graph)

    return convert


def _pad_refusal(node: Any) -> str | None:
    if len([v for v in node.input_values if v]) > 3:
        return "Pad with an 'axes' input (opset 18) is not supported"
    if node.attributes.get("mode", "constant") == "wrap":
        return "Pad mode='wrap' is not supported"
    return None


def _pad_converter(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """Constant pads (and pad value) become Python values: onnx2torch's Pad reads both tensors on every
    call, which torch.export cannot do (the padded results of tf2onnx's CombinedNonMaxSuppression)."""

    def convert(node: Any, graph: Any) -> Any:
        why = _pad_refusal(node)
        if why:
            raise NotImplementedError(why)
        inputs = [v for v in node.input_values] + ["", ""]
        pads = _const_ints(inputs[1], graph) if inputs[1] else None
        value: list | None = [0.0]
        if inputs[2]:
            value = _const_values(inputs[2], graph, lambda v: v)  # int or float, as the pad value's dtype
        if pads is None or value is None or len(value) != 1:
            return original(node, graph)
        from onnx2torch.node_converters.pad import OnnxPadStatic

        mode = str(node.attributes.get("mode", "constant"))
        if mode == "constant":
            module = OnnxPadStatic.create_from_onnx_params(onnx_pads=pads, onnx_mode=mode, constant_value=value[0])
        else:
            module = op_modules()["pad_edges"](_edge_pads(pads), {"reflect": "reflect", "edge": "replicate"}[mode])
        return _result(module, node, (inputs[0],))

    return convert


def _edge_pads(onnx_pads: list[int]) -> list[int]:
    """ONNX pads ([begins..., ends...], first axis first) as torch's (last axis first), up to the first padded
    axis: reflect/edge pad at most the last three axes in torch."""
    half = len(onnx_pads) // 2
    pairs = list(zip(onnx_pads[:half], onnx_pads[half:]))
    while pairs and pairs[0] == (0, 0):
        pairs.pop(0)
    if len(pairs) > 3:
        raise NotImplementedError("reflect/edge Pad of more than the last three axes is not supported")
    return [p for pair in reversed(pairs) for p in pair]


def _cumsum_converter(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def convert(node: Any, graph: Any) -> Any:
        axis = _const_ints(node.input_values[1], graph)
        if axis is None or len(axis) != 1:
            return original(node, graph)
        module = op_modules()["cumsum"](axis[0], bool(node.attributes.get("exclusive", 0)),
                                      bool(node.attributes.get("reverse", 0)))
        return _result(module, node, (node.input_values[0],))

    return convert


def _topk_converter(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def convert(node: Any, graph: Any) -> Any:
        k = _const_ints(node.input_values[1], graph)
        if k is None or len(k) != 1 or not int(node.attributes.get("sorted", 1)):
            return original(node, graph)
        module = op_modules()["topk"](k[0], int(node.attributes.get("axis", -1)), bool(node.attributes.get("largest", 1)))
        return _result(module, node, (node.input_values[0],))

    return convert


def _scatter_nd_converter(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def convert(node: Any, graph: Any) -> Any:
        if str(node.attributes.get("reduction", "none")) != "none":
            return original(node, graph)
        return _result(op_modules()["scatter_nd"](), node)

    return convert


def _resize_refusal(node: Any) -> str | None:
    if node.attributes.get("antialias", 0):
        return "Resize antialias=1 is not supported"
    if node.attributes.get("axes") is not None:
        return "Resize with 'axes' is not supported"
    if node.attributes.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "Resize keep_aspect_ratio_policy other than 'stretch' is not supported"
    return None


_RESIZE_MODES = {("nearest", 1): "nearest", ("nearest", 2): "nearest", ("nearest", 3): "nearest", ("linear", 1): "linear",
                 ("linear", 2): "bilinear", ("linear", 3): "trilinear", ("cubic", 2): "bicubic"}



def _resize_converter(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """Constant scales/sizes become Python values; anything else goes to onnx2torch's converter."""

    def convert(node: Any, graph: Any) -> Any:
        why = _resize_refusal(node)
        if why:
            raise NotImplementedError(why)
        inputs = list(node.input_values) + [""] * 4
        scales = _const_floats(inputs[2], graph) if inputs[2] else None
        sizes = _const_ints(inputs[3], graph) if inputs[3] else None
        scales = scales or None  # an empty scales input means "use sizes"
        sizes = sizes or None
        if (scales is None) == (sizes is None) or (inputs[1] and _const_floats(inputs[1], graph)):
            return original(node, graph)  # neither or both known, or a region of interest: onnx2torch decides
        known = scales or sizes
        rank = len(known)
        if known[:2] != ([1.0, 1.0] if scales else known[:2]) or rank < 3:
            return original(node, graph)
        mode = _RESIZE_MODES.get((str(node.attributes.get("mode", "nearest")), rank - 2))
        if mode is None:
            return original(node, graph)
        transform = str(node.attributes.get("coordinate_transformation_mode", "half_pixel"))
        align = None if mode == "nearest" else transform == "align_corners"
        if sizes is not None:
            return _result(op_modules()["resize"](mode, align, None, [int(v) for v in sizes[2:]]), node, (inputs[0],))
        return _result(op_modules()["resize"](mode, align, [float(v) for v in scales[2:]], None), node, (inputs[0],))

    return convert


def _gather_nd_converter(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def convert(node: Any, graph: Any) -> Any:
        return _result(op_modules()["gather_nd"](int(node.attributes.get("batch_dims", 0))), node)

    return convert


def _optional_constant(node: Any, graph: Any, position: int, what: str, kind: type) -> Any:
    """Input ``position`` as one Python value; None when the input is omitted. Raises when it is computed."""
    inputs = list(node.input_values) + [""] * 5
    if not inputs[position]:
        return None
    values = _const_values(inputs[position], graph, kind)
    if values is None or len(values) != 1:
        raise NotImplementedError(
            f"NonMaxSuppression node '{node.name or node.unique_name}': {what} ('{inputs[position]}') is "
            f"{'computed at run time' if values is None else f'{len(values)} values'}; the PyTorch backend needs it "
            "as one constant (an initializer or Constant node): fold it into the model (onnxslim, or the exporter's "
            "constant folding) or use --backend onnxruntime")
    return values[0]


def _nms(node: Any, graph: Any) -> Any:
    center_point_box = int(node.attributes.get("center_point_box", 0))
    if center_point_box not in (0, 1):
        raise NotImplementedError(f"NonMaxSuppression node '{node.name or node.unique_name}': center_point_box={center_point_box} "
                                  "is not an ONNX value (0 or 1)")
    max_per_class = _optional_constant(node, graph, 2, "max_output_boxes_per_class", int)
    iou_threshold = _optional_constant(node, graph, 3, "iou_threshold", float)
    score_threshold = _optional_constant(node, graph, 4, "score_threshold", float)
    iou_threshold = 0.0 if iou_threshold is None else iou_threshold
    if not 0.0 <= iou_threshold <= 1.0:
        raise NotImplementedError(f"NonMaxSuppression node '{node.name or node.unique_name}': iou_threshold {iou_threshold} is outside "
                                  "[0, 1] (ONNX Runtime refuses it too)")
    module = op_modules()["nms"](max(int(max_per_class or 0), 0), iou_threshold, score_threshold, center_point_box)
    return _result(module, node, tuple(node.input_values[:2]))


def _global_max_pool(node: Any, graph: Any) -> Any:
    return _result(op_modules()["global_max_pool"](), node)


def _clip_converter(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def convert(node: Any, graph: Any) -> Any:
        names = list(node.input_values) + ["", ""]
        low, high = names[1], names[2]
        constants = [_const_floats(name, graph) if name else None for name in (low, high)]
        if all(not name or value is not None for name, value in zip((low, high), constants)):
            if low and high:
                return original(node, graph)  # onnx2torch's: ReLU / ReLU6 where they fit
            # onnx2torch reads an absent bound ("" in the node's inputs) as a missing constant and refuses.
            bounds = [value[0] if value else None for value in constants]
            module = _torch().nn.ReLU() if bounds == [0.0, None] else op_modules()["clip_const"](*bounds)
            return _result(module, node, (names[0],))
        inputs = tuple(name for name in (names[0], low, high) if name)
        return _result(op_modules()["clip"](bool(low), bool(high)), node, inputs)

    return convert


def _pool_refusal(node: Any) -> str | None:
    dilations = node.attributes.get("dilations")
    if dilations and any(int(d) != 1 for d in dilations):
        return "AveragePool with dilations is not supported"
    return None


def register() -> None:
    """Add the converters to onnx2torch's registry (idempotent; onnx2torch must be imported)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

    def put(op: str, version: int, converter: Callable[[Any, Any], Any]) -> None:
        # Assigned rather than add_converter(): that refuses keys onnx2torch registered (Reshape 14).
        _CONVERTER_REGISTRY[OperationDescription(domain="", operation_type=op, version=version)] = converter

    def existing(op: str, version: int) -> Callable[[Any, Any], Any]:
        return _CONVERTER_REGISTRY[OperationDescription(domain="", operation_type=op, version=version)]

    for op in REDUCE_OPS:
        put(op, 18, _reduce_converter(op))
    for op in ("ReduceMax", "ReduceMin"):
        put(op, 20, _reduce_converter(op))
    reshape = _reshape_converter(existing("Reshape", 14))
    for version in (14, 19, 21):
        put("Reshape", version, reshape)
    for op, new, old in TYPE_ONLY_VERSIONS:
        put(op, new, existing(op, old))
    put("Gelu", 20, _gelu)
    for version in (1, 22):
        put("GlobalMaxPool", version, _global_max_pool)
    for version in (1, 11, 13, 16, 19, 21):
        put("If", version, convert_if)
    for op in ("GRU", "LSTM"):
        for version in (7, 14, 22):
            put(op, version, convert_recurrent)
    clip = _clip_converter(existing("Clip", 13))
    for version in (11, 12, 13):
        put("Clip", version, clip)
    for version in (15, 19, 21):
        put("CastLike", version, _cast_like)
    put("EyeLike", 9, _eye_like)
    put("Split", 18, _split_converter(existing("Split", 13)))
    pad = _pad_converter(existing("Pad", 13))
    for version in (11, 13, 18, 19, 21):
        put("Pad", version, pad)
    resize = _resize_converter(existing("Resize", 13))
    for version in (11, 13, 18, 19):
        put("Resize", version, resize)
    gather_nd = _gather_nd_converter(existing("GatherND", 13))
    for version in (11, 12, 13):
        put("GatherND", version, gather_nd)
    put("AveragePool", 19, _guarded(existing("AveragePool", 11), _pool_refusal))
    for version in (10, 11):
        put("NonMaxSuppression", version, _nms)
    for version in (11, 13, 16):
        put("ScatterND", version, _scatter_nd_converter(existing("ScatterND", version)))
    for version in (11, 14):
        put("CumSum", version, _cumsum_converter(existing("CumSum", version)))
    for version in (10, 11):
        put("TopK", version, _topk_converter(existing("TopK", version)))
    _REGISTERED = True
