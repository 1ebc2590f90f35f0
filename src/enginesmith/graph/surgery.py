"""Graph surgery a user asks for by name: fix shapes, dynamic axes, rename I/O, cut a subgraph, convert opsets.

Each function takes a model and returns a new one (the argument is not modified).
Bad requests raise a :class:`GraphSurgeryError` subclass whose one-line message names
what is wrong and what the model offers instead.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import onnx

from ..errors import EnginesmithError
from ._onnx import (
    TensorTypes,
    all_tensor_names,
    closest,
    copy_model_frame,
    dims_of,
    infer_shapes,
    listing,
    opset_of,
    outer_scope_names,
    produced_tensors,
    rename_uses,
    user_inputs,
    with_outputs,
)
from .rebatch import carry_batch


class GraphSurgeryError(EnginesmithError):
    """A graph edit cannot be done as asked."""


class TensorNotFoundError(GraphSurgeryError):
    """A tensor, input or output named in a graph edit is not in the model."""


class ShapeMismatchError(GraphSurgeryError):
    """Shapes given for a model contradict the model."""


class OpsetConversionError(GraphSurgeryError):
    """The model cannot be converted to the requested opset."""


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _shape_text(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def _find_input(graph: onnx.GraphProto, name: str, what: str) -> onnx.ValueInfoProto:
    inputs = user_inputs(graph)
    for value in inputs:
        if value.name == name:
            return value
    names = [v.name for v in inputs]
    raise TensorNotFoundError(f"{what}: the model has no input '{name}'{closest(name, names)}; inputs are {listing(names)}")


def _set_dims(value: onnx.ValueInfoProto, dims) -> None:
    shape = value.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        entry = shape.dim.add()
        if isinstance(d, int):
            entry.dim_value = d
        elif isinstance(d, str):
            entry.dim_param = d


def _reinfer(model: onnx.ModelProto, what: str, bindings: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """Drop inferred shapes (and output dims) and infer again strictly; contradictions raise.

    An output inference leaves without a shape (an ``If`` whose branches have different ranks, as in
    Silero VAD) gets its declared dims back, with the symbols ``bindings`` fixed: a graph output
    without a shape is not a valid model.
    """
    graph = model.graph
    del graph.value_info[:]
    declared = {out.name: dims_of(out.type) for out in graph.output}
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError / RuntimeError with the failing node
        first = " ".join(str(exc).split())[:300]
        raise ShapeMismatchError(f"{what} contradicts the model: {first}") from None
    for out in inferred.graph.output:
        dims = declared.get(out.name)
        if out.type.HasField("tensor_type") and not out.type.tensor_type.HasField("shape") and dims is not None:
            _set_dims(out, [(bindings or {}).get(d, d) if isinstance(d, str) else d for d in dims])
    _check_conv_channels(inferred, what)
    return inferred


def _check_conv_channels(model: onnx.ModelProto, what: str) -> None:
    """ONNX shape inference does not compare a Conv's input channels with its weights; do it here."""
    types = TensorTypes(model)
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.domain not in ("", "ai.onnx"):
            continue
        x, w = types.shape(node.input[0]), types.shape(node.input[1])
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if x and w and len(x) > 1 and len(w) > 1 and isinstance(x[1], int) and isinstance(w[1], int):
            if x[1] != w[1] * group:
                raise ShapeMismatchError(
                    f"{what} contradicts the model: Conv '{node.name}' gets {x[1]} input channels but its weights "
                    f"expect {w[1] * group}"
                )


def fix_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Give inputs fixed shapes (``{"x": (1, 3, 224, 224)}``); symbolic dims shared by others follow."""
    out = _copy(model)
    graph = out.graph
    bindings: dict[str, int] = {}
    for name, shape in shapes.items():
        value = _find_input(graph, name, "cannot fix the shape")
        shape = [int(d) for d in shape]
        dims = dims_of(value.type)
        what = f"shape {_shape_text(shape)} for input '{name}'"
        if any(d < 1 for d in shape):
            raise ShapeMismatchError(f"{what}: dimensions must be positive")
        if dims is not None and len(dims) != len(shape):
            raise ShapeMismatchError(
                f"{what} has {len(shape)} dimensions but the input has rank {len(dims)} ([{_shape_text(dims)}])"
            )
        for axis, (old, new) in enumerate(zip(dims or [], shape)):
            if isinstance(old, int) and old > 0 and old != new:
                raise ShapeMismatchError(f"{what}: dimension {axis} is fixed to {old} in the model, not {new}")
            if isinstance(old, str):
                if bindings.get(old, new) != new:
                    raise ShapeMismatchError(
                        f"{what}: dimension '{old}' is already set to {bindings[old]} by another input"
                    )
                bindings[old] = new
        _set_dims(value, shape)
    for value in user_inputs(graph):
        dims = dims_of(value.type)
        if dims and any(isinstance(d, str) and d in bindings for d in dims):
            _set_dims(value, [bindings.get(d, d) if isinstance(d, str) else d for d in dims])
    given = ", ".join(f"{n}:{_shape_text(s)}" for n, s in shapes.items())
    return _reinfer(out, f"input shape {given}", bindings)


def make_dynamic(model: onnx.ModelProto, axes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Mark input axes dynamic (``{"x": [0]}``): axis 0 becomes ``batch``, others ``<input>_d<axis>``.

    An input fixed at batch 1 whose axis 0 becomes dynamic also gets the model's batch-1 Reshape
    targets rewritten to carry the batch (:func:`~enginesmith.graph.rebatch.carry_batch`).
    """
    return make_dynamic_noted(model, axes)[0]


def make_dynamic_noted(model: onnx.ModelProto, axes: Mapping[str, Sequence[int]]) -> tuple[onnx.ModelProto, list[str]]:
    """:func:`make_dynamic`, and what it rewrote besides the inputs (one line per kind of rewrite)."""
    batch_inputs = set()
    for name, wanted in axes.items():
        dims = dims_of(_find_input(model.graph, name, "cannot make an axis dynamic").type)
        if dims and dims[0] == 1 and any(a in (0, -len(dims)) for a in wanted):
            batch_inputs.add(name)
    out, notes = carry_batch(model, batch_inputs)
    graph = out.graph
    for name, wanted in axes.items():
        value = _find_input(graph, name, "cannot make an axis dynamic")
        dims = dims_of(value.type)
        if dims is None:
            raise ShapeMismatchError(f"input '{name}' has no known rank; give its shape first")
        new = list(dims)
        for axis in wanted:
            if not -len(dims) <= axis < len(dims):
                raise ShapeMismatchError(f"axis {axis} is out of range for input '{name}' of rank {len(dims)}")
            axis %= len(dims)
            new[axis] = "batch" if axis == 0 else f"{name}_d{axis}"
        _set_dims(value, new)
    try:
        return _reinfer(out, "dynamic axes " + ", ".join(f"{n}:{list(a)}" for n, a in axes.items())), notes
    except ShapeMismatchError:
        # Dynamic axes can make strict inference fail on nodes that fold shapes into constants;
        # the numerical check of the pass (running the model at another size) decides.
        del out.graph.value_info[:]
        return infer_shapes(out), notes


def rename_io(model: onnx.ModelProto, mapping: Mapping[str, str]) -> onnx.ModelProto:
    """Rename graph inputs and outputs (``{"old": "new"}``) everywhere they are used."""
    out = _copy(model)
    graph = out.graph
    io_names = [v.name for v in user_inputs(graph)] + [v.name for v in graph.output]
    existing = all_tensor_names(graph) | {v.name for v in graph.output}
    for old, new in mapping.items():
        if old not in io_names:
            raise TensorNotFoundError(
                f"cannot rename '{old}': it is not an input or output of the model{closest(old, io_names)}; "
                f"inputs and outputs are {listing(io_names)}"
            )
        if not new:
            raise GraphSurgeryError(f"cannot rename '{old}' to an empty name")
        if new != old and new in existing:
            raise GraphSurgeryError(f"cannot rename '{old}' to '{new}': the model already has a tensor named '{new}'")
    for old, new in mapping.items():
        if old == new:
            continue
        rename_uses(graph, old, new, outputs=True)
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            if value.name == old:
                value.name = new
        existing.add(new)
    return out


def cut_subgraph(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
    """The part of the graph between tensors ``inputs`` and ``outputs`` (for debugging a section)."""
    inferred = infer_shapes(model)
    graph = inferred.graph
    known = all_tensor_names(graph)
    weights = {t.name for t in graph.initializer}
    for kind, names in (("input", inputs), ("output", outputs)):
        if not names:
            raise GraphSurgeryError(f"a cut needs at least one {kind} tensor")
        for name in names:
            if name not in known:
                raise TensorNotFoundError(
                    f"cannot cut at {kind} '{name}': the model has no tensor of that name{closest(name, known)}"
                )
            if kind == "input" and name in weights:
                raise GraphSurgeryError(f"cannot cut at input '{name}': it is a weight (initializer), not an activation")
    types = TensorTypes(inferred)
    for name in list(inputs) + list(outputs):
        if not types.elem.get(name):
            raise GraphSurgeryError(
                f"cannot cut at '{name}': its type is unknown (shape inference could not infer it); fix input shapes first"
            )
    # Which graph inputs do the outputs need, walking back and stopping at the cut's inputs?
    producers = produced_tensors(graph)
    graph_inputs = {v.name for v in user_inputs(graph)}
    stop = set(inputs)
    needed_inputs: set[str] = set()
    seen: set[str] = set()
    stack = list(outputs)
    used_inputs: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in stop:
            used_inputs.add(name)
            continue
        if name in graph_inputs:
            needed_inputs.add(name)
            continue
        if name in producers:
            node = graph.node[producers[name]]
            stack.extend(n for n in node.input if n)
            stack.extend(outer_scope_names(node))
    if needed_inputs:
        raise GraphSurgeryError(
            f"the cut's outputs {listing(outputs)} also depend on graph input(s) {listing(sorted(needed_inputs))}, "
            "which are not among the cut's inputs; add them to the inputs"
        )
    unused = [n for n in inputs if n not in used_inputs]
    if unused:
        raise GraphSurgeryError(f"cut input(s) {listing(unused)} do not feed the outputs {listing(outputs)}")
    try:
        extracted = onnx.utils.Extractor(inferred).extract_model(list(inputs), list(outputs))
    except Exception as exc:  # noqa: BLE001 - onnx raises KeyError/ValueError on odd graphs
        raise GraphSurgeryError(f"cannot cut the graph between {listing(inputs)} and {listing(outputs)}: {exc}") from None
    result = copy_model_frame(model, extracted.graph)
    result.graph.name = f"{model.graph.name or 'model'}_cut"
    return result


def convert_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model converted to default-domain opset ``target`` with onnx's version converter."""
    current = opset_of(model)
    newest = onnx.defs.onnx_opset_version()
    if current is None:
        raise OpsetConversionError("the model imports no default-domain opset; nothing to convert")
    if target == current:
        return _copy(model)
    if not 1 <= target <= newest:
        raise OpsetConversionError(
            f"opset {target} cannot be reached: the installed onnx ({onnx.__version__}) knows opsets 1 to {newest}"
        )
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as exc:  # onnx raises RuntimeError with the C++ assertion text
        text = " ".join(str(exc).split())
        reason = text.split("failed:")[-1].strip() if "failed:" in text else text
        raise OpsetConversionError(f"cannot convert the model from opset {current} to {target}: {reason[:300]}") from None
    try:
        onnx.checker.check_model(converted)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise OpsetConversionError(f"converting from opset {current} to {target} gave an invalid model: {first}") from None
    return converted


def add_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Also output the named intermediate tensors (for debugging)."""
    inferred = infer_shapes(model)
    known = set(produced_tensors(inferred.graph))
    for name in names:
        if name not in known:
            raise TensorNotFoundError(f"no node produces a tensor named '{name}'{closest(name, known)}")
    return with_outputs(model, names)


__all__ = [
    "GraphSurgeryError",
    "OpsetConversionError",
    "ShapeMismatchError",
    "TensorNotFoundError",
    "add_outputs",
    "convert_opset",
    "cut_subgraph",
    "fix_shapes",
    "make_dynamic",
    "rename_io",
]
