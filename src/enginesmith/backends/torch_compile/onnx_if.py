"""ONNX ``If`` whose condition torch.export can decide from shapes (``torch_compile`` package).

PyTorch's exporters write ``x.squeeze(d)`` as ``If(Shape(x)[d] == 1, Squeeze, Identity)`` and
similar guards on sizes; onnx2torch 1.5.15 has no ``If`` converter, so such models could not
reach the PyTorch backend at all. Each branch becomes its own converted module taking the outer
values the branch reads; the node runs the branch its condition picks. ``onnx_shape_values`` turns
the shape arithmetic and ``Equal`` in front of the condition into Python values, so tracing takes
the branch the served shapes pick (torch.export records the guard). A condition computed from
tensor *values* (a sample-rate input, say) is data-dependent: the export then fails with the
backend's usual "needs a model without data-dependent shapes" message.
"""

from __future__ import annotations

import contextvars
import functools
from contextlib import contextmanager
from typing import Any, Iterator

import onnx

from ...graph._onnx import outer_scope_names
from .common import _torch

# The opset imports of the model being converted: a branch is converted as a model of its own.
CONVERTING_OPSETS: contextvars.ContextVar[tuple] = contextvars.ContextVar("enginesmith_converting_opsets", default=())


@contextmanager
def converting(model: onnx.ModelProto) -> Iterator[None]:
    """While ``model`` is being converted (or its nodes probed), If converts its branches with its opsets."""
    token = CONVERTING_OPSETS.set(tuple((o.domain, o.version) for o in model.opset_import))
    try:
        yield
    finally:
        CONVERTING_OPSETS.reset(token)


@functools.lru_cache(maxsize=None)
def _modules() -> dict[str, Any]:
    torch = _torch()

    class OnnxIf(torch.nn.Module):
        """Runs ``then_branch`` or ``else_branch`` on the outer values, as the condition says."""

        def __init__(self, then_branch: Any, else_branch: Any):
            super().__init__()
            self.then_branch, self.else_branch = then_branch, else_branch

        def forward(self, cond, *values):
            if isinstance(cond, (list, tuple)):  # a one-element shape value (onnx_shape_values' lowering)
                if len(cond) != 1:
                    raise ValueError(f"If needs a one-element condition, got {len(cond)} values")
                cond = cond[0]
            taken = self.then_branch if bool(cond) else self.else_branch
            return taken(*values)

    return {"if": OnnxIf}


def _branch_model(branch: onnx.GraphProto, reads: list[str], value_info: dict, weights: list) -> onnx.ModelProto:
    """The branch as a model: the outer values it reads are its inputs, the outer weights its initializers
    (converters read weights as initializers: a Conv's)."""
    from onnx import helper

    inputs = []
    for name in reads:
        known = value_info.get(name)
        if known is not None and known.type.HasField("tensor_type"):
            inputs.append(known)
        else:  # the type is only needed for the branch's shape inference
            inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(list(branch.node), branch.name or "branch", inputs, list(branch.output),
                              list(branch.initializer) + list(weights), value_info=list(branch.value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in CONVERTING_OPSETS.get()])
    model.ir_version = onnx.IR_VERSION  # new enough for any opset the outer model imports
    return model


def convert_if(node: Any, graph: Any) -> Any:
    """onnx2torch converter for If (opsets 1, 11, 13, 16, 19, 21)."""
    from onnx2torch import convert
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    if not CONVERTING_OPSETS.get():
        raise NotImplementedError("If is converted only inside enginesmith's ONNX conversion")
    branches = {a.name: a.g for a in node.proto.attribute if a.name in ("then_branch", "else_branch")}
    reads = sorted(outer_scope_names(node.proto))  # what either branch reads from the enclosing graphs
    weights = [graph.initializers[n].proto for n in reads if n in graph.initializers]
    reads = [n for n in reads if n not in graph.initializers]
    converted = {name: convert(_branch_model(sub, reads, dict(graph.value_info), weights)) for name, sub in branches.items()}
    module = _modules()["if"](converted["then_branch"], converted["else_branch"])
    mapping = OnnxMapping(inputs=(node.input_values[0], *reads), outputs=tuple(node.output_values))
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping)
