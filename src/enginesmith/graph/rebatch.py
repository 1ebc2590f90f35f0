"""Let a model exported at batch 1 carry a batch: rewrite the constants that bake the 1 in.

Exporters that fix the batch at 1 (tf2onnx on TensorFlow Object Detection API graphs, many
detector exports) write Reshape targets such as ``[1, -1, 4]``. Once the input's axis 0 is
dynamic those either fail at batch N or, worse, fold the batch into another axis. A target whose
first element is 1, reshaping data whose dim 0 is 1 at batch 1, gets 0 there instead ("copy dim 0
from the data"): identical at batch 1, and at batch N the batch carries through. Whether the whole
model then treats every batch item on its own is for the numerical check (per item, against the
model at batch 1) to decide, not for this rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._onnx import TensorTypes, all_tensor_names, consumers, infer_shapes, listing, unique_name


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Tensors whose value is fixed: initializers no graph input overrides, and Constant nodes' values."""
    inputs = {v.name for v in graph.input}
    fixed = {t.name: t for t in graph.initializer if t.name not in inputs}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    fixed[node.output[0]] = attr.t
    return fixed


def _values(tensor: onnx.TensorProto) -> np.ndarray | None:
    try:
        return numpy_helper.to_array(tensor)
    except Exception:  # noqa: BLE001 - external data not loaded, odd storage: leave it alone
        return None


def _reshape_allowzero(node: onnx.NodeProto) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "allowzero"), 0)


def carry_batch(model: onnx.ModelProto, batch_inputs: set[str]) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` (at batch 1, its inputs ``batch_inputs`` about to get a dynamic axis 0) with Reshape
    targets ``[1, ...]`` turned into ``[0, ...]``, and one note per kind of rewrite made.

    Only the top-level graph is rewritten. A target constant that something else also reads gets a
    new initializer, so no other reader changes. The argument is not modified.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not batch_inputs:
        return out, []
    graph = out.graph
    dims = TensorTypes(infer_shapes(model))
    constants = _constant_tensors(graph)
    readers = consumers(graph)
    outputs = {o.name for o in graph.output}
    taken = all_tensor_names(graph)
    rewritten: list[str] = []
    for node in graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        if _reshape_allowzero(node):
            continue  # a 0 in the target would mean a zero-sized axis, not "copy"
        data_dims = dims.shape(node.input[0])
        if not data_dims or data_dims[0] != 1:
            continue
        tensor = constants.get(node.input[1])
        target = _values(tensor) if tensor is not None else None
        if target is None or target.ndim != 1 or target.size == 0 or target[0] != 1:
            continue
        new_target = target.copy()
        new_target[0] = 0
        shared = len(readers.get(node.input[1], [])) > 1 or node.input[1] in outputs
        if shared:
            name = unique_name(f"{node.input[1]}_batch", taken)
            graph.initializer.append(numpy_helper.from_array(new_target.astype(target.dtype), name))
            node.input[1] = name
        else:
            tensor.CopyFrom(numpy_helper.from_array(new_target.astype(target.dtype), tensor.name))
        rewritten.append(node.name or node.output[0])
    notes = []
    if rewritten:
        notes.append(f"batch carried through {len(rewritten)} Reshape target(s) [1, ...] -> [0, ...]: "
                     f"{listing(rewritten, limit=4)}")
    return out, notes


__all__ = ["carry_batch"]
