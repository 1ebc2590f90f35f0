"""Keras sources: .keras, legacy .h5 and keras.Model objects, checked against Keras' own outputs."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import enginesmith as es  # noqa: E402
from enginesmith.errors import SourceError, UnsupportedModelError  # noqa: E402
from enginesmith.importers import ImportOptions, detect_kind  # noqa: E402

pytestmark = pytest.mark.tensorflow
TOL = dict(rtol=1e-4, atol=1e-4)


def _randomize_batchnorm(model) -> None:
    """Give BatchNormalization non-trivial statistics so folding it is really tested."""
    rng = np.random.default_rng(7)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype("f4"),
                rng.normal(0, 0.1, beta.shape).astype("f4"),
                rng.normal(0, 0.1, mean.shape).astype("f4"),
                rng.uniform(0.5, 2.0, var.shape).astype("f4"),
            ])


def make_classifier():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.Flatten(name="flat")(x)
    outputs = keras.layers.Dense(5, activation="softmax", name="probs")(x)
    model = keras.Model(inputs, outputs, name="classifier")
    _randomize_batchnorm(model)
    return model


def make_two_heads():
    """Two 30x40x1 inputs through SeparableConv branches, concatenated on channels, two heads."""
    keras.utils.set_random_seed(1)
    left = keras.Input((30, 40, 1), name="left")
    right = keras.Input((30, 40, 1), name="right")
    a = keras.layers.SeparableConv2D(4, 3, activation="relu", name="sep_left")(left)
    b = keras.layers.SeparableConv2D(4, 3, activation="relu", name="sep_right")(right)
    joined = keras.layers.Concatenate(axis=-1, name="concat")([a, b])
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(joined)
    probs = keras.layers.Dense(1, activation="sigmoid", name="probs")(pooled)
    box = keras.layers.Dense(4, name="box")(pooled)
    return keras.Model([left, right], [probs, box], name="two_heads")


class NumpyScale(keras.layers.Layer):
    """A custom layer tf2onnx cannot convert: it calls back into Python."""

    def call(self, x):
        y = tf.numpy_function(lambda a: (a * 3).astype(np.float32), [x], tf.float32, stateful=False)
        y.set_shape(x.shape)
        return y

    def compute_output_shape(self, shape):
        return shape


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("keras")
    classifier = make_classifier()
    two = make_two_heads()
    paths = {"classifier": root / "classifier.keras", "h5": root / "classifier.h5", "two": root / "two.keras"}
    classifier.save(paths["classifier"])
    classifier.save(paths["h5"])
    two.save(paths["two"])
    inputs = keras.Input((4,), name="x")
    doubled = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs)
    lam = keras.Model(inputs, keras.layers.Dense(2, name="probs")(doubled))
    paths["lambda"] = root / "lambda.keras"
    lam.save(paths["lambda"])
    return {"classifier": classifier, "two": two, "lambda": lam, "paths": paths, "root": root}


def _images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 16, 16, 3)).astype("f4")


def _pair(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((batch, 30, 40, 1)).astype("f4") for n in ("left", "right")}


def test_classifier_from_keras_file(models) -> None:
    engine = es.build(models["paths"]["classifier"])
    assert engine.signature.input_names == ["image"]
    assert engine.signature.output_names == ["probs"]
    assert engine.signature.inputs[0].shape == ("batch", 16, 16, 3)
    assert engine.manifest.source_kind == "keras"
    assert engine.manifest.checks["build_verification"]["passed"]
    assert any("Keras' own ONNX export" in line for line in engine.manifest.build_log)
    for batch in (1, 5):
        x = _images(batch, seed=batch)
        expected = models["classifier"].predict(x, verbose=0)
        np.testing.assert_allclose(engine(image=x)["probs"], expected, **TOL)


def test_legacy_h5(models) -> None:
    assert detect_kind(models["paths"]["h5"]) == "keras"
    engine = es.build(models["paths"]["h5"])
    assert engine.signature.output_names == ["probs"]
    x = _images(3)
    np.testing.assert_allclose(engine(image=x)["probs"], models["classifier"].predict(x, verbose=0), **TOL)


def test_two_inputs_two_outputs_object_and_rebuild(models, tmp_path: Path) -> None:
    model = models["two"]
    engine = es.build(model)
    assert engine.signature.input_names == ["left", "right"]
    assert engine.signature.output_names == ["probs", "box"]
    assert engine.manifest.source_name == "two_heads.keras"
    assert any("Identity:0 -> probs" in line for line in engine.manifest.build_log)
    for batch in (1, 5):
        feeds = _pair(batch, seed=batch)
        probs, box = model.predict([feeds["left"], feeds["right"]], verbose=0)
        out = engine(**feeds)
        np.testing.assert_allclose(out["probs"], probs, **TOL)
        np.testing.assert_allclose(out["box"], box, **TOL)
    path = tmp_path / "two.engine"
    engine.save(path)
    rebuilt = es.build(path)
    assert rebuilt.signature.output_names == ["probs", "box"]
    feeds = _pair(2, seed=9)
    np.testing.assert_allclose(rebuilt(**feeds)["box"], model.predict([feeds["left"], feeds["right"]], verbose=0)[1], **TOL)
    assert es.validate(path).passed  # against the embedded .keras, run by Keras
    assert es.validate(path, against=models["paths"]["two"]).passed


def test_fixed_input_shape_option(models) -> None:
    options = ImportOptions(input_shapes={"image": (2, 16, 16, 3)})
    engine = es.build(models["paths"]["classifier"], import_options=options)
    assert engine.signature.inputs[0].shape == (2, 16, 16, 3)
    x = _images(2)
    np.testing.assert_allclose(engine(image=x)["probs"], models["classifier"].predict(x, verbose=0), **TOL)
    with pytest.raises(SourceError, match="no input named 'nope'|no input named nope"):
        es.build(models["paths"]["classifier"], import_options=ImportOptions(input_shapes={"nope": (1, 2)}))


def test_lambda_refused_unless_trusted(models) -> None:
    path = models["paths"]["lambda"]
    with pytest.raises(SourceError, match=r"Lambda.*'double'.*--trust-code"):
        es.build(path)
    engine = es.build(path, import_options=ImportOptions(trust_code=True))
    x = np.random.default_rng(0).standard_normal((3, 4)).astype("f4")
    np.testing.assert_allclose(engine(x=x)["probs"], models["lambda"].predict(x, verbose=0), **TOL)
    assert any("safe_mode=False" in line for line in engine.manifest.build_log)


def test_lambda_in_memory_model_is_accepted_but_rebuild_needs_trust(models, tmp_path: Path) -> None:
    engine = es.build(models["lambda"])  # the code is already running in this process
    assert any("needs --trust-code" in line for line in engine.manifest.build_log)
    path = tmp_path / "lambda.engine"
    engine.save(path)
    with pytest.raises(SourceError, match="--trust-code"):
        es.build(path)  # the embedded .keras carries Python bytecode; trust is not replayed from the bundle
    rebuilt = es.build(path, import_options=ImportOptions(trust_code=True))
    x = np.random.default_rng(1).standard_normal((2, 4)).astype("f4")
    np.testing.assert_allclose(rebuilt(x=x)["probs"], models["lambda"].predict(x, verbose=0), **TOL)


def test_falls_back_to_tf2onnx_when_keras_export_fails(models, monkeypatch) -> None:
    from enginesmith.importers import keras_importer

    def broken(*args, **kwargs):
        raise RuntimeError("simulated export failure")

    monkeypatch.setattr(keras_importer, "_export_keras", broken)
    engine = es.build(models["two"])
    assert any("simulated export failure" in line and "falling back" in line for line in engine.manifest.build_log)
    assert engine.signature.output_names == ["probs", "box"]
    feeds = _pair(3, seed=4)
    np.testing.assert_allclose(engine(**feeds)["probs"], models["two"].predict([feeds["left"], feeds["right"]], verbose=0)[0], **TOL)


def test_unconvertible_custom_layer_is_named() -> None:
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(4, name="d1")(inputs)
    hidden = NumpyScale(name="weird_layer")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(2, name="probs")(hidden))
    with pytest.raises(UnsupportedModelError, match=r"layer 'weird_layer' \(NumpyScale\)"):
        es.build(model)


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        es.build(tmp_path / "missing.keras")
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"definitely not a zip")
    with pytest.raises(SourceError, match="not a Keras 3 .keras file"):
        es.build(garbage)
    bad_h5 = tmp_path / "garbage.h5"
    bad_h5.write_bytes(b"nope")
    with pytest.raises(SourceError, match="not an HDF5 file"):
        es.build(bad_h5)


def test_opset_follows_the_backend_unless_asked(models, monkeypatch) -> None:
    from enginesmith.backends import get_backend
    from enginesmith.importers import ImportOptions

    def source_opset(engine) -> int:
        line = next(line for line in engine.manifest.build_log if "opset" in line and "converted" in line)
        return int(line.rsplit("opset", 1)[1].split()[0].strip(",)"))

    assert source_opset(es.build(models["paths"]["classifier"], verify=False)) == 17
    monkeypatch.setattr(type(get_backend("onnxruntime")), "converter_opset", 15)
    engine = es.build(models["paths"]["classifier"], backend="onnxruntime")
    assert source_opset(engine) == 15 and engine.manifest.build_options["import_options"]["opset"] is None
    asked = es.build(models["paths"]["classifier"], import_options=ImportOptions(opset=16), verify=False)
    assert source_opset(asked) == 16
