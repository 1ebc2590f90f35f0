"""Facts read off a ``torch.export`` program before (or without) its ONNX conversion.

While a torch source's ONNX export runs alongside the build (``onnx_job.py``), the build still
needs what the converted graph would have told it: the signature, the bounds of integer inputs
that index tables, and the modules whose container types the program's inputs and outputs use.
"""

from __future__ import annotations

import re
from typing import Any

from ..signature import Signature, TensorSpec
from . import _convert as cv

# torch dtypes a signature read off a program may hold; anything else is left to the ONNX conversion.
_SIGNATURE_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def program_signature(program: Any, in_names: list[str], out_names: list[str]) -> Signature | None:
    """The signature the ONNX conversion of ``program`` will have, read off the program's own tensors.

    Symbolic dims get the names ``torch_to_onnx.name_dims`` gives the ONNX ones ('batch' for leading axes,
    '<input>_<axis>' else). None where the program has something the conversion may name
    differently (an output dim that is an expression, a non-tensor input or output, another dtype):
    the import then converts before returning, as without ``onnx_in_background``.
    """
    torch = cv.torch()
    from torch.export.graph_signature import InputKind, OutputKind

    nodes = {node.name: node for node in program.graph.nodes}
    inputs = [nodes.get(s.arg.name) for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    output_node = next(node for node in program.graph.nodes if node.op == "output")
    outputs = [arg for spec, arg in zip(program.graph_signature.output_specs, output_node.args[0])
               if spec.kind == OutputKind.USER_OUTPUT]
    if len(inputs) != len(in_names) or len(outputs) != len(out_names):
        return None
    symbols: dict[Any, str] = {}

    def spec(node: Any, name: str, is_input: bool) -> TensorSpec | None:
        value = getattr(node, "meta", {}).get("val")
        if not isinstance(value, torch.Tensor):
            return None
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in _SIGNATURE_DTYPES:
            return None
        dims: list[Any] = []
        for axis, size in enumerate(value.shape):
            if isinstance(size, int):
                dims.append(size)
                continue
            expr = size.node.expr
            if is_input and expr.is_Symbol and expr not in symbols:
                symbols[expr] = "batch" if axis == 0 else re.sub(r"\W", "_", f"{name}_{axis}")
            if expr not in symbols:
                return None
            dims.append(symbols[expr])
        return TensorSpec(name, dtype, tuple(dims))

    in_specs = [spec(node, name, True) for node, name in zip(inputs, in_names)]
    out_specs = [spec(node, name, False) for node, name in zip(outputs, out_names)]
    if any(s is None for s in in_specs + out_specs):
        return None
    return Signature(tuple(in_specs), tuple(out_specs))  # type: ignore[arg-type]


def index_limits(program: Any, in_names: list[str]) -> dict[str, tuple[int, str]]:
    """Integer inputs used directly as row indices (embedding lookups, index_select): input -> (rows, why).

    What the ONNX graph's Gather nodes tell the input plan (graph/input_plan.py), read off the torch
    program instead, so inputs generated before the conversion finishes stay inside the tables.
    """
    from torch.export.graph_signature import InputKind

    aten = cv.torch().ops.aten
    users = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    public = dict(zip(users, in_names))
    limits: dict[str, tuple[int, str]] = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.embedding.default:
            table, index, axis = node.args[0], node.args[1], 0
        elif node.target == aten.index_select.default:
            table, axis, index = node.args[0], int(node.args[1]), node.args[2]
        else:
            continue
        name = public.get(getattr(index, "name", None))
        size = getattr(getattr(table, "meta", {}).get("val"), "shape", None)
        if name is None or size is None or not isinstance(size[axis], int):
            continue
        rows = int(size[axis])
        if name not in limits or rows < limits[name][0]:
            limits[name] = (rows, f"indices into '{table.name}' ({rows} rows)")
    return limits


def container_modules(program: Any) -> list[str]:
    """Modules (other than torch's and the standard library's) defining the program's input/output containers."""
    found: dict[str, None] = {}

    def walk(spec: Any) -> None:
        kind = getattr(spec, "type", None)
        module = getattr(kind, "__module__", "") or ""
        if module and module.split(".")[0] not in ("builtins", "collections", "torch", "typing"):
            found[module] = None
        for child in (spec.children() if spec is not None else ()):
            walk(child)

    walk(program.call_spec.in_spec)
    walk(program.call_spec.out_spec)
    return list(found)
