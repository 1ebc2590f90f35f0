"""Small ONNX models built in code, shared by the foundation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper


def make_mlp(batch: int | str = "batch", seed: int = 0, in_features: int = 6, out_features: int = 4) -> onnx.ModelProto:
    """x[batch, in] -> MatMul/Add -> Relu -> MatMul/Add -> Softmax -> probs[batch, out]."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.standard_normal((in_features, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((8, out_features)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(out_features).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["h2"], name="fc1_bias"),
        helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
        helper.make_node("MatMul", ["h3", "w2"], ["h4"], name="fc2"),
        helper.make_node("Add", ["h4", "b2"], ["logits"], name="fc2_bias"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, out_features])],
        weights,
    )
    return _finish(graph)


def make_two_in_two_out(seed: int = 0) -> onnx.ModelProto:
    """left[batch,3], right[batch,3] -> sum: Add then MatMul; ids: int64 ArgMax of right."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((3, 2)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Add", ["left", "right"], ["s"], name="add"),
        helper.make_node("MatMul", ["s", "w"], ["score"], name="head"),
        helper.make_node("ArgMax", ["right"], ["ids"], name="argmax", axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "two_in_two_out",
        [
            helper.make_tensor_value_info("left", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("right", TensorProto.FLOAT, ["batch", 3]),
        ],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]),
        ],
        [w],
    )
    return _finish(graph)


def make_int_input_model() -> onnx.ModelProto:
    """ids[batch, 4] int64 -> Cast to float -> ReduceSum -> total[batch, 1]."""
    nodes = [
        helper.make_node("Cast", ["ids"], ["f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["f", "axes"], ["total"], name="sum", keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "int_input",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    return _finish(graph)


def make_unsupported_op_model() -> onnx.ModelProto:
    """A node of a custom domain that no backend registers."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("FancyActivation", ["r"], ["y"], name="fancy_1", domain="com.example"),
    ]
    graph = helper.make_graph(
        nodes,
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return _finish(graph, extra_opsets=[helper.make_opsetid("com.example", 1)])


def _finish(graph: onnx.GraphProto, extra_opsets: list | None = None) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)] + (extra_opsets or []))
    model.ir_version = 9
    return model


def run_plain(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The independent reference: a default ONNX Runtime session."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(make_mlp(), path)
    return path


@pytest.fixture
def mlp_engine_path(tmp_path: Path, mlp_path: Path) -> Path:
    import enginesmith as es

    target = tmp_path / "mlp.engine"
    es.build(mlp_path).save(target)
    return target


@pytest.fixture
def wide_console():
    """Tables as on a wide terminal, whatever COLUMNS the tests run under."""
    from enginesmith.cli.app import console

    saved = console._width
    console.width = 160
    yield
    console._width = saved


def device_less_tensors(module, *inputs) -> list[str]:
    """The tensor factories (torch.tensor, arange, eye, zeros...) that ``module(*inputs)`` calls with no device.

    Each such tensor lands on the CPU whatever the engine's device: on CUDA it meets the GPU tensors and
    fails ("Tensor on device cpu is not on the expected device cuda:0"). CI has no GPU, so this is how the
    CPU tests see that class of bug."""
    import torch
    from torch.overrides import TorchFunctionMode

    factories = {torch.tensor, torch.as_tensor, torch.arange, torch.eye, torch.zeros, torch.ones, torch.full,
                 torch.empty, torch.rand, torch.randn, torch.linspace}
    seen: list[str] = []

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in factories and kwargs.get("device") is None:
                seen.append(func.__name__)
            return func(*args, **kwargs)

    with torch.no_grad(), Recorder():
        module(*inputs)
    return seen
