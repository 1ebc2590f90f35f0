"""Small helpers on ONNX protos shared by the graph modules (no backend library here)."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..signature import Dim

Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def infer_shapes(model: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    """The model with value_info filled by ONNX shape inference; best effort unless ``strict``."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=strict, strict_mode=strict, data_prop=True)
    except Exception:
        if strict:
            raise
        return model


def dims_of(type_proto: onnx.TypeProto) -> list[Dim] | None:
    """Dims of a tensor type: int, symbolic name, or None; ``None`` when the rank is unknown."""
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def dtype_name(elem_type: int) -> str:
    if not elem_type:
        return "?"
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


class TensorTypes:
    """Element type and dims of every named tensor of a (shape-inferred) graph."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.elem: dict[str, int] = {}
        self.dims: dict[str, list[Dim] | None] = {}
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.constants: dict[str, onnx.TensorProto] = dict(self.initializers)
        for value in list(graph.input) + list(graph.value_info) + list(graph.output):
            if value.type.HasField("tensor_type"):
                elem = value.type.tensor_type.elem_type
                if elem:
                    self.elem.setdefault(value.name, elem)
                dims = dims_of(value.type)
                if dims is not None and self.dims.get(value.name) is None:
                    self.dims[value.name] = dims
        for init in graph.initializer:
            self.elem[init.name] = init.data_type
            self.dims[init.name] = list(init.dims)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self.constants[node.output[0]] = attr.t
                        self.elem.setdefault(node.output[0], attr.t.data_type)
                        self.dims.setdefault(node.output[0], list(attr.t.dims))

    def dtype(self, name: str) -> str:
        return dtype_name(self.elem.get(name, 0))

    def shape(self, name: str) -> list[Dim] | None:
        return self.dims.get(name)

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        if tensor is None:
            return None
        try:
            return numpy_helper.to_array(tensor)
        except Exception:  # noqa: BLE001 - unusual storage (external data not loaded)
            return None


def node_labels(model: onnx.ModelProto) -> list[str]:
    """A unique label per node: its name, ``<unnamed #i>`` when empty, ``name#i`` when repeated."""
    from ..backends.base import node_names

    return node_names(model)


def user_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    weights = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in weights]


def produced_tensors(graph: onnx.GraphProto) -> dict[str, int]:
    """tensor name -> index of the node producing it."""
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def all_tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    names |= set(produced_tensors(graph))
    return names


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever is not in ``taken`` (then added to it)."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def closest(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a near miss, else ``""``."""
    candidates = list(candidates)
    lowered = {c.lower(): c for c in candidates}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean '{lowered[match[0]]}'?)" if match else ""


def listing(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    text = ", ".join(names[:limit])
    return text + (f" and {len(names) - limit} more" if len(names) > limit else "") if names else "none"


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def rename_uses(graph: onnx.GraphProto, old: str, new: str, *, outputs: bool = False) -> None:
    """Replace tensor name ``old`` by ``new`` in node inputs (and outputs), recursing into subgraphs."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        if outputs:
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new
        for sub in subgraphs(node):
            # A subgraph that defines the name itself shadows the outer one.
            local = {v.name for v in sub.input} | {t.name for t in sub.initializer} | set(produced_tensors(sub))
            if old not in local:
                rename_uses(sub, old, new)


def consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """tensor name -> indices of nodes reading it (including reads from inside subgraphs)."""
    uses: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        names = set(node.input) | outer_scope_names(node)
        for name in names:
            if name:
                uses.setdefault(name, []).append(i)
    return uses


def outer_scope_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    found: set[str] = set()
    for sub in subgraphs(node):
        local = {v.name for v in sub.input} | {t.name for t in sub.initializer}
        for inner in sub.node:
            for name in list(inner.input) + sorted(outer_scope_names(inner)):
                if name and name not in local:
                    found.add(name)
            local |= set(inner.output)
    return found


def copy_model_frame(source: onnx.ModelProto, graph: onnx.GraphProto) -> onnx.ModelProto:
    """A model around ``graph`` with the opsets, IR version, functions and metadata of ``source``."""
    model = helper.make_model(graph, opset_imports=list(source.opset_import))
    model.ir_version = source.ir_version
    model.producer_name = source.producer_name
    model.producer_version = source.producer_version
    model.domain = source.domain
    model.model_version = source.model_version
    model.doc_string = source.doc_string
    model.functions.extend(source.functions)
    model.metadata_props.extend(source.metadata_props)
    return model


def opset_of(model: onnx.ModelProto, domain: str = "") -> int | None:
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(entry.version)
    return None


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the named tensors (those with a known element type)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    types = TensorTypes(infer_shapes(out))
    present = {o.name for o in out.graph.output}
    inputs = {v.name for v in out.graph.input}
    for name in names:
        if name in present or name in inputs or not types.elem.get(name):
            continue
        out.graph.output.append(helper.make_tensor_value_info(name, types.elem[name], None))
        present.add(name)
    return out


def intermediate_names(model: onnx.ModelProto) -> list[str]:
    """Outputs of every top-level node, in node order."""
    return [out for node in model.graph.node for out in node.output if out]


def plain_runner(model: onnx.ModelProto, quiet: bool = False) -> Runner:
    """Run a model on a default ONNX Runtime CPU session, through the backend module (lazily imported).

    ``quiet``: ONNX Runtime logs nothing when a run fails (the caller reports the failure).
    """
    from ..backends import onnxruntime as ort_backend

    return ort_backend.plain_session_runner(model.SerializeToString(), quiet=quiet)


def resolve_shape(dims: list[Dim] | None, sizes: Mapping[str, int] | None = None, default: int = 1) -> tuple[int, ...] | None:
    if dims is None:
        return None
    sizes = sizes or {}
    out = []
    for d in dims:
        if isinstance(d, int) and d >= 0:
            out.append(d)
        elif isinstance(d, str) and d in sizes:
            out.append(int(sizes[d]))
        else:
            out.append(default)
    return tuple(out)


def random_array(dtype: np.dtype, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    raise TypeError(f"cannot generate random data of dtype {dtype}")


def attribute_summary(node: onnx.NodeProto, limit: int = 6) -> dict[str, Any]:
    """Attributes as plain values (tensors and graphs shortened), for reports."""
    out: dict[str, Any] = {}
    for attr in list(node.attribute)[:limit]:
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            out[attr.name] = "<graph>"
        elif attr.type == onnx.AttributeProto.TENSOR:
            out[attr.name] = f"<tensor {list(attr.t.dims)}>"
        else:
            value = helper.get_attribute_value(attr)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            elif isinstance(value, list):
                value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
            out[attr.name] = value
    return out
