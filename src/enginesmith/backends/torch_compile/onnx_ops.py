"""Converters for what current ONNX exporters emit (opsets 17-21) that onnx2torch 1.5.15 lacks or refuses.

Registered in onnx2torch's converter registry (``register()``, called once after onnx2torch is
imported), so ``get_converter`` and ``inspect --target torch`` see them like onnx2torch's own:

- Reduce* at opset 18 (and ReduceMax/ReduceMin at 20): ``axes`` is an input, read when constant;
- Reshape with ``allowzero=1`` (torch.onnx's dynamo exporter writes it for every ``view``): a 0 in
  the shape then means an empty axis, which is what ``torch.reshape`` does with a literal list;
- Gelu (opset 20), CastLike, Split with ``num_outputs`` (opset 18);
- ops whose newer versions only widened the accepted types (Cast 19/21 outside float8, Shape
  19/21, Transpose/Flatten/Unsqueeze 21, ...): onnx2torch's converter for the older version,
  refused at conversion when the node uses what the new version added (Pad's ``axes``, Resize's
  ``antialias``, AveragePool's ``dilations``).

Each converter is checked against ONNX Runtime on a one-node model in tests/test_torch_onnx_ops.py.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

from .common import _torch

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


def _reduce(op: str, x: Any, dims: list[int], keepdim: bool) -> Any:
    torch = _torch()
    if op == "ReduceMean":
        return x.mean(dim=dims, keepdim=keepdim)
    if op == "ReduceMax":
        return x.amax(dim=dims, keepdim=keepdim)
    if op == "ReduceMin":
        return x.amin(dim=dims, keepdim=keepdim)
    if op == "ReduceProd":
        out = x
        for dim in sorted(dims, reverse=True):
            out = out.prod(dim=dim, keepdim=keepdim)
        return out
    if op == "ReduceL1":
        return x.abs().sum(dim=dims, keepdim=keepdim)
    if op == "ReduceL2":
        return torch.sqrt((x * x).sum(dim=dims, keepdim=keepdim))
    if op == "ReduceLogSum":
        return torch.log(x.sum(dim=dims, keepdim=keepdim))
    if op == "ReduceLogSumExp":
        return torch.logsumexp(x, dim=dims, keepdim=keepdim)
    if op == "ReduceSumSquare":
        return (x * x).sum(dim=dims, keepdim=keepdim)
    raise ValueError(op)


@functools.lru_cache(maxsize=None)
def _modules() -> dict[str, Any]:
    """The nn.Module classes, made once torch is imported (this module must import without torch)."""
    torch = _torch()

    class OnnxReduceConstAxes(torch.nn.Module):
        """A Reduce* whose axes (an input since opset 18) are known when converting."""

        def __init__(self, op: str, axes: list[int] | None, keepdims: bool, noop_with_empty_axes: bool):
            super().__init__()
            self.op, self.axes, self.keepdims, self.noop = op, axes, keepdims, noop_with_empty_axes

        def forward(self, x):
            if not self.axes:
                if self.noop:
                    return x
                dims = list(range(x.dim()))
            else:
                dims = sorted(a % x.dim() for a in self.axes)
            return _reduce(self.op, x, dims, self.keepdims)

    class OnnxReshapeAllowZero(torch.nn.Module):
        """Reshape with allowzero=1: the shape is taken literally (0 is an empty axis, never "copy")."""

        def forward(self, x, shape):
            return torch.reshape(x, [int(d) for d in shape.tolist()])

    class OnnxGelu(torch.nn.Module):
        def __init__(self, approximate: str):
            super().__init__()
            self.approximate = approximate

        def forward(self, x):
            return torch.nn.functional.gelu(x, approximate=self.approximate)

    class OnnxCastLike(torch.nn.Module):
        def forward(self, x, like):
            return x.to(like.dtype)

    class OnnxSplitNumOutputs(torch.nn.Module):
        """Split into ``parts`` chunks of ceil(size / parts), the last one smaller (opset 18 semantics)."""

        def __init__(self, axis: int, parts: int):
            super().__init__()
            self.axis, self.parts = axis, parts

        def forward(self, x):
            size = x.shape[self.axis]
            return tuple(torch.split(x, math.ceil(size / self.parts), dim=self.axis))

    class OnnxResizeConst(torch.nn.Module):
        """Resize whose scales or sizes are constants: F.interpolate with Python values (torch.export cannot
        read a tensor's values, which onnx2torch's Resize does on every call)."""

        def __init__(self, mode: str, align_corners: bool | None, scales: list[float] | None, sizes: list[int] | None):
            super().__init__()
            self.mode, self.align_corners, self.scales, self.sizes = mode, align_corners, scales, sizes

        def forward(self, x):
            return torch.nn.functional.interpolate(x, size=self.sizes, scale_factor=self.scales, mode=self.mode,
                                                   align_corners=self.align_corners)

    class OnnxGatherNDIndex(torch.nn.Module):
        """GatherND (batch_dims=0) as advanced indexing: no flattening through the indices' element count,
        which makes torch.export fix the batch (onnx2torch's version does)."""

        def forward(self, data, indices):
            return data[tuple(indices.unbind(-1))]

    return {
        "gather_nd": OnnxGatherNDIndex,
        "resize": OnnxResizeConst,
        "reduce": OnnxReduceConstAxes, "reshape": OnnxReshapeAllowZero, "gelu": OnnxGelu,
        "cast_like": OnnxCastLike, "split": OnnxSplitNumOutputs,
    }


def _const_values(name: str, graph: Any, kind: type = int) -> list | None:
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
        return _result(_modules()["reduce"](op, axes, keepdims, noop), node, (inputs[0],))

    return convert


def _reshape_converter(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def convert(node: Any, graph: Any) -> Any:
        if node.attributes.get("allowzero", 0) != 1:
            return original(node, graph)
        return _result(_modules()["reshape"](), node)

    return convert


def _gelu(node: Any, graph: Any) -> Any:
    approximate = str(node.attributes.get("approximate", "none"))
    if approximate not in ("none", "tanh"):
        raise NotImplementedError(f"Gelu approximate='{approximate}' is not an ONNX value")
    return _result(_modules()["gelu"](approximate), node)


def _cast_like(node: Any, graph: Any) -> Any:
    return _result(_modules()["cast_like"](), node)


def _split_converter(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def convert(node: Any, graph: Any) -> Any:
        parts = node.attributes.get("num_outputs")
        if parts is None or len([v for v in node.input_values if v]) > 1:
            return original(node, graph)
        return _result(_modules()["split"](int(node.attributes.get("axis", 0)), int(parts)), node,
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
            return _result(_modules()["resize"](mode, align, None, [int(v) for v in sizes[2:]]), node, (inputs[0],))
        return _result(_modules()["resize"](mode, align, [float(v) for v in scales[2:]], None), node, (inputs[0],))

    return convert


def _gather_nd_converter(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def convert(node: Any, graph: Any) -> Any:
        if int(node.attributes.get("batch_dims", 0)) != 0:
            return original(node, graph)
        return _result(_modules()["gather_nd"](), node)

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
    for version in (15, 19, 21):
        put("CastLike", version, _cast_like)
    put("Split", 18, _split_converter(existing("Split", 13)))
    for version in (18, 19, 21):
        put("Pad", version, _guarded(existing("Pad", 13), _pad_refusal))
    resize = _resize_converter(existing("Resize", 13))
    for version in (11, 13, 18, 19):
        put("Resize", version, resize)
    gather_nd = _gather_nd_converter(existing("GatherND", 13))
    for version in (11, 12, 13):
        put("GatherND", version, gather_nd)
    put("AveragePool", 19, _guarded(existing("AveragePool", 11), _pool_refusal))
    _REGISTERED = True
