"""ONNX GRU and LSTM on the PyTorch backend (backends/torch_compile/onnx_rnn.py), each variant against ONNX
Runtime on one-node models: directions, linear_before_reset, layouts, initial states, peepholes, the outputs a
node asks for; and the variants it refuses, with the reason."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import onnx
import pytest
from conftest import run_plain
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed", allow_module_level=True)

from enginesmith.backends import BuildOptions, get_backend  # noqa: E402
from enginesmith.errors import UnsupportedModelError  # noqa: E402
from enginesmith.importers import import_model  # noqa: E402

EAGER = BuildOptions(backend_options={"device": os.environ.get("ENGINESMITH_TEST_DEVICE", "cpu"), "compile": "eager"})
SEQ, BATCH, INPUT, HIDDEN = 5, 3, 4, 6


def recurrent_model(op: str, *, direction: str = "forward", layout: int = 0, bias: bool = True, initial: bool = False,
                    peepholes: bool = False, sequence_lens: bool = False, outputs: tuple[str, ...] = ("y", "y_h"),
                    **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    gates = 3 if op == "GRU" else 4
    dirs = 2 if direction == "bidirectional" else 1
    x_shape = [SEQ, BATCH, INPUT] if layout == 0 else [BATCH, SEQ, INPUT]
    state_shape = [dirs, BATCH, HIDDEN] if layout == 0 else [BATCH, dirs, HIDDEN]
    inits = [numpy_helper.from_array((rng.standard_normal((dirs, gates * HIDDEN, INPUT)) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((dirs, gates * HIDDEN, HIDDEN)) * 0.5).astype(np.float32), "R")]
    names = ["x", "W", "R"]
    if bias:
        inits.append(numpy_helper.from_array((rng.standard_normal((dirs, 2 * gates * HIDDEN)) * 0.3).astype(np.float32), "B"))
    names.append("B" if bias else "")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    if sequence_lens:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [BATCH]))
    names.append("lens" if sequence_lens else "")
    if initial:
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, state_shape))
    names.append("h0" if initial else "")
    if op == "LSTM":
        if initial:
            inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, state_shape))
        names.append("c0" if initial else "")
        if peepholes:
            inits.append(numpy_helper.from_array((rng.standard_normal((dirs, 3 * HIDDEN)) * 0.3).astype(np.float32), "P"))
        names.append("P" if peepholes else "")
    while names[-1] == "":
        names.pop()
    node = helper.make_node(op, names, list(outputs), hidden_size=HIDDEN, direction=direction, layout=layout, **attrs)
    graph = helper.make_graph([node], op.lower(), inputs,
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs if n], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def feeds_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    out = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        out[value.name] = (np.full(shape, SEQ, np.int32) if value.name == "lens"
                           else rng.standard_normal(shape).astype(np.float32))
    return out


def assert_matches_onnxruntime(model: onnx.ModelProto) -> None:
    imported = import_model(model)
    backend = get_backend("torch")
    result = backend.build(imported.model, imported.signature, EAGER)
    engine = backend.load(result.payload, result.resolved_options, imported.signature)
    feeds = feeds_for(model)
    want, got = run_plain(model, feeds), engine.run(feeds)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("linear_before_reset", [0, 1])
def test_gru_every_direction_both_reset_orders(direction, linear_before_reset):
    assert_matches_onnxruntime(recurrent_model("GRU", direction=direction, linear_before_reset=linear_before_reset))


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_lstm_every_direction(direction):
    assert_matches_onnxruntime(recurrent_model("LSTM", direction=direction, outputs=("y", "y_h", "y_c")))


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_initial_states_and_no_bias(op):
    assert_matches_onnxruntime(recurrent_model(op, direction="bidirectional", bias=False, initial=True))


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_batch_first_layout_gives_the_sequence_first_results_transposed(op):
    """ONNX Runtime's CPU kernels refuse layout=1 ("Batchwise recurrent operations are not supported"): the
    reference is the same node at layout 0 on transposed inputs."""
    outputs = ("y", "y_h") + (("y_c",) if op == "LSTM" else ())
    batch_first = recurrent_model(op, direction="bidirectional", layout=1, initial=True, outputs=outputs)
    sequence_first = recurrent_model(op, direction="bidirectional", layout=0, initial=True, outputs=outputs)
    feeds = feeds_for(batch_first)
    imported = import_model(batch_first)
    backend = get_backend("torch")
    result = backend.build(imported.model, imported.signature, EAGER)
    got = backend.load(result.payload, result.resolved_options, imported.signature).run(feeds)
    want = run_plain(sequence_first, {name: value.swapaxes(0, 1) for name, value in feeds.items()})
    np.testing.assert_allclose(got["y"], want["y"].transpose(2, 0, 1, 3), rtol=1e-4, atol=1e-5)
    for name in outputs[1:]:
        np.testing.assert_allclose(got[name], want[name].swapaxes(0, 1), rtol=1e-4, atol=1e-5)


def test_lstm_peepholes_and_initial_cell():
    assert_matches_onnxruntime(recurrent_model("LSTM", initial=True, peepholes=True, outputs=("y", "y_h", "y_c")))


@pytest.mark.parametrize("outputs", [("y",), ("", "y_h"), ("", "", "y_c")])
def test_only_the_outputs_the_node_names(outputs):
    op = "LSTM" if len(outputs) == 3 else "GRU"
    assert_matches_onnxruntime(recurrent_model(op, outputs=outputs))


@pytest.mark.parametrize("model, reason", [
    (lambda: recurrent_model("GRU", sequence_lens=True), "sequence_lens"),
    (lambda: recurrent_model("GRU", clip=2.0), "clip"),
    (lambda: recurrent_model("LSTM", activations=["Relu", "Tanh", "Tanh"]), "activations"),
    (lambda: recurrent_model("LSTM", input_forget=1), "input_forget"),
])
def test_variants_it_cannot_run_are_refused_with_the_reason(model, reason):
    imported = import_model(model())
    with pytest.raises(UnsupportedModelError, match=reason):
        get_backend("torch").build(imported.model, imported.signature, EAGER)
