"""Models from the wild: inputs the build checks with, samples stored in the bundle, shapes with unnamed dims.

The test models (tests/wild_models.py) run only on some inputs: a skip Concat after a strided
convolution needs sizes that are multiples of the stride, and a sample-rate scalar picks an If
branch that fails for rates it was not made for.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import onnx
import pytest
from conftest import make_mlp, run_plain
from onnx import TensorProto, helper
from wild_models import framed_rate_branch, rate_branch, recurrent_state_vad, strided_concat, text_line_recognizer

import enginesmith as es
from enginesmith.bundle import SAMPLES_ENTRY, read_bundle
from enginesmith.cli.app import main
from enginesmith.graph.input_plan import InputPlan
from enginesmith.runtime.inputs import prepare_inputs
from enginesmith.signature import Signature, TensorSpec, normalize_dim


def save(model: onnx.ModelProto, path):
    onnx.save(model, path)
    return path


# ----------------------------------------------------------------------------- shapes


def test_unnamed_dims_of_different_sizes_are_accepted():
    model = strided_concat()
    engine = es.build(model)
    assert str(engine.signature.inputs[0]) == "x: float32[?, 3, ?, ?]"
    x = np.random.default_rng(0).standard_normal((4, 3, 48, 192)).astype(np.float32)
    np.testing.assert_allclose(engine(x=x)["y"], run_plain(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_signature_dims_written_as_question_marks_or_converter_names_are_independent():
    # Manifests of older bundles keep '?', '-1' and tf2onnx's 'unk__N' as strings.
    spec = TensorSpec("x", "float32", (-1, 3, "?", "?"))
    other = TensorSpec("y", "float32", ("unk__1", "unk__2", "width"))
    signature = Signature(inputs=(spec, other), outputs=())
    feeds = prepare_inputs(signature, {"x": np.zeros((4, 3, 48, 192), np.float32),
                                       "y": np.zeros((5, 7, 9), np.float32)}, batch_flexible=False)
    assert feeds["x"].shape == (4, 3, 48, 192)
    assert [normalize_dim(d) for d in ("?", "-1", "unk__7", -1, "batch", "3")] == [None, None, None, None, "batch", 3]


def test_equal_named_symbols_must_agree_within_one_input():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "square",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n", "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    engine = es.build(model)
    assert engine(x=np.ones((2, 5, 5), np.float32))["y"].shape == (2, 5, 5)
    with pytest.raises(es.InputError, match=r"input 'x' axis 2 is 4, but symbol 'n' is 3 \(the same input axis 1\)"):
        engine(x=np.ones((2, 3, 4), np.float32))


# ----------------------------------------------------------------------------- generated inputs


def test_generated_inputs_take_strided_cnn_sizes_and_the_constant_a_scalar_is_compared_with():
    images = es.build(strided_concat())
    assert images.manifest.checks["samples"]["plan"]["inputs"][0]["shape"] == [2, 3, 224, 224]
    assert images.manifest.checks["build_verification"]["passed"]
    rate = es.build(rate_branch())
    plan = rate.manifest.checks["samples"]["plan"]["inputs"]
    assert {c["name"]: c.get("value") for c in plan} == {"x": None, "sr": 16000}
    assert rate.manifest.checks["build_verification"]["passed"]


def test_sizes_and_values_are_tried_together_and_the_log_says_what_did_not_run():
    # Needs audio of a multiple of 512 samples *and* sr == 16000: the second plan.
    engine = es.build(framed_rate_branch())
    plan = {c["name"]: c for c in engine.manifest.checks["samples"]["plan"]["inputs"]}
    assert plan["audio"]["shape"] == [2, 512] and plan["sr"]["value"] == 16000
    log = "\n".join(engine.manifest.build_log)
    assert ("checks run on generated inputs audio float32[2, 512], sr int64[] = 16000 "
            "(the source does not run on [audio float32[2, 16], sr int64[] = 16000]: node 'frame_16k' (Reshape) failed") in log
    assert engine.manifest.checks["build_verification"]["passed"]


def test_image_size_from_the_model_metadata_is_tried_first():
    model = strided_concat(stride=5)
    onnx.helper.set_model_props(model, {"imgsz": "[320, 320]", "stride": "32"})
    engine = es.build(model)
    assert engine.manifest.checks["samples"]["plan"]["inputs"][0]["shape"] == [2, 3, 320, 320]
    assert engine.manifest.checks["build_verification"]["passed"]


def test_model_its_generated_inputs_crash_stops_with_one_clear_error(tmp_path, capsys):
    path = save(strided_concat(stride=5), tmp_path / "stride5.onnx")
    with pytest.raises(es.BuildError) as info:
        es.build(path, output=tmp_path / "stride5.engine")
    text = str(info.value)
    assert "\n" not in text
    assert "tried [x float32[2, 3, 224, 224]] -> node 'skip_concat' (Concat) failed: Non concat axis dimensions must match" in text
    assert "[x float32[2, 3, 192, 192]]" in text and "[x float32[2, 3, 256, 256]]" in text
    assert "--input x:1x3x?x?" in text and "--data FILE" in text
    assert not (tmp_path / "stride5.engine").exists()
    # The CLI: one line on stderr, exit 2, no traceback.
    assert main(["build", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: build failed at stage 'inputs': the source model does not run on the inputs enginesmith generated")
    assert "Traceback" not in err


def test_input_and_data_flags_fix_a_model_that_needs_other_sizes(tmp_path, capsys):
    model = strided_concat(stride=5)
    path = save(model, tmp_path / "stride5.onnx")
    assert main(["build", str(path), "--input", "x:1x3x160x160", "-o", str(tmp_path / "fixed.engine")]) == 0
    fixed = es.load(tmp_path / "fixed.engine")
    assert fixed.signature.inputs[0].shape == (1, 3, 160, 160)
    assert fixed.manifest.checks["build_verification"]["passed"]

    x = np.random.default_rng(1).standard_normal((3, 3, 40, 40)).astype(np.float32)
    np.savez(tmp_path / "samples.npz", x=x)
    assert main(["build", str(path), "--data", str(tmp_path / "samples.npz"), "-o", str(tmp_path / "data.engine")]) == 0
    engine = es.load(tmp_path / "data.engine")
    np.testing.assert_allclose(engine(x=x)["y"], run_plain(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)
    samples = engine.manifest.checks["samples"]
    assert samples["kind"] == "data" and samples["stored"] == 3
    verification = json.loads(read_bundle(tmp_path / "data.engine", reports=True).reports["build_verification"])
    assert verification["inputs"] == "samples from 'samples.npz'" and verification["samples"] == 3
    # The graph passes were checked on the samples: the leftover Identity is gone.
    assert "remove_training_nodes" in engine.manifest.checks["graph_passes"]["applied"]


def test_scalar_with_a_required_value_needs_data_and_the_data_is_stored_and_reused(tmp_path, capsys):
    model = rate_branch(opaque=True)
    path = save(model, tmp_path / "vad.onnx")
    with pytest.raises(es.BuildError) as info:
        es.build(path)
    text = str(info.value)
    assert "tried [x float32[2, 16], sr int64[] in [0, 10)] -> node 'reshape_8k' (Reshape) failed" in text
    assert "cannot be reshaped to the requested shape" in text
    assert "--data FILE (.npz keyed by x, sr" in text and "--input" not in text

    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    sr = np.array(16000, np.int64)
    target = tmp_path / "vad.engine"
    engine = es.build(path, data={"x": x, "sr": sr}, output=target)
    np.testing.assert_allclose(engine(x=x, sr=sr)["y"], 2 * x)
    assert engine.manifest.checks["build_verification"]["passed"]
    with zipfile.ZipFile(target) as zf:
        assert SAMPLES_ENTRY in zf.namelist()
    # validate without --data uses the stored samples (random ones would take the failing branch).
    report = es.validate(target)
    assert report.passed and report.inputs.startswith("samples stored in the bundle (given arrays)")
    assert report.samples == 5
    # A rebuild elsewhere uses them too.
    rebuilt = es.build(target, output=tmp_path / "rebuilt.engine")
    assert rebuilt.manifest.checks["samples"]["kind"] == "stored"
    assert rebuilt.manifest.checks["build_verification"]["passed"]
    # The CLI's validate says where the inputs came from.
    assert main(["validate", str(tmp_path / "rebuilt.engine")]) == 0
    assert "samples stored in the bundle" in capsys.readouterr().out


def test_validate_of_an_engine_built_on_generated_inputs_uses_the_build_plan(tmp_path):
    target = tmp_path / "rate.engine"
    es.build(rate_branch(), output=target)
    report = es.validate(target)
    assert report.passed
    assert report.inputs == "generated from the build's input plan (x float32[2, 16], sr int64[] = 16000)"
    # bench times it on the same kind of inputs (random ones take the failing branch).
    result = es.bench(target, batches=[1, 4], runs=3, warmup=1)
    assert [r.batch for r in result.results] == [1, 4]


# ----------------------------------------------------------------------------- passes that cannot be checked


def test_pass_whose_check_cannot_run_is_not_applied_and_the_build_goes_on():
    engine = es.build(strided_concat(stride=5), verify=False)
    passes = {r["name"]: r for r in engine.manifest.checks["graph_passes"]["results"]}
    removal = passes["remove_training_nodes"]
    assert removal["status"] == "rolled_back" and removal["reason"].startswith("outputs cannot be checked")
    log = "\n".join(engine.manifest.build_log)
    assert "not applied (their checks could not run) remove_training_nodes" in log
    assert "graph passes and checks could not run" in log
    x = np.ones((1, 3, 10, 10), np.float32)
    np.testing.assert_allclose(engine(x=x)["y"], run_plain(strided_concat(stride=5), {"x": x})["y"], rtol=1e-5)


# ----------------------------------------------------------------------------- bad sample files


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((2, 16), np.float32), "rate": np.array(16000)}, r"unknown: \['rate'\]\) \(missing: \['sr'\]\)"),
        ({"x": np.zeros((2, 4, 4), np.float32), "sr": np.array(16000)}, r"input 'x' has shape \(2, 4, 4\) but the model takes rank 2"),
        ({"x": np.zeros((2, 15), np.float32), "sr": np.array(16000)}, r"input 'x' has shape \(2, 15\), the model needs 16 on axis 1"),
        ({"x": np.zeros((2, 16), np.float32), "sr": np.array(16000.0)}, r"input 'sr' has dtype float64 but the engine takes int64; a float64 -> int64 cast would change values"),
    ],
    ids=["names", "rank", "fixed dim", "dtype"],
)
def test_sample_file_that_does_not_fit_the_model_names_what_is_wrong(tmp_path, arrays, message):
    np.savez(tmp_path / "samples.npz", **arrays)
    out = tmp_path / "vad.engine"
    with pytest.raises(es.ValidationDataError, match=message):
        es.build(rate_branch(opaque=True), data=tmp_path / "samples.npz", output=out)
    assert not out.exists()


def test_oversized_sample_set_is_not_stored_in_full_and_the_log_says_so(tmp_path):
    model = make_mlp(in_features=65536)  # 256 KiB per sample: 40 samples are 10 MiB
    x = np.random.default_rng(3).standard_normal((40, 65536)).astype(np.float32)
    np.save(tmp_path / "big.npy", x)
    target = tmp_path / "big.engine"
    engine = es.build(model, data=tmp_path / "big.npy", output=target)
    stored_count = engine.manifest.checks["samples"]["stored"]
    assert 28 <= stored_count < 40
    assert f"stored the first {stored_count} of 40 samples in the bundle (8 MB limit)" in "\n".join(engine.manifest.build_log)
    with zipfile.ZipFile(target) as zf:
        assert zf.getinfo(SAMPLES_ENTRY).file_size <= 8 * 2**20
    stored = np.load(__import__("io").BytesIO(read_bundle(target, payload=False, samples=True).samples), allow_pickle=False)
    np.testing.assert_array_equal(stored["x"], x[:stored_count])


def _mixed_types_model() -> onnx.ModelProto:
    """Add of a float and an int64 input: ONNX Runtime refuses to load it (type error)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "ids"], ["y"], name="mixed_add")], "unloadable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("flags", [[], ["--no-compat-check"]], ids=["default", "no compat check"])
def test_model_onnx_runtime_cannot_load_is_a_clear_error(tmp_path, capsys, flags):
    path = save(_mixed_types_model(), tmp_path / "unloadable.onnx")
    with pytest.raises(es.EnginesmithError) as info:
        es.build(path, check_compatibility=not flags)
    text = str(info.value)
    assert "\n" not in text and "mixed_add" in text and "bound to different types" in text
    assert main(["build", str(path), *flags]) in (1, 2)
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err and "mixed_add" in err
    assert not (tmp_path / "unloadable.engine").exists()


def test_model_with_fixed_shapes_that_fails_says_the_model_is_broken():
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="bad_reshape")], "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 5])],
        [onnx.numpy_helper.from_array(np.array([5, 5], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    with pytest.raises(es.BuildError, match=r"node 'bad_reshape' \(Reshape\) failed: .*cannot be reshaped.*"
                                            r"fixed shapes, so the model itself fails at that node"):
        es.build(model)


# ----------------------------------------------------------------------------- validate


def test_validate_against_a_model_with_other_input_names_says_so_before_running(tmp_path, capsys, mlp_engine_path):
    other = make_mlp()
    for node in other.graph.node:
        node.input[:] = ["image" if name == "x" else name for name in node.input]
    other.graph.input[0].name = "image"
    other_path = save(other, tmp_path / "other.onnx")
    with pytest.raises(es.ValidationDataError, match=r"the engine's inputs \(x\) and the reference's inputs \(image\) do not match"):
        es.validate(mlp_engine_path, other_path)
    assert main(["validate", str(mlp_engine_path), "--against", str(other_path)]) == 2
    assert "do not match" in capsys.readouterr().err


def test_int8_engine_without_real_inputs_is_inconclusive_not_failed(tmp_path, capsys, mlp_path):
    target = tmp_path / "random_int8.engine"
    with pytest.warns(UserWarning, match="random data"):
        es.build(mlp_path, precision="int8", calibration_random=True, verify=False, output=target)
    assert es.load(target).manifest.checks.get("samples") is None or "stored" not in es.load(target).manifest.checks["samples"]
    report = es.validate(target)
    assert report.inconclusive and "--data DATA" in report.inconclusive and not report.failed
    assert report.summary().startswith("INCONCLUSIVE")
    assert main(["validate", str(target)]) == 0
    out = capsys.readouterr().out
    assert "INCONCLUSIVE" in out and "cannot judge an int8 engine" in out


def test_int8_calibration_data_with_a_scalar_setting_splits_only_the_samples(tmp_path):
    # The sample rate is one value for every call: the hold-out split and the batches keep it whole.
    rng = np.random.default_rng(3)
    data = {"x": rng.standard_normal((40, 16)).astype(np.float32), "sr": np.array(16000, np.int64)}
    engine = es.build(rate_branch(), precision="int8", calibration_data=data, output=tmp_path / "rate.engine")
    assert engine.manifest.checks["calibration"]["holdout_samples"] == 8
    out = engine(x=data["x"][:3], sr=data["sr"])["y"]
    np.testing.assert_allclose(out, data["x"][:3] * 2, rtol=0.1, atol=0.1)


def test_histogram_calibration_batches_keep_scalar_settings_whole():
    from enginesmith.backends.onnxruntime_int8 import equal_batches

    batches = [{"x": np.arange(8.0).reshape(4, 2), "sr": np.array(16000)}, {"x": np.arange(4.0).reshape(2, 2), "sr": np.array(16000)}]
    recut = equal_batches(batches)
    assert [b["x"].shape[0] for b in recut] == [3, 3]
    assert all(b["sr"].ndim == 0 and b["sr"] == 16000 for b in recut)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in recut]), np.concatenate([b["x"] for b in batches]))


@pytest.mark.parametrize("named", [True, False], ids=["named-batch", "unnamed-dims"])
def test_recurrent_state_gets_the_batch_on_axis_1_and_audio_a_window_the_padding_takes(named):
    # Silero VAD: state[2, batch, 128] reaches an LSTM's initial_h through a nested If; a state of
    # another batch than the audio does not run, nor does audio shorter than the reflect padding.
    engine = es.build(recurrent_state_vad(named))
    plan = {c["name"]: c for c in engine.manifest.checks["samples"]["plan"]["inputs"]}
    assert plan["audio"]["shape"] == [2, 512] and plan["state"]["shape"] == [2, 2, 4] and plan["sr"]["value"] == 16000
    assert plan["state"]["batch_axes"] == [1]
    assert engine.manifest.checks["build_verification"]["passed"]
    # The plan resized to another batch resizes the state's batch axis with it.
    feeds = InputPlan.from_dict(engine.manifest.checks["samples"]["plan"]).generate(batch=3)
    assert feeds["audio"].shape == (3, 512) and feeds["state"].shape == (2, 3, 4)
    audio = np.random.default_rng(2).standard_normal((3, 512)).astype(np.float32)
    state = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)
    sr = np.array(16000, np.int64)
    expected = run_plain(recurrent_state_vad(named), {"audio": audio, "state": state, "sr": sr})["y"]
    np.testing.assert_allclose(engine(audio=audio, state=state, sr=sr)["y"], expected, rtol=1e-5, atol=1e-5)


def test_data_for_a_state_batched_on_axis_1_is_cut_along_that_axis(tmp_path):
    # --data with 5 samples: audio[5, 512], state[2, 5, 4] (the signature's 'batch' is its axis 1),
    # sr[]. Cutting the state along axis 0 refused the data, or fed it to the wrong samples.
    from enginesmith.build_inputs import sample_axes, split_samples, take_rows

    model = recurrent_state_vad(named=True)
    rng = np.random.default_rng(5)
    data = {"audio": rng.standard_normal((5, 512)).astype(np.float32),
            "state": rng.standard_normal((2, 5, 4)).astype(np.float32), "sr": np.array(16000, np.int64)}
    engine = es.build(model, data=data, output=tmp_path / "vad.engine")
    assert sample_axes(engine.signature) == {"state": 1}
    assert engine.manifest.checks["build_verification"]["passed"]
    assert engine.manifest.checks["samples"]["samples"] == 5
    batches = split_samples(data, engine.signature, 2)
    assert [b["state"].shape for b in batches] == [(2, 2, 4), (2, 2, 4), (2, 1, 4)]
    assert [b["audio"].shape[0] for b in batches] == [2, 2, 1] and all(b["sr"].ndim == 0 for b in batches)
    # Each batch is the same samples of every input: its outputs are the rows of the whole run's.
    whole = run_plain(model, data)["y"]
    np.testing.assert_allclose(np.concatenate([engine(**b)["y"] for b in batches]), whole, rtol=1e-5, atol=1e-5)
    cycled = take_rows(data, 7, sample_axes(engine.signature))
    assert cycled["state"].shape == (2, 7, 4)
    np.testing.assert_array_equal(cycled["state"][:, 5], data["state"][:, 0])
    # validate re-reads the stored samples and cuts them the same way; an .npz given as --data too.
    report = es.validate(tmp_path / "vad.engine", batch=2)
    assert report.passed
    np.savez(tmp_path / "vad.npz", **data)
    es.build(model, data=tmp_path / "vad.npz", output=tmp_path / "vad2.engine")
    assert es.validate(tmp_path / "vad2.engine", data=tmp_path / "vad.npz", batch=2).passed


def test_error_for_a_window_no_generated_size_takes_suggests_a_flag_for_every_shaped_input():
    # The reflect padding of 600 needs more than 512 samples: no generated size runs.
    with pytest.raises(es.BuildError) as info:
        es.build(recurrent_state_vad(named=True, pad=600))
    text = str(info.value)
    assert "node 'stft_pad' (Pad) failed" in text
    assert "fix the shapes with --input audio:1x? --input state:2x1x4 (a size the model takes for each ?)" in text


def test_an_ocr_recognizer_gets_a_text_line_crop_after_the_square_sizes():
    engine = es.build(text_line_recognizer())
    assert engine.manifest.checks["samples"]["plan"]["inputs"][0]["shape"] == [2, 3, 48, 320]
    assert engine.manifest.checks["build_verification"]["passed"]
    x = np.random.default_rng(4).standard_normal((1, 3, 48, 320)).astype(np.float32)
    np.testing.assert_allclose(engine(x=x)["y"], run_plain(text_line_recognizer(), {"x": x})["y"], rtol=1e-4, atol=1e-4)
