"""ONNX NonMaxSuppression on the PyTorch backend (backends/torch_compile/onnx_ops.py converter, onnx_nms.py):
the converter against ONNX Runtime's selection, and the trained SSD whose graph holds NMS (tf2onnx's
CombinedNonMaxSuppression: NMS, ScatterND, TopK, CumSum, padded outputs) built and compared with ONNX Runtime."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import pytest
from conftest import run_plain
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed", allow_module_level=True)

from enginesmith.backends import BuildOptions, get_backend  # noqa: E402
from enginesmith.errors import UnsupportedModelError  # noqa: E402
from enginesmith.graph.compat import compatibility_report  # noqa: E402
from enginesmith.importers import import_model  # noqa: E402

EAGER = BuildOptions(backend_options={"device": os.environ.get("ENGINESMITH_TEST_DEVICE", "cpu"), "compile": "eager"})
DETECTION = Path(__file__).parents[1] / "benchmarks" / "detection"


def nms_model(max_per_class: int | None, iou: float | None, score: float | None, center_point_box: int = 0,
              opset: int = 11, computed_iou: bool = False) -> onnx.ModelProto:
    """One NonMaxSuppression node with constant thresholds (omitted inputs where None); boxes [b, n, 4] and
    scores [b, c, n] with open sizes. ``computed_iou``: the IoU threshold is a graph input instead."""
    inits, names = [], ["boxes", "scores"]
    inputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["b", "n", 4]),
              helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b", "c", "n"])]
    for name, value, dtype in (("max_per_class", max_per_class, np.int64), ("iou", iou, np.float32),
                               ("score", score, np.float32)):
        if name == "iou" and computed_iou:
            inputs.append(helper.make_tensor_value_info("iou", TensorProto.FLOAT, [1]))
            names.append("iou")
        elif value is None:
            names.append("")
        else:
            inits.append(numpy_helper.from_array(np.array([value], dtype), name))
            names.append(name)
    while names[-1] == "":
        names.pop()
    node = helper.make_node("NonMaxSuppression", names, ["selected"], name="nms", center_point_box=center_point_box)
    graph = helper.make_graph([node], "nms", inputs, [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def build_torch(model: onnx.ModelProto):
    imported = import_model(model)
    backend = get_backend("torch")
    result = backend.build(imported.model, imported.signature, EAGER)
    return backend.load(result.payload, result.resolved_options, imported.signature)


@functools.lru_cache(maxsize=None)
def nms_engine(*config):
    return build_torch(nms_model(*config))


def scene(seed: int, batches: int, classes: int, count: int, center: bool, ties: bool) -> dict[str, np.ndarray]:
    """Random overlapping boxes (corners in either diagonal order, or centre + size) and scores; with ``ties``
    scores take four values and some boxes are exact copies, so ONNX Runtime's tie rule decides."""
    rng = np.random.default_rng(seed)
    corner = rng.uniform(0, 60, (batches, count, 2))
    size = rng.uniform(4, 30, (batches, count, 2))
    if center:
        boxes = np.concatenate([corner + size / 2, size], -1)
    else:
        boxes = np.concatenate([corner, corner + size], -1)[..., [1, 0, 3, 2]]  # y1, x1, y2, x2
        flip = rng.random((batches, count)) < 0.3
        boxes[flip] = boxes[flip][:, [2, 3, 0, 1]]  # the other diagonal pair: still the same box
    scores = rng.random((batches, classes, count))
    if ties:
        scores = np.round(scores * 3) / 3
        boxes[:, 1::5] = boxes[:, 0:-1:5][:, : boxes[:, 1::5].shape[1]]
    return {"boxes": boxes.astype(np.float32), "scores": scores.astype(np.float32)}


CONFIGS = {  # (max_output_boxes_per_class, iou_threshold, score_threshold, center_point_box, opset)
    "corners": (5, 0.45, 0.3, 0, 11),
    "centres, no score threshold": (1000, 0.3, None, 1, 11),
    "one per class, opset 10": (1, 0.6, 0.0, 0, 10),
    "iou 0 (any overlap suppresses)": (50, 0.0, 0.2, 1, 11),
}


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_nms_selects_what_onnxruntime_selects(config):
    engine = nms_engine(*config)
    model = nms_model(*config)
    center = bool(config[3])
    cases = [(seed, 1 + seed % 3, 1 + seed % 4, 20 + 23 * seed, ties) for seed in range(6) for ties in (False, True)]
    selected = dropped = 0
    for seed, batches, classes, count, ties in cases:
        feeds = scene(seed, batches, classes, count, center, ties)
        want = run_plain(model, feeds)["selected"]
        got = engine.run(feeds)["selected"]
        assert got.dtype == np.int64 and got.shape[1:] == (3,)
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, ties {ties}, {batches}x{classes}x{count}")
        candidates = int((feeds["scores"] > (config[2] if config[2] is not None else -np.inf)).sum())
        selected, dropped = selected + len(want), dropped + candidates - len(want)
    assert selected > len(cases) and dropped > len(cases)  # boxes were kept, and suppression or the cap bit


def test_nms_comparing_every_box_selects_what_onnxruntime_selects(monkeypatch):
    """The path for PyTorch releases whose export cannot loop over data-dependent sizes (2.11 on the GPU machine):
    no trimming to the candidates, the same selection."""
    from enginesmith.backends.torch_compile import onnx_nms

    monkeypatch.setattr(onnx_nms, "_loop_takes_data_dependent_sizes", lambda torch: False)
    config = CONFIGS["corners"]
    engine, model = build_torch(nms_model(*config)), nms_model(*config)
    for seed, ties in ((21, False), (22, True), (23, False)):
        feeds = scene(seed, 2, 3, 60, False, ties)
        want = run_plain(model, feeds)["selected"]
        assert len(want) > 3
        np.testing.assert_array_equal(engine.run(feeds)["selected"], want)


@pytest.mark.slow
def test_nms_compiled_by_inductor_selects_what_onnxruntime_selects():
    """The default build (Inductor, not the eager exported program) lowers the while_loop and the unbacked sizes."""
    config = (5, 0.45, 0.3, 0, 11)
    imported = import_model(nms_model(*config))
    backend = get_backend("torch")
    options = BuildOptions(backend_options={"device": EAGER.backend_options["device"]})
    result = backend.build(imported.model, imported.signature, options)
    assert result.resolved_options.backend_options.get("compile", "inductor") == "inductor"
    engine = backend.load(result.payload, result.resolved_options, imported.signature)
    for seed in (11, 12):
        feeds = scene(seed, 2, 3, 90, False, seed == 12)
        np.testing.assert_array_equal(engine.run(feeds)["selected"], run_plain(nms_model(*config), feeds)["selected"])


def test_nms_with_everything_under_the_score_threshold_or_no_output_allowed_selects_nothing():
    feeds = scene(3, 2, 3, 40, False, False)
    for config in ((5, 0.5, 2.0, 0, 11), (0, 0.5, 0.1, 0, 11), (None, None, None, 0, 11)):
        want = run_plain(nms_model(*config), feeds)["selected"]
        got = nms_engine(*config).run(feeds)["selected"]
        assert want.shape == (0, 3) and got.shape == (0, 3) and got.dtype == np.int64


def test_nms_never_selects_a_nan_score_under_a_threshold():
    # One class: its row is the widest, so NaN sorted first (torch's order) would push candidates out of the prefix.
    feeds = scene(4, 1, 1, 30, False, False)
    feeds["scores"][0, 0, ::3] = np.nan
    config = (10, 0.5, 0.1, 0, 11)
    want = run_plain(nms_model(*config), feeds)["selected"]
    np.testing.assert_array_equal(nms_engine(*config).run(feeds)["selected"], want)
    assert len(want) > 0 and not np.isin(want[want[:, 1] == 0, 2], np.arange(0, 30, 3)).any()


def test_nms_keeps_onnxruntimes_order_for_equal_scores():
    # Four identical boxes with one score: the lowest index is kept, then per class in class order.
    boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (1, 4, 1))
    boxes = np.concatenate([boxes, np.array([[[20, 20, 30, 30], [20, 20, 30, 30]]], np.float32)], axis=1)
    scores = np.full((1, 2, 6), 0.5, np.float32)
    feeds = {"boxes": boxes, "scores": scores}
    config = (10, 0.5, 0.1, 0, 11)
    want = run_plain(nms_model(*config), feeds)["selected"]
    np.testing.assert_array_equal(want, [[0, 0, 0], [0, 0, 4], [0, 1, 0], [0, 1, 4]])
    np.testing.assert_array_equal(nms_engine(*config).run(feeds)["selected"], want)


def test_inspect_reports_nms_supported_and_refuses_a_computed_threshold_naming_the_node():
    report = compatibility_report(nms_model(5, 0.5, 0.1), "torch")
    assert report.counts.get("supported") == 1 and report.counts.get("unsupported", 0) == 0
    computed = nms_model(5, None, 0.1, computed_iou=True)
    report = compatibility_report(computed, "torch")
    assert report.counts.get("unsupported") == 1
    assert "NonMaxSuppression node 'nms': iou_threshold ('iou') is computed at run time" in report.summary() \
        or any("computed at run time" in str(row) for row in report.to_dict()["nodes"])
    imported = import_model(computed)
    with pytest.raises(UnsupportedModelError, match=r"nms.*iou_threshold.*constant"):
        get_backend("torch").build(imported.model, imported.signature, EAGER)


def test_nms_refuses_an_iou_threshold_outside_0_1():
    report = compatibility_report(nms_model(5, 1.5, 0.1), "torch")
    assert report.counts.get("unsupported") == 1
    assert any("outside [0, 1]" in str(row) for row in report.to_dict()["nodes"])


# ONNX's own conformance cases for the op (shipped in the onnx wheel as onnx.backend.test.case.node.nonmaxsuppression,
# Apache-2.0, ONNX Project Contributors): boxes, scores and thresholds with the selection ONNX's authors expect
# (flipped corners, identical boxes, centre format, an IoU exactly at the threshold, two batches, two classes).
ONNX_CASES = "onnx.backend.test.case.node.nonmaxsuppression"


def onnx_conformance_cases() -> list:
    from onnx.backend.test.case.node import collect_testcases

    return [case for case in collect_testcases("NonMaxSuppression") if case.name.startswith("test_nonmaxsuppression")]


def with_constant_thresholds(model: onnx.ModelProto, feeds: list[np.ndarray]) -> onnx.ModelProto:
    """The case's model with max_output_boxes_per_class / iou / score thresholds (graph inputs there) as initializers."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    names = [value.name for value in folded.graph.input]
    for name, value in zip(names[2:], feeds[2:]):
        folded.graph.initializer.append(numpy_helper.from_array(value, name))
    kept = [value for value in folded.graph.input if value.name in names[:2]]
    del folded.graph.input[:]
    folded.graph.input.extend(kept)
    return folded


def test_nms_passes_onnxs_own_conformance_cases():
    cases = onnx_conformance_cases()
    assert len(cases) >= 10, f"{ONNX_CASES} holds fewer cases than onnx 1.23 did"
    for case in cases:
        (feeds, expected), = case.data_sets
        model = with_constant_thresholds(case.model, feeds)
        engine = build_torch(model)
        got = engine.run({"boxes": feeds[0], "scores": feeds[1]})
        np.testing.assert_array_equal(next(iter(got.values())), expected[0], err_msg=case.name)


# ----------------------------------------------------------------- the trained SSD with NMS in its graph

HEAD = "ssd_mobilenet_v2_synth_1/concatenate_5_1/concat:0"  # [1, anchors, 4 box + 5 class logits]


@pytest.fixture(scope="module")
def ssd_onnx() -> onnx.ModelProto:
    pytest.importorskip("cv2")
    # The GPU machine has no TensorFlow: there the frozen graph's conversion, made where TensorFlow is
    # (scripts/gpu_detect.sh prepare), is named by ENGINESMITH_SSD_ONNX (scripts/gpu_zoo.sh tests sets it).
    converted = os.environ.get("ENGINESMITH_SSD_ONNX")
    if converted:
        return onnx.load(converted)
    pytest.importorskip("tensorflow")
    return import_model(DETECTION / "models" / "ssd_mobilenet_v2_synth.pb").model


@pytest.fixture(scope="module")
def scenes() -> np.ndarray:
    sys.path.insert(0, str(DETECTION))
    import synth_data

    pixels, _ = synth_data.scenes_in_memory(4, seed=5)
    return np.repeat(pixels[..., None], 3, axis=-1)  # the detector reads [1, 160, 160, 3] uint8


def test_ssd_with_nms_builds_and_detects_what_onnxruntime_detects(ssd_onnx, scenes):
    assert any(node.op_type == "NonMaxSuppression" for node in ssd_onnx.graph.node)
    engine = build_torch(ssd_onnx)
    for image in scenes:
        feeds = {"image_tensor": image[None]}
        want, got = run_plain(ssd_onnx, feeds), engine.run(feeds)
        count = int(want["num_detections"][0])
        assert got["num_detections"][0] == count and count > 0
        # The backbone differs from ONNX Runtime's in the last bits, which can swap two low-score candidates
        # of near-equal score; every confident detection is the same box, class and score.
        confident = want["detection_scores"][0] >= 0.1
        assert confident.sum() >= 1
        np.testing.assert_array_equal(got["detection_classes"][0][confident], want["detection_classes"][0][confident])
        np.testing.assert_allclose(got["detection_scores"][0][confident], want["detection_scores"][0][confident], atol=1e-5)
        np.testing.assert_allclose(got["detection_boxes"][0][confident], want["detection_boxes"][0][confident], atol=1e-5)


def test_ssd_with_nms_made_batch_dynamic_detects_each_image_of_a_batch_as_alone(ssd_onnx, scenes):
    """Several cameras in one call: the frozen graph (batch 1) made batch-dynamic by the graph pass, then
    exported with the batch open. It failed with "Constraints violated (batch)": a slice against tf2onnx's
    end of 1e9 added a guard "batch >= 2", and the computed k of TopK and pads of Pad reached onnx2torch's
    converters as Python lists."""
    from enginesmith.graph.passes import optimize

    dynamic, summary = optimize(ssd_onnx, [("make_dynamic", {"axes": {"image_tensor": [0]}})])
    assert summary.results[0].status == "applied"
    imported = import_model(dynamic)
    backend = get_backend("torch")
    result = backend.build(imported.model, imported.signature, EAGER)
    assert any("dynamic batch" in line for line in result.log), result.log
    engine = backend.load(result.payload, result.resolved_options, imported.signature)
    for batch in (len(scenes), 1):
        got = engine.run({"image_tensor": scenes[:batch]})
        alone = [run_plain(ssd_onnx, {"image_tensor": image[None]}) for image in scenes[:batch]]
        np.testing.assert_array_equal(got["num_detections"], np.concatenate([want["num_detections"] for want in alone]))
        for row, want in enumerate(alone):
            confident = want["detection_scores"][0] >= 0.1  # as above: near-ties among low scores may swap
            assert confident.sum() >= 1
            np.testing.assert_array_equal(got["detection_classes"][row][confident], want["detection_classes"][0][confident])
            np.testing.assert_allclose(got["detection_scores"][row][confident], want["detection_scores"][0][confident], atol=1e-5)
            np.testing.assert_allclose(got["detection_boxes"][row][confident], want["detection_boxes"][0][confident], atol=1e-5)


def test_ssd_made_batch_dynamic_makes_every_tensor_on_its_inputs_device(ssd_onnx, scenes):
    """On the H200 the test above failed: "Tensor on device cpu is not on the expected device cuda:0!" in a
    Concat. onnx2torch's EyeLike (the batched NMS's index grid) made its matrix on the CPU; shape values cast
    to a tensor did too. This CPU finds every tensor the converted model makes without naming a device."""
    from conftest import device_less_tensors

    from enginesmith.backends.torch_compile.onnx_convert import onnx_to_torch
    from enginesmith.graph.passes import optimize

    dynamic, _ = optimize(ssd_onnx, [("make_dynamic", {"axes": {"image_tensor": [0]}})])
    imported = import_model(dynamic)
    module, _ = onnx_to_torch(imported.model, imported.signature, [])
    assert device_less_tensors(module, torch.from_numpy(scenes[:2])) == []


def test_ssd_postprocessing_selects_exactly_onnxruntimes_detections_from_the_same_head_outputs(ssd_onnx, scenes):
    """From the head's outputs (the same numbers for both runtimes) every one of the 100 detections matches:
    real heads on rendered scenes, and a head quantized so that many scores tie exactly."""
    probe = onnx.ModelProto()
    probe.CopyFrom(ssd_onnx)
    probe.graph.output.append(helper.make_tensor_value_info(HEAD, TensorProto.FLOAT, None))
    post = onnx.utils.Extractor(ssd_onnx).extract_model([HEAD], [o.name for o in ssd_onnx.graph.output])
    assert {n.op_type for n in post.graph.node} >= {"NonMaxSuppression", "ScatterND", "TopK", "CumSum", "Pad"}
    engine = build_torch(post)
    heads = [run_plain(probe, {"image_tensor": image[None]})[HEAD] for image in scenes]
    heads.append(np.round(heads[0] * 2) / 2)  # ties in scores and identical boxes
    for head in heads:
        feeds = {HEAD: head.astype(np.float32)}
        want, got = run_plain(post, feeds), engine.run(feeds)
        assert set(got) == set(want)
        np.testing.assert_array_equal(got["num_detections"], want["num_detections"])
        np.testing.assert_array_equal(got["detection_classes"], want["detection_classes"])
        # The box decoding (exp) and softmax differ from ONNX Runtime's in the last bit; a different selection
        # would move a box or score by far more.
        np.testing.assert_allclose(got["detection_scores"], want["detection_scores"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got["detection_boxes"], want["detection_boxes"], rtol=0, atol=1e-6)
