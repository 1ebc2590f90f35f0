"""TFLite sources, checked against the TFLite interpreter and the TensorFlow function they came from."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

import enginesmith as es  # noqa: E402
from enginesmith.errors import SourceError, UnsupportedModelError  # noqa: E402
from enginesmith.importers import detect_kind  # noqa: E402
from enginesmith.validate import tolerance_for  # noqa: E402

pytestmark = pytest.mark.tensorflow
TOL = dict(rtol=1e-4, atol=1e-4)


class Heads(tf.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(11)
        self.w1 = tf.Variable(rng.standard_normal((6, 8)).astype("f4"))
        self.w2 = tf.Variable(rng.standard_normal((8, 3)).astype("f4"))
        self.w3 = tf.Variable(rng.standard_normal((8, 4)).astype("f4"))
        self.b3 = tf.Variable(rng.standard_normal(4).astype("f4"))

    @tf.function(input_signature=[tf.TensorSpec((None, 6), tf.float32, name="feat")])
    def serve(self, feat):
        hidden = tf.nn.relu(feat @ self.w1)
        return {"probs": tf.nn.softmax(hidden @ self.w2), "box": hidden @ self.w3 + self.b3}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("tflite")
    module = Heads()
    saved = root / "heads"
    tf.saved_model.save(module, str(saved), signatures={"serving_default": module.serve})
    path = root / "heads.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert())
    return {"module": module, "path": path}


def _interpreter_outputs(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(path))
    return {k: np.array(v) for k, v in interpreter.get_signature_runner()(feat=x).items()}


def test_tflite_names_outputs_batches_and_rebuild(sources, tmp_path: Path) -> None:
    path = sources["path"]
    assert detect_kind(path) == "tflite"
    engine = es.build(path)
    assert engine.signature.input_names == ["feat"]
    assert engine.signature.output_names == ["box", "probs"]  # the signature's names, in its order
    assert engine.signature.inputs[0].shape == ("batch", 6)
    assert engine.manifest.checks["build_verification"]["passed"]
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 6)).astype("f4")
        out = engine(feat=x)
        expected = _interpreter_outputs(path, x)
        source = {k: v.numpy() for k, v in sources["module"].serve(tf.constant(x)).items()}
        for name in ("probs", "box"):
            np.testing.assert_allclose(out[name], expected[name], **TOL)
            np.testing.assert_allclose(out[name], source[name], **TOL)
    saved = tmp_path / "heads.engine"
    engine.save(saved)
    rebuilt = es.build(saved)
    assert rebuilt.signature.output_names == ["box", "probs"]
    assert es.validate(saved).passed
    assert es.validate(saved, against=path).passed


def test_tflite_with_resource_variables_gives_clear_error(tmp_path: Path) -> None:
    """TFLite files that keep resource variables (here: Keras 3 variables in a tf.Module) use ops tf2onnx lacks."""
    keras = pytest.importorskip("keras")

    class KerasInside(tf.Module):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)
            self.dense.build((None, 6))

        @tf.function(input_signature=[tf.TensorSpec((None, 6), tf.float32, name="feat")])
        def serve(self, feat):
            return {"y": self.dense(feat)}

    module = KerasInside()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    path = tmp_path / "variables.tflite"
    path.write_bytes(converter.convert())
    with pytest.raises(UnsupportedModelError, match="TFL_(VAR_HANDLE|READ_VARIABLE)"):
        es.build(path)


def test_bad_tflite_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"0123456789abcdef")
    with pytest.raises(SourceError, match="not a TFLite flat buffer"):
        es.build(garbage)
    with pytest.raises(SourceError, match="not found"):
        es.build(tmp_path / "missing.tflite")


def test_reference_names_its_inputs_so_a_wrong_against_is_refused_before_running(sources, mlp_engine_path) -> None:
    from enginesmith.importers import reference_runner

    assert reference_runner(sources["path"]).input_names == ["feat"]
    with pytest.raises(es.ValidationDataError, match=r"the engine's inputs \(x\) and the reference's inputs \(feat\) do not match"):
        es.validate(mlp_engine_path, sources["path"])


def test_quantized_tflite_is_judged_with_int8_tolerances_and_a_float_one_with_fp32(sources, tmp_path: Path) -> None:
    # Full-integer quantization: the interpreter computes in int8, so an fp32 engine differs from it by int8
    # rounding; the build says so and judges it with int8's tolerance, recorded for later validations too.
    rng = np.random.default_rng(5)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(sources["path"].parent / "heads"))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([rng.standard_normal((1, 6)).astype("f4")] for _ in range(64))
    quantized = tmp_path / "heads_int8.tflite"
    quantized.write_bytes(converter.convert())

    engine = es.build(quantized, output=tmp_path / "q.engine")
    assert engine.precision == "fp32" and engine.manifest.build_options["source_precision"] == "int8"
    assert any("quantized TFLite model" in line for line in engine.manifest.build_log)
    report = es.validate(tmp_path / "q.engine", store=False)
    assert report.passed and report.tolerance_text() == str(tolerance_for("int8"))

    plain = es.build(sources["path"])
    assert "source_precision" not in plain.manifest.build_options


def test_sparse_tflite_weights_are_named_when_they_cannot_be_converted(tmp_path: Path) -> None:
    from enginesmith.importers.tflite_importer import _interpreter, sparse_tensors

    rng = np.random.default_rng(2)
    weights = rng.standard_normal((3, 3, 8, 32)).astype("f4")
    weights[np.abs(weights) < 1.2] = 0.0  # ~77% zeros: the converter stores the kernel sparse
    model = tf.keras.Sequential([tf.keras.Input((16, 16, 8)), tf.keras.layers.Conv2D(32, 3, use_bias=False)])
    model.layers[0].set_weights([weights])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    path = tmp_path / "sparse.tflite"
    path.write_bytes(converter.convert())
    sparse = sparse_tensors(_interpreter(path.read_bytes(), path))
    assert sparse, "the converter stored no sparse tensor"
    try:
        engine = es.build(path)  # tf2onnx 1.17 densifies this small kernel itself (not the zoo's BlazeFace)
    except UnsupportedModelError as exc:
        assert "sparse format" in str(exc) and sparse[0] in str(exc)
    else:
        x = rng.standard_normal((2, 16, 16, 8)).astype("f4")
        np.testing.assert_allclose(engine(**{engine.signature.input_names[0]: x})[engine.signature.output_names[0]],
                                   model(x).numpy(), rtol=1e-4, atol=1e-4)
