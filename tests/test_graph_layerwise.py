"""Layer-wise debugging: the first layer whose output diverges, with the numbers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graph_models import conv_bn_model, feeds_for
from onnx import numpy_helper

import enginesmith as es
from enginesmith.backends import BuildOptions, get_backend
from enginesmith.graph.layerwise import _recorded_specs, compare_layerwise, layerwise_for_engine
from enginesmith.graph.passes import optimize
from enginesmith.validate import tolerance_for


def test_identical_engine_passes_every_layer():
    model = conv_bn_model()
    report = compare_layerwise(model, "onnxruntime", BuildOptions(), feeds_for(model))
    assert report.passed and report.first_divergent is None
    assert [layer.tensor for layer in report.layers] == ["c1", "bn1", "r1", "d1", "i1", "c2", "bn2", "sum", "y"]
    assert [layer.index for layer in report.layers] == sorted(layer.index for layer in report.layers)
    assert "within tolerance" in report.summary()
    json.loads(report.to_json())


def test_a_wrong_weight_is_found_at_its_layer():
    model = conv_bn_model()
    broken = conv_bn_model()
    for tensor in broken.graph.initializer:
        if tensor.name == "w2":
            values = numpy_helper.to_array(tensor).copy()
            values[0, 0, 0, 0] += 0.5
            tensor.CopyFrom(numpy_helper.from_array(values, "w2"))
    report = compare_layerwise(model, get_backend("onnxruntime"), BuildOptions(), feeds_for(model), engine_model=broken)
    first = report.first_divergent
    assert first is not None and first.node == "conv2" and first.op_type == "Conv" and first.tensor == "c2"
    assert first.max_abs > 0.1 and first.rel_l2 > 1e-4 and any("relative L2" in f for f in first.failures)
    assert all(layer.passed for layer in report.layers if layer.index < first.index)
    assert "first divergence at layer 5 'conv2' (Conv)" in report.summary()
    assert report.to_dict()["first_divergent"]["node"] == "conv2"


def test_fp16_engine_diverges_at_the_first_conv_under_fp32_tolerance():
    model = conv_bn_model()
    options = BuildOptions(precision="fp16", force_precision=True)
    strict = compare_layerwise(model, "onnxruntime", options, feeds_for(model), tolerance=tolerance_for("fp32"))
    assert not strict.passed and strict.first_divergent.op_type == "Conv"
    # Under fp16's own tolerance the same engine is fine.
    assert compare_layerwise(model, "onnxruntime", options, feeds_for(model)).passed


def test_layerwise_for_a_saved_engine(tmp_path):
    source = tmp_path / "cb.onnx"
    onnx.save(conv_bn_model(batch=1), source)
    engine_path = tmp_path / "cb.engine"
    es.build(source).save(engine_path)
    report = layerwise_for_engine(engine_path)
    # With graph passes recorded in the manifest, folded tensors (c1, c2, ...) have no engine-side counterpart.
    compared = {layer.tensor for layer in report.layers}
    assert report.passed and {"bn1", "y"} <= compared and report.inputs.startswith("generated from the build's input plan")
    assert layerwise_for_engine(engine_path, against=source, seed=3).passed


def test_recorded_pass_specs_replay():
    _, summary = optimize(conv_bn_model(), [("fix_shapes", {"shapes": {"x": [1, 3, 8, 8]}}), "fold_batchnorm"])
    specs = _recorded_specs(json.loads(json.dumps(summary.to_dict())))
    assert specs == [("fix_shapes", {"shapes": {"x": [1, 3, 8, 8]}}), "fold_batchnorm"]
    replayed, _ = optimize(conv_bn_model(), specs, check=False)
    report = compare_layerwise(conv_bn_model(), "onnxruntime", BuildOptions(), feeds_for(conv_bn_model(), batch=1),
                               engine_model=replayed)
    # The BatchNorm inputs (c1, c2) were folded away; what remains agrees.
    assert report.passed and {"c1", "c2"} <= set(report.not_compared)
    assert np.isfinite([layer.max_abs for layer in report.layers]).all()


@pytest.mark.parametrize("batch", [2])
def test_batches_other_than_one(batch):
    model = conv_bn_model()
    assert compare_layerwise(model, "onnxruntime", BuildOptions(), feeds_for(model, batch=batch)).passed


def test_int8_engine_compares_relu_inputs_after_the_relu():
    from enginesmith.backends import Calibration

    model = conv_bn_model()
    feeds = feeds_for(model, batch=4)
    calibration = Calibration([feeds_for(model, batch=4, seed=s) for s in range(3)], "minmax")
    report = compare_layerwise(model, "onnxruntime", BuildOptions(precision="int8"), feeds, calibration=calibration)
    assert report.precision == "int8" and report.tolerance["max_rel_l2"] == tolerance_for("int8").max_rel_l2
    assert any("compared after it" in note for note in report.notes)
    assert report.passed, report.summary()


def _int8_engine_with_data(source, tmp_path, data: dict[str, np.ndarray]):
    path = tmp_path / "int8.engine"
    es.build(source, precision="int8", calibration_data=data, output=path)
    np.savez(tmp_path / "data.npz", **data)
    return path, tmp_path / "data.npz"


def test_int8_layerwise_when_a_bias_add_was_fused_at_calibration(tmp_path):
    # make_mlp keeps MatMul and its bias Add apart: the quantizer fuses them, so the engine's ranges
    # have none for the MatMul output 'h1', which layer-wise used to expose (and the quantizer then refused).
    from conftest import make_mlp

    source = tmp_path / "mlp.onnx"
    onnx.save(make_mlp(), source)
    x = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32)
    engine_path, data = _int8_engine_with_data(source, tmp_path, {"x": x})
    report = layerwise_for_engine(engine_path, data=data)
    compared = {layer.tensor for layer in report.layers}
    assert {"h1", "h4"} <= set(report.not_compared) and {"h3", "probs"} <= compared
    assert report.passed, report.summary()


def test_int8_layerwise_of_a_two_head_keras_model(tmp_path):
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    image = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(image)
    x = keras.layers.MaxPooling2D(2, name="pool")(keras.layers.ReLU(name="relu")(x))
    flat = keras.layers.Flatten(name="flat")(x)
    model = keras.Model(image, [keras.layers.Dense(5, activation="softmax", name="probs")(flat),
                                keras.layers.Dense(4, name="box")(flat)], name="twohead")
    rng = np.random.default_rng(3)
    for layer in model.layers:  # non-zero biases: tf2onnx drops zero ones, and with them the BiasAdd
        weights = layer.get_weights()
        if len(weights) == 2:
            layer.set_weights([weights[0], rng.normal(0, 0.1, weights[1].shape).astype("f4")])
    source = tmp_path / "twohead.keras"
    model.save(source)
    images = rng.random((64, 16, 16, 3)).astype(np.float32)
    engine_path, data = _int8_engine_with_data(source, tmp_path, {"image": images})
    report = layerwise_for_engine(engine_path, data=data)
    assert any(name.endswith("MatMul:0") for name in report.not_compared)
    assert {"probs", "box"} <= {layer.tensor for layer in report.layers}
    assert report.passed, report.summary()
