"""Detection with pre- and post-processing on the engine's device (the PyTorch backend's device ops):
the same boxes as the host path. Run here on the CPU device; with ENGINESMITH_TEST_DEVICE=cuda
(scripts/gpu_detect.sh tests) on the GPU, where NMS is torchvision's."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("cv2")
pytest.importorskip("torch")

import enginesmith as es
from enginesmith import vision
from enginesmith.errors import InputError
from enginesmith.runtime.engine import ImageGeometry
from enginesmith.vision.detector import DetectorSettings, select_detections
from enginesmith.vision.heads import Candidates, choose_head
from enginesmith.vision.transform import Placement, to_batch

from test_vision_fast_paths import crowded_yolov8
from vision_models import make_colour_yolov8

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from detect import colour_yolov8_batch  # noqa: E402

pytestmark = pytest.mark.torch
DEVICE = os.environ.get("ENGINESMITH_TEST_DEVICE", "cpu")
EAGER = {"compile": "eager", "device": DEVICE}


@pytest.fixture(scope="module")
def torch_engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device")
    onnx.save(make_colour_yolov8(160, ["red", "green", "blue"]), folder / "colour.onnx")
    return es.build(folder / "colour.onnx", backend="torch", backend_options=EAGER)


def as_rows(detections) -> list[tuple]:
    return sorted((tuple(round(v, 3) for v in d.box), d.class_id) for d in detections)


def test_device_detection_finds_the_boxes_the_host_path_finds(torch_engine) -> None:
    host = vision.Detector(torch_engine, DetectorSettings(conf=0.5, on_device=False))
    device = vision.Detector(torch_engine, DetectorSettings(conf=0.5, on_device=True))
    assert host.device_ops is None and device.device_ops is not None
    assert device.batch_buffer(3) is None  # batches are made on the device
    scene = vision.SyntheticScene(width=640, height=480, objects=4, seed=4)
    frames = [scene.render(i)[0] for i in range(3)] + [scene.render(9)[0][:120, :160].copy()]
    # Four frames in one call: the engine takes one at a time, so the device path runs it in pieces.
    on_host, on_device = host(frames), device(frames)
    assert sum(map(len, on_host)) > 10
    for expected, got in zip(on_host, on_device):
        assert as_rows(got) == as_rows(expected)
        np.testing.assert_allclose(sorted(d.score for d in got), sorted(d.score for d in expected), atol=0.02)


def test_device_batches_equal_the_host_batches_where_nothing_is_resized(torch_engine) -> None:
    detector = vision.Detector(torch_engine, DetectorSettings(on_device=True))
    frame = vision.SyntheticScene(width=160, height=100, seed=1).render(0)[0]
    feeds, placements = detector.preprocess([frame, frame[::-1].copy()])
    expected, expected_places = to_batch([frame, frame[::-1].copy()], detector.spec, detector.input_hw)
    np.testing.assert_allclose(detector.device_ops.to_host(feeds["images"]), expected, rtol=0, atol=1e-6)
    assert placements == expected_places


def test_device_ops_normalize_swap_channels_and_lay_out_like_the_spec(torch_engine) -> None:
    ops = torch_engine.device_ops
    frame = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    batch = ops.to_host(ops.images_to_batch([frame], [ImageGeometry(4, 6, 1, 0)], (6, 6), pad_value=114, swap_rb=True,
                                            scale=1 / 255, mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4], layout="NHWC",
                                            dtype="float16"))
    canvas = np.full((6, 6, 3), 114, np.float32)
    canvas[1:5] = frame[..., ::-1]
    expected = (canvas / 255 - np.array([0.5, 0.4, 0.3], np.float32)) / np.array([0.2, 0.3, 0.4], np.float32)
    assert batch.dtype == np.float16 and batch.shape == (1, 6, 6, 3)
    np.testing.assert_allclose(batch[0].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_uint8_pictures_for_tensorflow_detectors_are_made_on_the_device_like_on_the_host(torch_engine) -> None:
    ops = torch_engine.device_ops
    frame = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)

    def made(dtype: str) -> np.ndarray:
        return ops.to_host(ops.images_to_batch([frame], [ImageGeometry(15, 20, 0, 0)], (15, 20), pad_value=0,
                                               swap_rb=True, scale=1.0, mean=[0, 0, 0], std=[1, 1, 1], layout="NHWC",
                                               dtype=dtype))

    batch, exact = made("uint8"), made("float32")
    assert batch.dtype == np.uint8 and batch.shape == (1, 15, 20, 3)
    np.testing.assert_array_equal(batch, np.clip(np.round(exact), 0, 255).astype(np.uint8))  # rounded, not truncated
    assert (exact != np.round(exact)).any()  # the resize made fractions: truncation would have shown


@pytest.mark.parametrize("conf", [0.05, 0.4])
def test_device_score_floor_top_k_and_nms_keep_what_the_host_keeps(torch_engine, conf) -> None:
    import torch

    ops = torch_engine.device_ops
    raw = crowded_yolov8(7)
    raw[0, 4:, :20] += np.linspace(0, 1e-3, 20, dtype=np.float32)  # no exact ties: the order is then unique
    settings = DetectorSettings(conf=conf, iou=0.5, max_detections=40)
    place = Placement(1.0, 1.0, 0.0, 0.0, 320, 320)
    head = choose_head({"output0": raw.shape}, (320, 320))
    expected = select_detections(head.decode({"output0": raw}, 0, (320, 320), conf), settings, place, None)
    (boxes, scores, classes), = ops.select_boxes(torch.from_numpy(raw).to(DEVICE), "channels_cxcywh", conf, 0.5, 40, 30000)
    got = select_detections(Candidates(boxes, scores, classes, suppressed=True), settings, place, None)
    assert len(got) == len(expected) > 5
    np.testing.assert_allclose([d.box for d in got], [d.box for d in expected], atol=1e-4)
    np.testing.assert_allclose([d.score for d in got], [d.score for d in expected], atol=1e-6)
    assert [d.class_id for d in got] == [d.class_id for d in expected]
    # top-k cuts before NMS: with k=1 only the best box can survive
    (one, _, _), = ops.select_boxes(torch.from_numpy(raw).to(DEVICE), "channels_cxcywh", conf, 0.5, 40, 1)
    assert len(one) == 1
    np.testing.assert_allclose(place.to_frame(one), [expected[0].box], atol=1e-4)


def test_device_box_selection_of_a_batch_equals_each_image_alone(torch_engine) -> None:
    """One NMS over the whole batch: no box of one image suppresses another's, each image keeps its own best
    ``max_boxes``, and an image with nothing above the floor gets empty arrays in its place."""
    import torch

    ops = torch_engine.device_ops
    images = [crowded_yolov8(seed) for seed in (7, 8, 9)]
    images[1][:, 4:] *= 0.01  # nothing above the floor
    images[2][:, :4] = images[0][:, :4]  # the same boxes as image 0: they would suppress each other across images
    for arr in images:
        arr[0, 4:, :20] += np.linspace(0, 1e-3, 20, dtype=np.float32)
    batch = torch.from_numpy(np.concatenate(images)).to(DEVICE)
    for max_boxes in (40, 3):
        together = ops.select_boxes(batch, "channels_cxcywh", 0.05, 0.5, max_boxes, 30000)
        alone = [ops.select_boxes(torch.from_numpy(a).to(DEVICE), "channels_cxcywh", 0.05, 0.5, max_boxes, 30000)[0]
                 for a in images]
        assert len(together) == 3 and len(together[1][0]) == 0 and together[1][0].shape == (0, 4)
        assert len(together[0][0]) == min(max_boxes, len(alone[0][0])) > 2 and len(together[2][0]) > 2
        for got, want in zip(together, alone):
            for got_part, want_part in zip(got, want):
                np.testing.assert_array_equal(got_part, want_part)


def test_a_short_batch_for_a_fixed_batch_engine_is_padded_on_the_device(tmp_path) -> None:
    onnx.save(colour_yolov8_batch(160, 4), tmp_path / "colour4.onnx")
    engine = es.build(tmp_path / "colour4.onnx", backend="torch", backend_options=EAGER)
    assert engine.signature.fixed_batch() == 4
    scene = vision.SyntheticScene(width=640, height=480, objects=4, seed=8)
    frames = [scene.render(i)[0] for i in range(6)]
    host = vision.Detector(engine, DetectorSettings(conf=0.5, on_device=False))
    device = vision.Detector(engine, DetectorSettings(conf=0.5, on_device=True))
    for batch in (frames[:1], frames):  # 1 -> padded to 4; 6 -> 4 + 2 padded to 4
        got, expected = device(batch), host(batch)
        assert len(got) == len(batch)
        assert [as_rows(g) for g in got] == [as_rows(e) for e in expected]


def test_asking_for_the_device_with_a_host_only_engine_is_one_clear_error(tmp_path) -> None:
    onnx.save(make_colour_yolov8(64), tmp_path / "colour.onnx")
    engine = es.build(tmp_path / "colour.onnx", backend="onnxruntime")
    with pytest.raises(InputError, match="--backend torch.*on_device=False"):
        vision.Detector(engine, DetectorSettings(on_device=True))
    assert vision.Detector(engine).device_ops is None  # auto: the host path
