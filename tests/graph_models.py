"""Tiny ONNX graphs built in code for the graph tests (inspect, passes, surgery, compat, layer-wise)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits=(), opset: int = 17, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] + list(extra_opsets))
    model.ir_version = 8
    if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
        # Outputs given without a shape get the inferred one (the checker wants a shape).
        inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
        for out in model.graph.output:
            if not out.type.tensor_type.HasField("shape") and inferred[out.name].type.tensor_type.HasField("shape"):
                out.CopyFrom(inferred[out.name])
    onnx.checker.check_model(model)
    return model


def _t(rng, name, *shape, positive=False):
    data = rng.standard_normal(shape).astype(np.float32)
    return numpy_helper.from_array(np.abs(data) + 0.5 if positive else data, name)


def conv_bn_model(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(8,3x3,pad 1, bias) -> BatchNorm -> Relu -> Dropout -> Identity -> Conv(no bias) -> BN -> + residual -> y."""
    rng = np.random.default_rng(seed)
    inits = [
        _t(rng, "w1", 8, 3, 3, 3), _t(rng, "b1", 8),
        _t(rng, "s1", 8), _t(rng, "o1", 8), _t(rng, "m1", 8), _t(rng, "v1", 8, positive=True),
        _t(rng, "w2", 8, 8, 3, 3),
        _t(rng, "s2", 8), _t(rng, "o2", 8), _t(rng, "m2", 8), _t(rng, "v2", 8, positive=True),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c1", "s1", "o1", "m1", "v1"], ["bn1"], name="bn1", epsilon=1e-3),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Dropout", ["r1"], ["d1"], name="drop1"),
        helper.make_node("Identity", ["d1"], ["i1"], name="ident1"),
        helper.make_node("Conv", ["i1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "s2", "o2", "m2", "v2"], ["bn2"], name="bn2"),
        helper.make_node("Add", ["bn2", "i1"], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["y"], name="relu_out"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 8, 8])], inits)


def gemm_bn_model(seed: int = 1, trans_b: int = 1, with_c: bool = True) -> onnx.ModelProto:
    """x[N,6] -> Gemm(alpha .5, beta 2) -> BatchNorm -> Sigmoid -> y[N,5]."""
    rng = np.random.default_rng(seed)
    inits = [_t(rng, "W", *((5, 6) if trans_b else (6, 5))), _t(rng, "s", 5), _t(rng, "o", 5), _t(rng, "m", 5),
             _t(rng, "v", 5, positive=True)]
    gemm_inputs = ["x", "W"]
    if with_c:
        inits.append(_t(rng, "C", 5))
        gemm_inputs.append("C")
    nodes = [
        helper.make_node("Gemm", gemm_inputs, ["g"], name="fc", transB=trans_b, alpha=0.5, beta=2.0),
        helper.make_node("BatchNormalization", ["g", "s", "o", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Sigmoid", ["bn"], ["y"], name="act"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)


def concat_model(seed: int = 2) -> onnx.ModelProto:
    """a[N,4,6], b[N,4,3] -> Concat on the last (non-channel) axis -> Mul by a constant folded from Constant+Add -> Identity -> y."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Constant", [], ["k1"], name="k1", value=numpy_helper.from_array(rng.standard_normal(9).astype(np.float32))),
        helper.make_node("Constant", [], ["k2"], name="k2", value=numpy_helper.from_array(np.float32(0.5))),
        helper.make_node("Add", ["k1", "k2"], ["k"], name="const_add"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=-1),
        helper.make_node("Mul", ["cat", "k"], ["scaled"], name="scale"),
        helper.make_node("Identity", ["scaled"], ["y"], name="out_identity"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4, 6]),
                          helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4, 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 9])])


def dead_branch_model() -> onnx.ModelProto:
    """x -> Relu -> y, plus a Sigmoid nobody reads."""
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"), helper.make_node("Sigmoid", ["x"], ["unused"], name="dead")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])


def custom_op_model() -> onnx.ModelProto:
    """x -> Relu -> com.example:FancyActivation -> y: an op no backend supports."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("FancyActivation", ["r"], ["y"], name="fancy", domain="com.example")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    return model


def matmul_model() -> onnx.ModelProto:
    """x[N,5] @ W[5,3] -> y[N,3]."""
    w = numpy_helper.from_array(np.arange(15, dtype=np.float32).reshape(5, 3) / 10, "W")
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def feeds_for(model: onnx.ModelProto, batch: int = 3, seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in weights:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]
