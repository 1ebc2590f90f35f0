"""The OpenVINO backend: engines compiled by OpenVINO for the CPU, checked against plain ONNX Runtime.

Skipped only when ``import openvino`` fails (install: pip install 'enginesmith[openvino]').
"""

from __future__ import annotations

import sys
import threading
import zipfile

import numpy as np
import onnx
import pytest
from conftest import make_mlp, make_two_in_two_out, make_unsupported_op_model, run_plain

pytest.importorskip("openvino")

import enginesmith as es  # noqa: E402
import enginesmith.backends.openvino as ov_backend  # noqa: E402
import enginesmith.backends.openvino_int8 as ov_int8  # noqa: E402
from enginesmith import samples  # noqa: E402
from enginesmith.backends import get_backend, pick_backend  # noqa: E402
from enginesmith.backends.base import BuildOptions  # noqa: E402
from enginesmith.bundle import read_bundle  # noqa: E402
from enginesmith.importers import import_model  # noqa: E402
from enginesmith.signature import random_inputs  # noqa: E402

pytestmark = pytest.mark.openvino
FP32_ATOL = 1e-4


def max_abs_diff(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    assert set(got) == set(want)
    return max(float(np.max(np.abs(got[k].astype(np.float64) - want[k]))) for k in want)


SAMPLE_MODELS = {
    "small_cnn": lambda: samples.small_cnn(),
    "two_input_two_output": lambda: samples.two_input_two_output(),
    "mobilenet_v2_like": lambda: samples.mobilenet_v2_like(image_size=64, num_classes=100),
    "resnet50_like": lambda: samples.resnet50_like(image_size=64, num_classes=100),
}


@pytest.mark.parametrize("name", sorted(SAMPLE_MODELS))
def test_fp32_matches_onnxruntime_on_sample_models(name):
    model = SAMPLE_MODELS[name]()
    engine = es.build(model, backend="openvino")
    assert engine.manifest.backend == "openvino" and engine.precision == "fp32"
    # fp32 really is fp32, even on a CPU where OpenVINO's default would be bf16.
    assert engine.manifest.checks["build"]["openvino_chose"]["INFERENCE_PRECISION_HINT"] == "f32"
    feeds = random_inputs(engine.signature.inputs, batch=2, seed=3)
    assert max_abs_diff(engine(**feeds), run_plain(model, feeds)) <= FP32_ATOL


def test_fp32_matches_onnxruntime_on_a_keras_application():
    """An architecture nobody here wrote: Keras' MobileNetV3Small (hard-swish, squeeze-excite), random weights."""
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    net = keras.applications.MobileNetV3Small(input_shape=(96, 96, 3), weights=None, classes=20,
                                              include_preprocessing=False)
    imported = import_model(net)
    engine = es.build(imported.model, backend="openvino", verify=False)
    feeds = random_inputs(engine.signature.inputs, batch=3, seed=4)
    got = engine(**feeds)
    assert max_abs_diff(got, run_plain(imported.model, feeds)) <= FP32_ATOL
    np.testing.assert_allclose(next(iter(got.values())), np.asarray(net(next(iter(feeds.values())))), atol=FP32_ATOL)


def test_save_load_round_trip(tmp_path):
    model = samples.small_cnn()
    built = es.build(model, backend="openvino", output=tmp_path / "cnn.engine")
    loaded = es.load(tmp_path / "cnn.engine")
    feeds = random_inputs(built.signature.inputs, batch=4, seed=5)
    np.testing.assert_array_equal(loaded(**feeds)["probs"], built(**feeds)["probs"])
    manifest = loaded.manifest
    assert manifest.backend == "openvino" and manifest.backend_version == ov_backend.core_version()
    assert set(manifest.fingerprint_must_match) >= {"arch", "cpu_flags", "backend_version"}
    assert manifest.fingerprint["cpu_flags"] and manifest.fingerprint["device"] == "CPU"
    with zipfile.ZipFile(tmp_path / "cnn.engine") as zf:
        assert "payload/model.openvino.blob" in zf.namelist()
    # The payload is OpenVINO's compiled model, not ONNX.
    payload = read_bundle(tmp_path / "cnn.engine").payload
    with pytest.raises(Exception):
        onnx.load_from_string(payload)
    assert es.info(tmp_path / "cnn.engine")["platform_summary"].endswith("/ OpenVINO " + ov_backend.core_version() + " CPU")


def test_dynamic_batch_stays_dynamic():
    model = make_mlp()
    engine = es.build(model, backend="openvino")
    assert engine.signature.inputs[0].shape == ("batch", 6)
    for batch in (1, 3, 17, 64):
        x = np.random.default_rng(batch).standard_normal((batch, 6)).astype(np.float32)
        got = engine(x=x)["probs"]
        assert got.shape == (batch, 4)
        np.testing.assert_allclose(got, run_plain(model, {"x": x})["probs"], atol=1e-5)


def test_fixed_batch_model_is_split_and_padded():
    model = make_mlp(batch=4)
    engine = es.build(model, backend="openvino")
    x = np.random.default_rng(7).standard_normal((10, 6)).astype(np.float32)
    got = engine(x=x)["probs"]
    padded = np.concatenate([x, x[:2]])
    want = np.concatenate([run_plain(model, {"x": padded[i : i + 4]})["probs"] for i in range(0, 12, 4)])[:10]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_outputs_mapped_by_name_with_their_dtypes():
    model = make_two_in_two_out()
    engine = es.build(model, backend="openvino")
    rng = np.random.default_rng(8)
    feeds = {"left": rng.standard_normal((5, 3)).astype(np.float32), "right": rng.standard_normal((5, 3)).astype(np.float32)}
    got, want = engine(**feeds), run_plain(model, feeds)
    assert got["ids"].dtype == np.int64
    np.testing.assert_array_equal(got["ids"], want["ids"])
    np.testing.assert_allclose(got["score"], want["score"], atol=1e-5)


def test_concurrent_calls_from_threads_match_serial():
    engine = es.build(samples.small_cnn(), backend="openvino")
    inputs = [random_inputs(engine.signature.inputs, batch=1 + i % 3, seed=i) for i in range(12)]
    serial = [engine(**feeds)["probs"] for feeds in inputs]
    results: list = [None] * len(inputs)
    errors: list = []
    start = threading.Barrier(len(inputs))

    def worker(i: int) -> None:
        try:
            start.wait()
            for _ in range(15):
                got = engine(**inputs[i])["probs"]
                if not np.array_equal(got, serial[i]):
                    raise AssertionError(f"thread {i} got another result")
            results[i] = got
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)


def test_outputs_handed_out_are_not_overwritten_by_later_calls():
    # The session reads outputs as views of the infer request's buffers and reuses the request:
    # what a call returned must be the caller's own copy.
    model = make_two_in_two_out()
    engine = es.build(model, backend="openvino", verify=False)
    rng = np.random.default_rng(12)
    first_feeds = {k: rng.standard_normal((2, 3)).astype(np.float32) for k in ("left", "right")}
    first = engine(**first_feeds)
    kept = {k: v.copy() for k, v in first.items()}
    for _ in range(3):
        engine(left=rng.standard_normal((2, 3)).astype(np.float32), right=rng.standard_normal((2, 3)).astype(np.float32))
    for name in kept:
        np.testing.assert_array_equal(first[name], kept[name])
        assert first[name].flags.owndata or first[name].base is not None and first[name].base.flags.owndata
    np.testing.assert_allclose(first["score"], run_plain(model, first_feeds)["score"], atol=1e-5)


def test_read_only_and_scalar_inputs_run():
    # OpenVINO cannot share the memory of a read-only array (the session copies it); a 0-d input
    # (a sample rate, a threshold) goes in as a scalar tensor.
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"])], "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    engine = es.build(model, backend="openvino", verify=False)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    x.flags.writeable = False
    for scale in (2.0, 3.0):
        got = engine(x=x, scale=np.array(scale, np.float32))["y"]
        np.testing.assert_array_equal(got, x * scale)


# --------------------------------------------------------------------------- options and precisions


def test_throughput_options_are_applied_recorded_and_replayed(tmp_path):
    path = tmp_path / "tp.engine"
    engine = es.build(make_mlp(), backend="openvino", threads=2,
                      backend_options={"performance_hint": "throughput", "num_streams": 2}, output=path)
    options = engine.manifest.build_options
    assert options["backend_options"]["performance_hint"] == "throughput"
    assert options["backend_options"]["num_streams"] == 2 and options["threads"] == 2
    chose = engine.manifest.checks["build"]["openvino_chose"]
    assert chose["PERFORMANCE_HINT"] == "THROUGHPUT" and chose["NUM_STREAMS"] == "2"
    assert chose["INFERENCE_NUM_THREADS"] == "2"
    compiled = es.load(path)._session._compiled
    assert str(compiled.get_property("PERFORMANCE_HINT")) == "THROUGHPUT"
    assert int(compiled.get_property("NUM_STREAMS")) == 2
    # One thread, latency hint: the thread count reaches the plugin.
    single = es.build(make_mlp(), backend="openvino", threads=1)
    assert single.manifest.checks["build"]["openvino_chose"]["INFERENCE_NUM_THREADS"] == "1"


def test_unknown_or_bad_options_are_refused():
    with pytest.raises(es.BuildError, match="unknown OpenVINO option.*streams"):
        es.build(make_mlp(), backend="openvino", backend_options={"streams": 2})
    with pytest.raises(es.BuildError, match="performance_hint 'fastest'"):
        es.build(make_mlp(), backend="openvino", backend_options={"performance_hint": "fastest"})
    with pytest.raises(es.BuildError, match="num_streams must be a positive number"):
        es.build(make_mlp(), backend="openvino", backend_options={"num_streams": "many"})


needs_bf16 = pytest.mark.skipif("bf16" not in ov_backend.native_precisions(), reason="this CPU has no native bf16")


@needs_bf16
def test_bf16_runs_in_bf16_with_bf16_sized_differences(tmp_path):
    model = samples.small_cnn(image_size=16, channels=3)
    engine = es.build(model, backend="openvino", precision="bf16", output=tmp_path / "bf16.engine")
    assert engine.precision == "bf16"
    assert engine.manifest.checks["build"]["openvino_chose"]["INFERENCE_PRECISION_HINT"] == "bf16"
    feeds = random_inputs(engine.signature.inputs, batch=4, seed=9)
    got, want = es.load(tmp_path / "bf16.engine")(**feeds)["probs"], run_plain(model, feeds)["probs"]
    assert got.dtype == np.float32
    rel_l2 = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-5 < rel_l2 < 1e-2  # bf16 rounding (8-bit mantissa) is there, and bounded
    assert "bf16" in get_backend("openvino").precisions(BuildOptions())


def test_bf16_refused_on_a_cpu_without_it(monkeypatch):
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: ("avx", "avx2", "fma"))
    with pytest.raises(es.BuildError, match="bf16 needs a CPU with AVX512_BF16 or AMX_BF16"):
        es.build(make_mlp(), backend="openvino", precision="bf16")
    assert get_backend("openvino").precisions(BuildOptions()) == ["fp32", "int8"]


def test_fp16_without_cpu_kernels_stays_fp32_and_says_what_to_use(monkeypatch):
    monkeypatch.setattr(ov_backend, "native_precisions", lambda: ["bf16"])
    engine = es.build(make_mlp(), backend="openvino", precision="fp16")
    assert engine.precision == "fp32"
    assert any("fp16: this CPU has no fp16 kernels" in line and "--precision bf16" in line
               for line in engine.manifest.build_log)
    with pytest.raises(es.BuildError, match="fp16 needs a CPU with AVX512_FP16"):
        es.build(make_mlp(), backend="openvino", precision="fp16", force_precision=True)


# --------------------------------------------------------------------------- int8 (NNCF)


@pytest.fixture(scope="module")
def digits_model():
    """A small CNN trained on scikit-learn's digits (the same recipe as test_precision's)."""
    torch = pytest.importorskip("torch")
    datasets = pytest.importorskip("sklearn.datasets")
    torch.manual_seed(0)
    data = datasets.load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1400], order[1400:]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    xt, yt = torch.from_numpy(images[train]), torch.from_numpy(data.target[train])
    for _ in range(25):
        for i in range(0, len(xt), 64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[i : i + 64]), yt[i : i + 64]).backward()
            optimizer.step()
    net.eval()
    import io

    buffer = io.BytesIO()
    torch.onnx.export(net, torch.zeros(1, 1, 8, 8), buffer, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, opset_version=17)
    return {"model": onnx.load_from_string(buffer.getvalue()), "x_train": images[train][:400],
            "x_test": images[test], "y_test": data.target[test]}


def test_int8_keeps_the_trained_models_decisions(digits_model, tmp_path):
    model = digits_model["model"]
    path = tmp_path / "int8.engine"
    engine = es.build(model, backend="openvino", precision="int8",
                      calibration_data={"image": digits_model["x_train"]}, output=path)
    assert engine.precision == "int8"
    assert any("NNCF" in line and "FakeQuantize" in line for line in engine.manifest.build_log)
    assert engine.manifest.checks["calibration"]["random"] is False
    loaded = es.load(path)
    x, y = digits_model["x_test"], digits_model["y_test"]
    int8 = loaded(image=x)["logits"].argmax(-1)
    fp32 = run_plain(model, {"image": x})["logits"].argmax(-1)
    assert np.mean(fp32 == y) > 0.9, "the digits CNN did not train"
    assert np.mean(int8 == fp32) >= 0.98
    assert abs(np.mean(int8 == y) - np.mean(fp32 == y)) <= 0.01
    # Really quantized: the same inputs give (slightly) different logits than fp32.
    assert not np.allclose(loaded(image=x[:8])["logits"], run_plain(model, {"image": x[:8]})["logits"], atol=1e-5)


def test_int8_percentile_calibration_and_mixed_preset(digits_model):
    model = digits_model["model"]
    engine = es.build(model, backend="openvino", precision="int8", calibration_method="percentile",
                      calibration_data={"image": digits_model["x_train"]}, backend_options={"int8_preset": "mixed"})
    assert any("preset mixed, percentile ranges (MEAN_QUANTILE)" in line for line in engine.manifest.build_log)
    assert engine.manifest.build_options["backend_options"]["int8_preset"] == "mixed"
    x = digits_model["x_test"]
    agreement = np.mean(engine(image=x)["logits"].argmax(-1) == run_plain(model, {"image": x})["logits"].argmax(-1))
    assert agreement >= 0.98


def test_int8_refuses_entropy_and_missing_data(digits_model):
    with pytest.raises(es.BuildError, match="'entropy' is not offered by NNCF: use minmax or percentile"):
        es.build(digits_model["model"], backend="openvino", precision="int8", calibration_method="entropy",
                 calibration_data={"image": digits_model["x_train"]})
    with pytest.raises(es.ValidationDataError, match="int8 needs calibration data"):
        es.build(digits_model["model"], backend="openvino", precision="int8")


def test_int8_engine_rebuilds_from_the_bundle_alone(digits_model, tmp_path, monkeypatch):
    model, x = digits_model["model"], digits_model["x_test"]
    path = tmp_path / "int8.engine"
    original = es.build(model, backend="openvino", precision="int8",
                        calibration_data={"image": digits_model["x_train"]}, output=path)
    assert ov_backend.INT8_MODEL_CACHE in read_bundle(path, payload=False, caches=True).caches
    want = original(image=x)["logits"]

    # Another machine: another CPU, and no NNCF to calibrate with (nor --calib data).
    real = ov_backend.host_fingerprint
    monkeypatch.setattr(ov_backend, "host_fingerprint", lambda: {**real(), "cpu_flags": "avx avx2 fma"})

    def no_nncf(*args, **kwargs):
        raise AssertionError("NNCF ran on a rebuild that carries its quantized model")

    monkeypatch.setattr(ov_int8, "quantize_int8", no_nncf)
    rebuilt = es.build(path, output=tmp_path / "rebuilt.engine")
    assert rebuilt.precision == "int8" and rebuilt.manifest.fingerprint["cpu_flags"] == "avx avx2 fma"
    assert any("quantized model reused (NNCF not run" in line for line in rebuilt.manifest.build_log)
    assert rebuilt.manifest.checks["build_verification"]["passed"]
    got = rebuilt(image=x)["logits"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # Still the int8 engine, not fp32 rebuilt from the source.
    assert not np.allclose(got, run_plain(model, {"image": x})["logits"], atol=1e-5)
    # The rebuilt bundle keeps the quantized model, so it rebuilds again.
    assert ov_backend.INT8_MODEL_CACHE in read_bundle(rebuilt.path, payload=False, caches=True).caches


def test_int8_rebuild_asking_for_other_quantization_needs_data(digits_model, tmp_path):
    path = tmp_path / "int8.engine"
    es.build(digits_model["model"], backend="openvino", precision="int8",
             calibration_data={"image": digits_model["x_train"]}, output=path)
    with pytest.raises(es.ValidationDataError, match="quantized for another calibration_method .* give --calib DATA"):
        es.build(path, calibration_method="percentile")
    again = es.build(path, calibration_method="percentile", calibration_data={"image": digits_model["x_train"]})
    assert any("made for another calibration_method: quantizing again" in line for line in again.manifest.build_log)
    assert any("NNCF" in line and "percentile" in line for line in again.manifest.build_log)


def test_auto_int8_bundle_won_by_openvino_rebuilds_without_data(digits_model, tmp_path):
    path = tmp_path / "auto.engine"
    es.build(digits_model["model"], backend="auto", candidates=["openvino"], precision="int8",
             calibration_data={"image": digits_model["x_train"]}, output=path)
    # Both backends again on the rebuild: ONNX Runtime has no data to calibrate with, OpenVINO its kept model.
    rebuilt = es.build(path, candidates=["onnxruntime", "openvino"])
    rows = {row["backend"]: row for row in rebuilt.manifest.checks["backend_candidates"]}
    assert rebuilt.backend == "openvino" and rebuilt.precision == "int8"
    assert "calibration data" in rows["onnxruntime"]["reason"]
    x = digits_model["x_test"]
    np.testing.assert_allclose(rebuilt(image=x)["logits"], es.load(path)(image=x)["logits"], rtol=0, atol=1e-5)


def test_damaged_int8_model_entry_is_a_clear_error():
    with pytest.raises(es.BuildError, match="openvino_int8_model.npz.* rebuild with --calib DATA"):
        ov_int8.unpack_int8_model(b"not an npz")


def test_best_considers_every_precision_this_cpu_has(digits_model):
    engine = es.build(digits_model["model"], backend="openvino", precision="best",
                      calibration_data={"image": digits_model["x_train"]}, accuracy_budget="2%")
    rows = {row["precision"]: row for row in engine.manifest.checks["precision_candidates"]}
    assert set(rows) == set(get_backend("openvino").precisions(BuildOptions()))
    assert sum(row["kept"] for row in rows.values()) == 1 and rows[engine.precision]["kept"]


# --------------------------------------------------------------------------- platform and bad input


def test_engine_from_another_cpu_is_refused_and_can_be_rebuilt(monkeypatch, tmp_path):
    path = es.build(make_mlp(), backend="openvino", output=tmp_path / "m.engine").path
    real = ov_backend.host_fingerprint
    monkeypatch.setattr(ov_backend, "host_fingerprint", lambda: {**real(), "cpu_flags": "avx avx2 fma"})
    with pytest.raises(es.PlatformMismatchError) as info:
        es.load(path)
    message = str(info.value)
    assert "/ OpenVINO " in message and "cpu_flags is avx avx2 fma" in message
    assert "rebuild it here with 'enginesmith build m.engine'" in message
    rebuilt = es.build(path, output=tmp_path / "rebuilt.engine")
    assert rebuilt.manifest.backend == "openvino" and rebuilt.manifest.fingerprint["cpu_flags"] == "avx avx2 fma"


def test_engine_from_another_openvino_version_is_refused(monkeypatch, tmp_path):
    path = es.build(make_mlp(), backend="openvino", output=tmp_path / "m.engine").path
    monkeypatch.setattr(ov_backend, "core_version", lambda: "2099.1.0")
    with pytest.raises(es.PlatformMismatchError, match="backend_version is 2099.1.0 \\(engine: 20"):
        es.load(path)


def test_corrupt_payload_is_a_clear_error():
    backend = get_backend("openvino")
    imported = import_model(make_mlp())
    with pytest.raises(es.BuildError, match="could not load the engine payload.*rebuild the engine"):
        backend.load(b"not an OpenVINO blob", BuildOptions(), imported.signature)


def test_unconvertible_op_is_named():
    model = make_unsupported_op_model()
    with pytest.raises(es.UnsupportedModelError, match="'fancy_1' \\(com.example:FancyActivation\\)"):
        es.build(model, backend="openvino")
    # Without the compatibility check the backend's own conversion names the node too.
    imported = import_model(model)
    with pytest.raises(es.UnsupportedModelError,
                       match="cannot convert node\\(s\\) 'fancy_1' \\(com.example.FancyActivation: no conversion rule"):
        get_backend("openvino").build(imported.model, imported.signature, BuildOptions())
    support = get_backend("openvino").op_support(model, BuildOptions())
    assert support["relu"][0] == "supported" and support["fancy_1"][0] == "unsupported"


def test_unconvertible_op_inside_a_subgraph_names_the_top_level_node():
    from onnx import TensorProto, helper

    def branch(op: str, domain: str = "") -> onnx.GraphProto:
        node = helper.make_node(op, ["x"], ["y_" + op], domain=domain, name="inner_" + op)
        return helper.make_graph([node], op, [], [helper.make_tensor_value_info("y_" + op, TensorProto.FLOAT, [2])])

    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], name="choose", then_branch=branch("FancyActivation", "com.example"),
                          else_branch=branch("Relu"))],
        "nested",
        [helper.make_tensor_value_info("flag", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 9
    support = get_backend("openvino").op_support(model, BuildOptions())
    assert support["choose"][0] == "unsupported"
    assert "If with com.example.FancyActivation in its subgraph" in support["choose"][1]
    imported = import_model(model)
    with pytest.raises(es.UnsupportedModelError, match="'choose' \\(If with com.example.FancyActivation in its subgraph"):
        get_backend("openvino").build(imported.model, imported.signature, BuildOptions())


def test_missing_openvino_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes 'import openvino' fail
    status = get_backend("openvino").available()
    assert not status and "pip install 'enginesmith[openvino]'" in status.reason
    with pytest.raises(es.BackendUnavailableError, match="enginesmith\\[openvino\\]"):
        pick_backend("openvino")


def test_auto_still_picks_onnxruntime():
    assert pick_backend("auto").name == "onnxruntime"


def test_inputs_the_plugin_cannot_run_are_an_input_error():
    # A 3x3 max-pool over dynamic height/width: a 2x2 image is too small for the kernel.
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[3, 3])], "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, None, None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    engine = es.build(model, backend="openvino", verify=False)
    assert engine(x=np.ones((1, 1, 5, 5), np.float32))["y"].shape == (1, 1, 3, 3)
    with pytest.raises(es.InputError, match="OpenVINO could not run the engine on inputs x\\[1, 1, 2, 2\\]: .*[Kk]ernel"):
        engine(x=np.ones((1, 1, 2, 2), np.float32))
