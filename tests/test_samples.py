"""The sample model builders: valid ONNX, runnable in onnxruntime, finite and input-dependent outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from enginesmith import samples

# name -> (builder kwargs, {output name: shape without the batch dim})
CASES = {
    "small_cnn": ({}, {"probs": (10,)}),
    "two_input_two_output": ({}, {"score": (1,), "features": (4,)}),
    "mobilenet_v2_like": ({"image_size": 64}, {"logits": (1000,)}),
    "resnet50_like": ({"image_size": 64, "num_classes": 20}, {"logits": (20,)}),
    "tiny_mlp": ({}, {"y": (4,)}),
}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(session: ort.InferenceSession, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        i.name: rng.standard_normal([batch if isinstance(d, str) or d is None else d for d in i.shape]).astype(np.float32)
        for i in session.get_inputs()
    }


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request):
    kwargs, outputs = CASES[request.param]
    model = getattr(samples, request.param)(**kwargs)
    return request.param, model, outputs, _session(model)


def test_model_is_valid(built):
    name, model, outputs, _ = built
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 9
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert [o.name for o in model.graph.output] == list(outputs)
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    node_names = [n.name for n in model.graph.node]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    assert all(init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL) for init in model.graph.initializer)


@pytest.mark.parametrize("batch", [1, 2])
def test_model_runs(built, batch):
    name, model, outputs, session = built
    assert [o.name for o in session.get_outputs()] == list(outputs)
    first = dict(zip(outputs, session.run(None, _feeds(session, batch, seed=1))))
    second = dict(zip(outputs, session.run(None, _feeds(session, batch, seed=2))))
    for out, shape in outputs.items():
        assert first[out].shape == (batch, *shape) and first[out].dtype == np.float32
        assert np.isfinite(first[out]).all() and np.isfinite(second[out]).all()
        assert not np.allclose(first[out], second[out], rtol=0, atol=1e-6), f"{name}.{out} does not depend on its input"
        if first[out].size > 1:
            assert np.ptp(first[out]) > 0, f"{name}.{out} is constant"
    if name == "small_cnn":
        np.testing.assert_allclose(first["probs"].sum(axis=1), 1.0, rtol=1e-5)
        assert (first["probs"] > 0).all()
    if name == "two_input_two_output":
        assert ((first["score"] > 0) & (first["score"] < 1)).all()


def test_seed_and_options():
    a, b, c = samples.tiny_mlp(seed=0), samples.tiny_mlp(seed=0), samples.tiny_mlp(seed=1)
    assert a.SerializeToString() == b.SerializeToString()
    assert a.graph.initializer[0].raw_data != c.graph.initializer[0].raw_data

    static = samples.small_cnn(num_classes=3, image_size=12, channels=3, dynamic_batch=False)
    dims = [d.dim_value for d in static.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 12, 12]
    session = _session(static)
    (probs,) = session.run(None, _feeds(session, 1, seed=0))
    assert probs.shape == (1, 3)


def test_architecture_details():
    cnn = samples.small_cnn()
    ops = [n.op_type for n in cnn.graph.node]
    assert ops.count("BatchNormalization") == 2 and "Dropout" in ops and ops[-1] == "Softmax"

    mobilenet = samples.mobilenet_v2_like(image_size=32, width=0.5, num_classes=7)
    ops = [n.op_type for n in mobilenet.graph.node]
    assert ops.count("Add") == 10  # residual connections of the standard MobileNetV2 table
    assert ops.count("Clip") == 35 and ops.count("BatchNormalization") == 52
    assert any(n.name == "stage2.block2.depthwise" for n in mobilenet.graph.node)

    resnet = samples.resnet50_like(image_size=32, num_classes=5)
    convs = [n for n in resnet.graph.node if n.op_type == "Conv"]
    assert len(convs) == 53 and sum(n.op_type == "Add" for n in resnet.graph.node) == 16
    # v1.5: the stride of a downsampling bottleneck sits in its 3x3 conv
    conv2 = next(n for n in convs if n.name == "stage2.block1.conv2")
    assert onnx.helper.get_attribute_value(next(a for a in conv2.attribute if a.name == "strides")) == [2, 2]


def test_save(tmp_path):
    path = samples.save(samples.tiny_mlp(), tmp_path / "a" / "b" / "mlp.onnx")
    assert path.exists()
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
