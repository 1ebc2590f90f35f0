"""Batch-1 exports made batch-dynamic (make_dynamic on axis 0), checked item by item against the original.

The detectors are the tracked ones (benchmarks/detection/models/): TF Object Detection API frozen
graphs whose tf2onnx conversion bakes the batch into Reshape targets ([1, -1, 4]), and a YOLOv8
ONNX export fixed at batch 1. A model that runs at batch N but mixes its items must be refused.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_models import _model, run
from onnx import TensorProto, helper, numpy_helper

from enginesmith.cli.app import main
from enginesmith.graph.passes import optimize
from enginesmith.graph.rebatch import carry_batch
from enginesmith.graph.surgery import make_dynamic

DETECTION = Path(__file__).parents[1] / "benchmarks" / "detection"
MODELS = DETECTION / "models"
BATCH = 4
# Outputs at batch 4 against 4 single-item runs of the original: the same kernels on the same data.
PER_ITEM_ATOL = 1e-5


def dims(value):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def make_batch_dynamic(model: onnx.ModelProto, name: str):
    out, summary = optimize(model, [("make_dynamic", {"axes": {name: [0]}})])
    return out, summary.results[0], summary


def per_item_diffs(original: onnx.ModelProto, dynamic: onnx.ModelProto, name: str, batch: np.ndarray) -> dict[str, float]:
    """Max abs diff per output between one run at batch N and N runs of the original on one item each."""
    together = run(dynamic, {name: batch})
    alone = [run(original, {name: batch[i:i + 1]}) for i in range(len(batch))]
    diffs = {}
    for out, value in together.items():
        expected = np.concatenate([single[out] for single in alone])
        assert value.shape == expected.shape, out
        diffs[out] = float(np.abs(value.astype(np.float64) - expected).max())
    return diffs


def items_differ(model: onnx.ModelProto, name: str, batch: np.ndarray) -> bool:
    """The items give different outputs (so equal per-item outputs are not four copies of one)."""
    first, second = run(model, {name: batch[:1]}), run(model, {name: batch[1:2]})
    return any(not np.array_equal(first[out], second[out]) for out in first)


@pytest.fixture(scope="module")
def tf_detector(tmp_path_factory):
    """name -> path of the tracked frozen graph imported to ONNX (tf2onnx, through enginesmith's importer)."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    from enginesmith.importers import import_model

    folder = tmp_path_factory.mktemp("detectors")
    done: dict[str, Path] = {}

    def load(name: str) -> Path:
        if name not in done:
            path = folder / f"{name}.onnx"
            onnx.save(import_model(MODELS / f"{name}.pb").model, path)
            done[name] = path
        return done[name]

    return load


@pytest.fixture(scope="module")
def scenes() -> np.ndarray:
    """Four different synthetic thermal scenes, [4, 160, 160, 3] uint8 (the detectors' training domain)."""
    pytest.importorskip("cv2")
    sys.path.insert(0, str(DETECTION))
    import synth_data

    pixels, _ = synth_data.scenes_in_memory(BATCH, seed=7)
    return np.repeat(pixels[..., None], 3, axis=-1)


@pytest.mark.tensorflow
def test_tf_od_api_ssd_becomes_batch_dynamic_and_equals_single_item_runs(tf_detector, scenes):
    original = onnx.load(tf_detector("ssd_mobilenet_v2_synth_raw"))
    assert dims(original.graph.input[0]) == [1, 160, 160, 3]
    dynamic, result, summary = make_batch_dynamic(original, "image_tensor")
    assert result.status == "applied", result.reason
    assert dims(dynamic.graph.input[0]) == ["batch", 160, 160, 3]
    assert len(result.notes) == 1 and "6 Reshape target(s) [1, ...] -> [0, ...]" in result.notes[0]
    assert any("6 Reshape target(s)" in line for line in summary.lines())
    diffs = per_item_diffs(original, dynamic, "image_tensor", scenes)
    assert set(diffs) == {"raw_detection_boxes", "raw_detection_scores"}
    assert max(diffs.values()) <= PER_ITEM_ATOL, diffs
    assert items_differ(original, "image_tensor", scenes)
    # At batch 1 the rewritten model is the original exactly.
    one = scenes[:1]
    for name, value in run(dynamic, {"image_tensor": one}).items():
        np.testing.assert_array_equal(value, run(original, {"image_tensor": one})[name])


@pytest.mark.tensorflow
def test_ssd_with_in_graph_nms_becomes_batch_dynamic_item_by_item(tf_detector, scenes):
    # tf2onnx's CombinedNonMaxSuppression keeps a batch axis; only the backbone's Reshapes baked the 1 in.
    original = onnx.load(tf_detector("ssd_mobilenet_v2_synth"))
    dynamic, result, _ = make_batch_dynamic(original, "image_tensor")
    assert result.status == "applied", result.reason
    diffs = per_item_diffs(original, dynamic, "image_tensor", scenes)
    assert set(diffs) == {"detection_boxes", "detection_classes", "detection_scores", "num_detections"}
    assert max(diffs.values()) <= PER_ITEM_ATOL, diffs
    assert items_differ(original, "image_tensor", scenes)


def test_yolov8_export_fixed_at_batch_one_becomes_batch_dynamic():
    original = onnx.load(MODELS / "yolov8_synth.onnx")
    assert dims(original.graph.input[0]) == [1, 3, 160, 160]
    dynamic, result, _ = make_batch_dynamic(original, "images")
    assert result.status == "applied", result.reason
    images = np.random.default_rng(3).random((BATCH, 3, 160, 160), np.float32)
    diffs = per_item_diffs(original, dynamic, "images", images)
    assert max(diffs.values()) <= PER_ITEM_ATOL, diffs
    assert items_differ(original, "images", images)


def channels_first_then(target: list[int], out_dims: list[int]) -> onnx.ModelProto:
    """x[1, 2, 4] -> Transpose (the channel axis goes first: dim 0 is no longer the batch) -> Reshape(target)."""
    return _model([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2], name="channels_first"),
                   helper.make_node("Reshape", ["t", "target"], ["y"], name="flatten")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)],
                  [numpy_helper.from_array(np.array(target, np.int64), "target")])


@pytest.mark.parametrize("target, message", [
    # [1, -1] at batch 3 gives [1, 24]: every item in one row.
    ([1, -1], r"output 'y' has shape \(1, 24\) at batch 3, not \(3, 8\): its dim 0 does not follow the batch, "
              r"so the model mixes batch items"),
    # [-1, 8] at batch 3 gives [3, 8], the right shape, but each row holds parts of several items.
    ([-1, 8], r"output 'y' mixes batch items: item 1 of 3 is not what that item gives alone at batch 1 \(differs"),
])
def test_a_model_that_runs_at_batch_n_but_mixes_items_is_refused(target, message):
    model = channels_first_then(target, [1, 8])
    # What the check used to ask (does it run at another batch?) says yes:
    assert run(make_dynamic(model, {"x": [0]}), {"x": np.ones((3, 2, 4), np.float32)})["y"].size == 24
    out, summary = optimize(model, [("make_dynamic", {"axes": {"x": [0]}})])
    result = summary.results[0]
    assert result.status == "rolled_back"
    assert result.reason.endswith("the model stays at batch 1 (checked at batch 3 against each item run alone)")
    assert re.search(message, result.reason), result.reason
    assert dims(out.graph.input[0]) == [1, 2, 4]


def test_an_output_that_is_not_batched_is_named_as_such():
    # A flat list: y[K] (a reduction over everything, as a detection list over all items would be).
    model = _model([helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0, name="total")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                   [numpy_helper.from_array(np.array([0], np.int64), "axes")])
    _, summary = optimize(model, [("make_dynamic", {"axes": {"x": [0]}})])
    reason = summary.results[0].reason
    assert summary.results[0].status == "rolled_back"
    assert "output 'y' has shape (4,) for one item: its dim 0 is not the batch (a flat list" in reason


def test_carry_batch_rewrites_only_batch_one_reshapes_and_never_a_shared_constant():
    # x[1, 6] -> Reshape(shape [1, 2, 3]) and Reshape(Constant [1, -1]); the weight w[2, 3] is reshaped
    # with the same [1, 2, 3] initializer (its dim 0 is not the batch: it must keep its target).
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["a"], name="batch_reshape"),
             helper.make_node("Constant", [], ["flat"], value=numpy_helper.from_array(np.array([1, -1], np.int64))),
             helper.make_node("Reshape", ["x", "flat"], ["b"], name="flatten"),
             helper.make_node("Reshape", ["w", "shape"], ["c"], name="weight_reshape"),
             helper.make_node("Reshape", ["x", "keep"], ["d"], name="allowzero_reshape", allowzero=1)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                   [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abcd"],
                   [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "shape"),
                    numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w"),
                    numpy_helper.from_array(np.array([1, 6], np.int64), "keep")])
    before = model.SerializeToString()
    out, notes = carry_batch(model, {"x"})
    assert model.SerializeToString() == before
    assert notes == ["batch carried through 2 Reshape target(s) [1, ...] -> [0, ...]: batch_reshape, flatten"]
    inits = {t.name: numpy_helper.to_array(t).tolist() for t in out.graph.initializer}
    by_name = {n.name: n for n in out.graph.node}
    assert inits["shape"] == [1, 2, 3] and by_name["weight_reshape"].input[1] == "shape"
    assert inits[by_name["batch_reshape"].input[1]] == [0, 2, 3]
    assert inits["keep"] == [1, 6] and by_name["allowzero_reshape"].input[1] == "keep"
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    got, was = run(out, {"x": x}), run(model, {"x": x})
    for name in "abcd":
        np.testing.assert_array_equal(got[name], was[name])
    # Nothing to carry when no input's axis 0 is a batch of 1.
    assert carry_batch(model, set())[1] == []


@pytest.mark.tensorflow
@pytest.mark.usefixtures("wide_console")
def test_cli_builds_the_ssd_with_a_dynamic_batch_and_runs_four_frames(tf_detector, scenes, tmp_path, capsys):
    source = tf_detector("ssd_mobilenet_v2_synth_raw")
    engine = tmp_path / "ssd.engine"
    assert main(["build", str(source), "-o", str(engine), "--backend", "onnxruntime",
                 "--dynamic", "image_tensor:0"]) == 0
    assert main(["info", str(engine)]) == 0
    info = " ".join(capsys.readouterr().out.split())
    assert re.search(r"image_tensor\W+uint8\W+\[batch, 160, 160, 3\]", info), info
    assert re.search(r"raw_detection_boxes\W+float32\W+\[batch, 1050, 4\]", info), info
    frames = tmp_path / "frames.npy"
    np.save(frames, scenes)
    outputs = tmp_path / "out.npz"
    assert main(["run", str(engine), "-d", f"image_tensor={frames}", "--out", str(outputs)]) == 0
    original = onnx.load(source)
    with np.load(outputs, allow_pickle=False) as got:
        for name in ("raw_detection_boxes", "raw_detection_scores"):
            expected = np.concatenate([run(original, {"image_tensor": scenes[i:i + 1]})[name] for i in range(BATCH)])
            assert got[name].shape == expected.shape
            assert float(np.abs(got[name] - expected).max()) <= PER_ITEM_ATOL


@pytest.mark.tensorflow
def test_frozen_graph_built_with_a_dynamic_batch_runs_four_frames_as_four_single_ones(tf_detector, scenes, tmp_path):
    # tf2onnx cannot convert the graph with its batch unknown (TensorFlow's own Reshapes hold the 1):
    # the importer converts it at batch 1 and the make_dynamic pass carries the batch.
    import enginesmith as es

    engine = es.build(MODELS / "ssd_mobilenet_v2_synth_raw.pb", backend="onnxruntime", output=tmp_path / "ssd.engine",
                      import_options=es.ImportOptions(dynamic_axes={"image_tensor": [0]}))
    log = "\n".join(engine.manifest.build_log)
    assert "converted at the graph's own shapes" in log and "6 Reshape target(s)" in log
    assert [spec.shape for spec in engine.signature.inputs] == [("batch", 160, 160, 3)]
    got = engine.infer({"image_tensor": scenes})
    original = onnx.load(tf_detector("ssd_mobilenet_v2_synth_raw"))
    for name in ("raw_detection_boxes", "raw_detection_scores"):
        expected = np.concatenate([run(original, {"image_tensor": scenes[i:i + 1]})[name] for i in range(BATCH)])
        assert got[name].shape == expected.shape
        assert float(np.abs(got[name] - expected).max()) <= PER_ITEM_ATOL


@pytest.mark.tensorflow
@pytest.mark.slow
def test_savedmodel_built_with_a_dynamic_batch_keeps_its_items_apart(scenes, tmp_path):
    pytest.importorskip("tensorflow")
    import enginesmith as es

    engine = es.build(MODELS / "ssd_mobilenet_v2_synth_savedmodel", backend="onnxruntime",
                      output=tmp_path / "ssd.engine", import_options=es.ImportOptions(dynamic_axes={"image_tensor": [0]}))
    assert "converted at the graph's own shapes" in "\n".join(engine.manifest.build_log)
    together = engine.infer({"image_tensor": scenes})
    alone = [engine.infer({"image_tensor": scenes[i:i + 1]}) for i in range(BATCH)]
    for name, value in together.items():
        np.testing.assert_allclose(value, np.concatenate([single[name] for single in alone]), rtol=0, atol=PER_ITEM_ATOL)
