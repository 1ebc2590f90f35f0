"""Plausible inputs for a model nobody gave data for, read from the graph itself.

A model from the wild often runs only on some inputs: a U-Net-like Concat after a strided
convolution needs even sizes, a voice model picks its LSTM branch by comparing an int64 sample
rate with 16000. :func:`candidate_plans` proposes a few :class:`InputPlan` s, most plausible
first; the build runs the source on them and keeps the first that runs. Shape variants and
value variants are combined, so a model that needs both a window size and a sample rate is found.

What is read from the graph:

- fixed dims, dims a ``value_info`` entry of the input fixes, and an image size the metadata
  states (Ultralytics' ``imgsz``, ``image_size``);
- dims consumers imply: a Conv's input channels, a MatMul/Gemm's inner size, the size of a
  constant an input is added to or multiplied with (a positional embedding);
- equal named symbols get equal sizes; a named symbol on a batch axis (axis 0) is the batch
  wherever it appears (a voice model's ``state[2, batch, 128]``);
- an input that feeds a recurrent layer's initial state (LSTM/GRU/RNN ``initial_h``/``initial_c``,
  also inside ``If`` branches) has the batch on axis 1 (``[directions, batch, hidden]``);
- image-like inputs (rank 4, 1/3/4 channels) get spatial sizes that strided CNNs take
  (multiples of 32: 224, then 192, 256), then a text line (48 x 320, an OCR recognizer's crop);
  other unknown dims 16, then 512, then 1;
- integer scalars compared (through Cast/Squeeze/Reshape) with constants get those constants
  (a sample rate: 16000, 8000); a boolean that chooses an ``If`` branch gets True, then False;
- integer indices into a constant (Gather) stay within its size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from ..signature import Signature, TensorSpec, is_named_symbol
from ._onnx import TensorTypes, dims_of, infer_shapes

# Spatial sizes for image-like inputs, and sizes for other unknown dims, in the order they are tried.
IMAGE_SIZES = (224, 192, 256)
# Tried after the square sizes: a text-line crop (height, width), as OCR recognizers (PP-OCR's
# SVTR/CRNN) take; their height must pool down to 1 for the sequence head.
TEXT_LINE = (48, 320)
OTHER_SIZES = (16, 512, 1)
DEFAULT_BATCH = 2
MAX_PLANS = 6
# Metadata keys that state the input image size.
_IMAGE_SIZE_KEYS = ("imgsz", "image_size", "img_size", "input_size", "imagesize")

_PASS_THROUGH = ("Cast", "Squeeze", "Unsqueeze", "Reshape", "Identity", "Flatten", "Neg", "Abs")
_COMPARISONS = ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min")
_RECURRENT = ("LSTM", "GRU", "RNN")
# Ops a recurrent state passes through on its way from a graph input to initial_h/initial_c
# (picking a layer's slice, adding the directions axis).
_STATE_PATH = ("Gather", "Slice", "Split", "Squeeze", "Unsqueeze", "Cast", "Identity", "Reshape")


@dataclass(frozen=True)
class InputChoice:
    """How one input is generated: its concrete shape, and a fixed value or an integer range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    # Axis 0 is the batch: generate(batch=N) may resize it.
    batch_axis: bool = False
    # Every element set to this value (an int scalar the graph compares with a constant).
    value: int | float | bool | None = None
    # Integers are drawn from [low, high).
    low: int = 0
    high: int = 10
    why: str = ""
    # Other axes that are the batch too (a recurrent state's [directions, batch, hidden]).
    batch_axes: tuple[int, ...] = ()

    def generate(self, rng: np.random.Generator, batch: int | None = None) -> np.ndarray:
        shape = self.shape
        if batch is not None and shape:
            axes = ((0,) if self.batch_axis else ()) + self.batch_axes
            shape = tuple(batch if axis in axes else size for axis, size in enumerate(shape))
        dtype = np.dtype(self.dtype)
        if self.value is not None:
            return np.full(shape, self.value, dtype=dtype)
        if dtype.kind == "f":
            return rng.standard_normal(shape).astype(dtype)
        if dtype.kind in "iu":
            return rng.integers(self.low, max(self.high, self.low + 1), size=shape).astype(dtype)
        if dtype.kind == "b":
            return rng.random(shape) < 0.5
        raise TypeError(f"cannot generate data of dtype {dtype} for input '{self.name}'")

    def describe(self) -> str:
        text = f"{self.name} {self.dtype}[{', '.join(str(d) for d in self.shape)}]"
        if self.value is not None:
            text += f" = {self.value}"
        elif np.dtype(self.dtype).kind in "iu":
            text += f" in [{self.low}, {self.high})"
        return text

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                                "batch_axis": self.batch_axis, "low": self.low, "high": self.high}
        if self.value is not None:
            data["value"] = self.value
        if self.why:
            data["why"] = self.why
        if self.batch_axes:
            data["batch_axes"] = list(self.batch_axes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InputChoice":
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=tuple(int(d) for d in data["shape"]),
                   batch_axis=bool(data.get("batch_axis", False)), value=data.get("value"),
                   low=int(data.get("low", 0)), high=int(data.get("high", 10)), why=str(data.get("why", "")),
                   batch_axes=tuple(int(a) for a in data.get("batch_axes", ())))


@dataclass(frozen=True)
class InputPlan:
    """Concrete shapes and values for every input of a model."""

    inputs: tuple[InputChoice, ...]

    def generate(self, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {choice.name: choice.generate(rng, batch) for choice in self.inputs}

    def describe(self) -> str:
        return ", ".join(choice.describe() for choice in self.inputs)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {choice.name: choice.shape for choice in self.inputs}

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [choice.to_dict() for choice in self.inputs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InputPlan":
        return cls(tuple(InputChoice.from_dict(c) for c in data["inputs"]))


@dataclass
class _Hints:
    """What the graph says about one input."""

    sizes: dict[int, tuple[int, str]] = field(default_factory=dict)  # axis -> (size, why)
    values: list[Any] = field(default_factory=list)
    value_why: str = ""
    high: int | None = None
    high_why: str = ""
    batch_axes: set[int] = field(default_factory=set)  # axes past 0 that are the batch


def candidate_plans(
    model: onnx.ModelProto | None,
    signature: Signature,
    overrides: Mapping[str, Sequence[int]] | None = None,
    batch: int = DEFAULT_BATCH,
    limits: Mapping[str, tuple[int, str]] | None = None,
) -> list[InputPlan]:
    """Up to :data:`MAX_PLANS` plans, the most plausible first; ``overrides`` fix whole shapes (``--input``).

    ``model`` None (a torch source whose ONNX conversion is still running): plans from the signature
    and ``limits`` alone (input -> (exclusive upper bound of its integer values, why), which the source
    itself told), without the other hints the graph gives.
    """
    overrides = dict(overrides or {})
    if model is None:
        limits = limits or {}
        hints = {spec.name: _Hints(high=limits[spec.name][0], high_why=limits[spec.name][1]) if spec.name in limits
                 else _Hints() for spec in signature.inputs}
        all_uses = _DeepUses()
    else:
        inferred = infer_shapes(model)
        types = TensorTypes(inferred)
        uses = _uses(inferred.graph)
        declared = {v.name: dims_of(v.type) for v in model.graph.value_info}
        hints = {spec.name: _hints_for(spec, types, uses, declared.get(spec.name)) for spec in signature.inputs}
        all_uses = _DeepUses.of(inferred.graph)
    for spec in signature.inputs:
        if spec.rank == 3 and not isinstance(spec.shape[1], int) and 1 not in hints[spec.name].sizes:
            rnn = _feeds_recurrent_state(spec.name, all_uses)
            if rnn is not None:
                hints[spec.name].sizes[1] = (batch, f"the batch of the initial state of '{rnn}'")
                hints[spec.name].batch_axes.add(1)
    symbols: dict[str, int] = {}
    # Named symbols resolved by any hint are shared by every input that uses them.
    for spec in signature.inputs:
        for axis, dim in enumerate(spec.shape):
            if is_named_symbol(dim) and axis in hints[spec.name].sizes:
                symbols.setdefault(dim, hints[spec.name].sizes[axis][0])
            fixed = overrides.get(spec.name)
            if is_named_symbol(dim) and fixed is not None and len(fixed) == spec.rank:
                symbols[dim] = int(fixed[axis])
    # A named batch axis is the batch in every input that names it, unless a hint says otherwise.
    batch_symbols = {spec.shape[0] for spec in signature.inputs if spec.rank >= 2 and is_named_symbol(spec.shape[0])}
    for spec in signature.inputs:
        hints[spec.name].batch_axes.update(a for a, d in enumerate(spec.shape) if a and d in batch_symbols)
    for symbol in batch_symbols:
        symbols.setdefault(symbol, batch)
    image_sizes = _metadata_image_sizes(model) if model is not None else ()
    grids = [_choices(spec, hints[spec.name], symbols, overrides.get(spec.name), batch, image_sizes)
             for spec in signature.inputs]
    # Shape levels move together across inputs (named symbols stay equal), and so do value levels;
    # every (shape, value) pair is tried, nearest the most plausible first.
    shape_levels = max((len(g) for g in grids), default=1)
    value_levels = max((len(row) for g in grids for row in g), default=1)
    pairs = sorted(((s, v) for s in range(shape_levels) for v in range(value_levels)), key=lambda p: (p[0] + p[1], p[1]))
    plans: list[InputPlan] = []
    for shape_level, value_level in pairs:
        chosen = []
        for grid in grids:
            row = grid[min(shape_level, len(grid) - 1)]
            chosen.append(row[min(value_level, len(row) - 1)])
        plan = InputPlan(tuple(chosen))
        if plan not in plans:
            plans.append(plan)
        if len(plans) == MAX_PLANS:
            break
    return plans


def _uses(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """tensor -> (node, input position) of the top-level nodes reading it."""
    found: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name:
                found.setdefault(name, []).append((node, position))
    return found


@dataclass
class _DeepUses:
    """Readers of each tensor in the graph and in ``If``/``Loop`` bodies (which read outer tensors by
    name), and where a body's output leaves its node (body output -> the node's outputs)."""

    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = field(default_factory=dict)
    lifted: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> "_DeepUses":
        found = cls()

        def walk(body: onnx.GraphProto) -> None:
            for node in body.node:
                for position, name in enumerate(node.input):
                    if name:
                        found.readers.setdefault(name, []).append((node, position))
                for attr in node.attribute:
                    for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                        # A Loop's body outputs start with its condition; an If's map one to one.
                        skip = 1 if node.op_type == "Loop" else 0
                        for index, out in enumerate(sub.output[skip:]):
                            if index < len(node.output) and node.output[index]:
                                found.lifted.setdefault(out.name, []).append(node.output[index])
                        walk(sub)

        walk(graph)
        return found


def _feeds_recurrent_state(name: str, uses: _DeepUses, depth: int = 8) -> str | None:
    """The recurrent node whose initial_h/initial_c ``name`` reaches through :data:`_STATE_PATH` ops
    (and out of ``If`` branches), if any."""
    frontier, seen = [name], {name}
    for _ in range(depth):
        following: list[str] = []
        for tensor in frontier:
            following += [out for out in uses.lifted.get(tensor, []) if out not in seen]
            for node, position in uses.readers.get(tensor, []):
                if node.op_type in _RECURRENT and position in (5, 6):
                    return node.name or node.op_type
                if node.op_type in _STATE_PATH and position == 0:
                    following += [out for out in node.output if out and out not in seen]
        seen.update(following)
        frontier = following
    return None


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _through(name: str, uses: Mapping[str, list[tuple[onnx.NodeProto, int]]], depth: int = 4) -> list[tuple[onnx.NodeProto, int]]:
    """Consumers of ``name``, looking through value-keeping ops (Cast, Squeeze, Reshape, ...)."""
    found: list[tuple[onnx.NodeProto, int]] = []
    for node, position in uses.get(name, []):
        if node.op_type in _PASS_THROUGH and position == 0 and depth and node.output:
            found += _through(node.output[0], uses, depth - 1)
        else:
            found.append((node, position))
    return found


def _hints_for(spec: TensorSpec, types: TensorTypes, uses, declared: list | None) -> _Hints:
    hints = _Hints()
    if declared is not None and len(declared) == spec.rank:
        for axis, dim in enumerate(declared):
            if isinstance(dim, int) and dim > 0:
                hints.sizes[axis] = (dim, "the model's value_info")
    for node, position in uses.get(spec.name, []):
        for axis, size, why in _implied_sizes(spec, node, position, types):
            hints.sizes.setdefault(axis, (size, why))
    small = spec.rank == 0 or all(d == 1 for d in spec.shape if isinstance(d, int)) and spec.rank <= 1
    for node, position in _through(spec.name, uses):
        if node.op_type in _COMPARISONS and small:
            other = types.constant(node.input[1 - position]) if len(node.input) == 2 else None
            if other is not None and other.size == 1:
                value = other.reshape(()).item()
                extra = [] if node.op_type == "Equal" else [value + 1, value - 1]
                for candidate in [value] + extra:
                    if candidate not in hints.values:
                        hints.values.append(candidate)
                hints.value_why = f"compared with constants in node '{node.name or node.op_type}'"
        elif node.op_type == "If" and position == 0 and np.dtype(spec.dtype).kind == "b":
            hints.values = [True, False]
            hints.value_why = f"chooses a branch of '{node.name or 'If'}'"
        elif node.op_type == "Gather" and position == 1:
            data = types.shape(node.input[0])
            axis = int(_attr(node, "axis", 0))
            if data is not None and -len(data) <= axis < len(data) and isinstance(data[axis], int) and data[axis] > 0:
                hints.high = data[axis]
                hints.high_why = f"indices into '{node.input[0]}' (size {data[axis]})"
    return hints


def _implied_sizes(spec: TensorSpec, node: onnx.NodeProto, position: int, types: TensorTypes) -> Iterable[tuple[int, int, str]]:
    """(axis, size, why) that a consumer of the input fixes."""
    label = f"node '{node.name or node.op_type}'"
    if node.op_type == "Conv" and position == 0 and len(node.input) > 1 and spec.rank >= 3:
        weight = types.shape(node.input[1])
        if weight and isinstance(weight[1], int):
            yield 1, int(weight[1]) * int(_attr(node, "group", 1)), f"{label}'s weights"
    elif node.op_type == "MatMul" and position == 0 and spec.rank >= 2:
        other = types.shape(node.input[1])
        if other and len(other) >= 2 and isinstance(other[-2], int) and other[-2] > 0:
            yield spec.rank - 1, int(other[-2]), f"{label}'s weights"
    elif node.op_type == "Gemm" and position == 0 and spec.rank == 2:
        other = types.shape(node.input[1])
        if other and len(other) == 2:
            inner = other[1] if _attr(node, "transB", 0) else other[0]
            if isinstance(inner, int) and inner > 0:
                yield 1, int(inner), f"{label}'s weights"
    elif node.op_type in _ELEMENTWISE and len(node.input) >= 2:
        for other_name in node.input:
            if other_name == spec.name or other_name not in types.constants:
                continue
            other = types.shape(other_name) or []
            # Broadcasting aligns trailing axes; a constant's size > 1 is the size the input must have.
            for back in range(1, min(len(other), spec.rank) + 1):
                size = other[-back]
                if isinstance(size, int) and size > 1:
                    yield spec.rank - back, int(size), f"the constant '{other_name}' in {label}"


def _image_axes(spec: TensorSpec, sizes: Mapping[int, tuple[int, str]]) -> tuple[int, int] | None:
    """The spatial axes of an image-like input (rank 4 with 1, 3 or 4 channels), NCHW first."""
    if spec.rank != 4:
        return None

    def size(axis: int) -> Any:
        return spec.shape[axis] if isinstance(spec.shape[axis], int) else sizes.get(axis, (None, ""))[0]

    if size(1) in (1, 3, 4) or (size(1) is None and size(3) not in (1, 3, 4)):
        return (2, 3)
    if size(3) in (1, 3, 4):
        return (1, 2)
    return None


def _choices(
    spec: TensorSpec,
    hints: _Hints,
    symbols: Mapping[str, int],
    override: Sequence[int] | None,
    batch: int,
    image_sizes: Sequence[int] = IMAGE_SIZES,
) -> list[list[InputChoice]]:
    """The variants of one input, ``[shape level][value level]``, most plausible first."""
    dtype = np.dtype(spec.dtype)
    values: list[Any] = [_as_dtype(v, dtype) for v in hints.values] or [None]
    contradicts = override is not None and any(
        isinstance(d, int) and d >= 0 and d != int(o) for d, o in zip(spec.shape, override)
    )
    # An --input shape that contradicts the model is left to the fix_shapes pass to refuse, with its own message.
    if override is not None and len(override) == spec.rank and not contradicts:
        shape = tuple(int(d) for d in override)
        return [[InputChoice(spec.name, spec.dtype, shape, False, v, why="the shape given with --input") for v in values]]
    image = _image_axes(spec, hints.sizes)
    levels = max(len(image_sizes) + 1, len(OTHER_SIZES))
    shapes: list[list[int]] = [[] for _ in range(levels)]
    reasons: list[str] = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim >= 0:
            sizes = [dim]
        elif is_named_symbol(dim) and dim in symbols:
            sizes = [symbols[dim]]
        elif axis in hints.sizes:
            sizes = [hints.sizes[axis][0]]
            reasons.append(f"axis {axis} from {hints.sizes[axis][1]}")
        elif axis == 0 and spec.rank >= 2:
            sizes = [batch]
        elif image is not None and axis in image:
            sizes = list(image_sizes) + [TEXT_LINE[image.index(axis)]]
        elif image is not None and axis == 1 and image == (2, 3):
            sizes = [3]
        else:
            sizes = list(OTHER_SIZES)
        for index, shape in enumerate(shapes):
            shape.append(sizes[min(index, len(sizes) - 1)])
    batch_axis = spec.rank >= 2 and not (isinstance(spec.shape[0], int) and spec.shape[0] >= 0)
    low, high = 0, 10
    if dtype.kind in "iu" and hints.high is not None:
        high = hints.high
        reasons.append(hints.high_why)
    if hints.values:
        reasons.append(hints.value_why)
    why = "; ".join(reasons)
    grid: list[list[InputChoice]] = []
    for shape in shapes:
        row = [InputChoice(spec.name, spec.dtype, tuple(shape), batch_axis, v, low, high, why,
                           tuple(sorted(hints.batch_axes))) for v in values]
        if row not in grid:
            grid.append(row)
    return grid


def _as_dtype(value: Any, dtype: np.dtype) -> Any:
    if dtype.kind in "iu":
        return int(value)
    if dtype.kind == "f":
        return float(value)
    return bool(value) if dtype.kind == "b" else value


def _metadata_image_sizes(model: onnx.ModelProto) -> tuple[int, ...]:
    """An image size the model's metadata states (Ultralytics' ``imgsz: [640, 640]``, ``image_size: 224``), tried first."""
    for prop in model.metadata_props:
        if prop.key.lower() not in _IMAGE_SIZE_KEYS:
            continue
        numbers = [int(n) for n in re.findall(r"\d+", prop.value)]
        if numbers and all(8 <= n <= 8192 for n in numbers):
            return (max(numbers[-2:]),) + tuple(n for n in IMAGE_SIZES if n != max(numbers[-2:]))
    return IMAGE_SIZES
