"""Precision rewrites of an ONNX graph: fp16 weights and activations with fp32 islands.

Shared by the backends that build fp16 engines from a rewritten graph (ONNX Runtime's CUDA
provider, TensorRT's strongly typed networks). The rewrite is onnxruntime's offline ONNX tool
(``onnxruntime.transformers.float16``), a graph-to-graph converter: no session is created.
"""

from __future__ import annotations

import onnx

from ..errors import MissingDependencyError

# Ops kept in fp32 on top of onnxruntime's default block list: reductions, normalizations and
# exponentials lose too much in fp16, and index-producing ops must see exact values.
FP16_KEEP_FP32 = ["Softmax", "LogSoftmax", "LayerNormalization", "Exp", "Log", "Pow", "Sqrt", "Reciprocal",
                  "ReduceMean", "ReduceSum", "ReduceProd", "ReduceLogSumExp", "TopK", "NonMaxSuppression", "Range"]


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations, fp32 inputs/outputs and numerically sensitive ops."""
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError:
        raise MissingDependencyError("the fp16 graph rewrite needs onnxruntime: pip install onnxruntime") from None

    return convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + FP16_KEEP_FP32
    )
