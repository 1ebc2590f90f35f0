"""The fast paths of live detection give the numbers the plain ones gave: the batched preprocessing
against the step-by-step reference, heads that filter by score first and the NMS against the
implementations they replaced (kept here verbatim as references)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cv2")

from enginesmith.runtime.preprocess import PreprocessSpec
from enginesmith.vision import SyntheticScene
from enginesmith.vision.detector import DetectorSettings, select_detections
from enginesmith.vision.heads import Candidates, choose_head, yolo_cells
from enginesmith.vision.nms import nms
from enginesmith.vision.transform import Placement, to_batch, to_tensor

SPECS = [
    PreprocessSpec(resize=(320, 320), letterbox=True),
    PreprocessSpec(resize=(320, 256), letterbox=True, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    PreprocessSpec(resize=(224, 300), layout="NHWC", color="BGR", dtype="float16", mean=[0.5], std=[0.25]),
    PreprocessSpec(resize=256, center_crop=(224, 224), dtype="float16"),
    PreprocessSpec(resize=(96, 96), layout="NHWC", color="GRAY"),
    PreprocessSpec(resize=(300, 300), layout="NHWC", scale=1.0, dtype="uint8"),
    PreprocessSpec(resize=(960, 960), letterbox=True),  # enlarging: bilinear, not area
]


def frames() -> list[np.ndarray]:
    scene = SyntheticScene(width=640, height=480, objects=5, seed=11)
    big = scene.render(3)[0]
    return [big, np.ascontiguousarray(big[:400, 50:350]), scene.render(4)[0]]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.resize}-{s.layout}-{s.color}-{s.dtype}")
def test_the_batched_preprocessing_gives_exactly_the_reference_tensors(spec) -> None:
    target = spec.center_crop or spec.resize
    pictures = frames()
    reference = [to_tensor(p, spec, target) for p in pictures]
    batch, placements = to_batch(pictures, spec, target)
    assert batch.dtype == np.dtype(spec.dtype)
    np.testing.assert_array_equal(batch, np.stack([t for t, _ in reference]))
    assert placements == [p for _, p in reference]


def test_a_batch_buffer_is_filled_in_place_and_reused() -> None:
    spec = SPECS[0]
    buffer = np.full((4, 3, 320, 320), np.nan, np.float32)
    pictures = frames()
    batch, _ = to_batch(pictures[:2], spec, (320, 320), out=buffer)
    assert batch.shape == (2, 3, 320, 320) and np.shares_memory(batch, buffer)
    np.testing.assert_array_equal(buffer[:2], np.stack([to_tensor(p, spec, (320, 320))[0] for p in pictures[:2]]))
    assert np.isnan(buffer[2:]).all()
    again, _ = to_batch(pictures[2:], spec, (320, 320), out=buffer)
    np.testing.assert_array_equal(again[0], to_tensor(pictures[2], spec, (320, 320))[0])
    # A buffer of the wrong shape is not written to: a new batch is made instead.
    small = np.zeros((1, 3, 160, 160), np.float32)
    fresh, _ = to_batch(pictures[:1], spec, (320, 320), out=small)
    assert fresh.shape == (1, 3, 320, 320) and not small.any()


def reference_nms(boxes, scores, classes, iou, max_detections=300):
    """The NMS before the fast path (per comparison IoU from the boxes), verbatim."""
    def box_iou(box, others):
        x1 = np.maximum(box[0], others[:, 0])
        y1 = np.maximum(box[1], others[:, 1])
        x2 = np.minimum(box[2], others[:, 2])
        y2 = np.minimum(box[3], others[:, 3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        area = (box[2] - box[0]) * (box[3] - box[1])
        areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
        return inter / np.maximum(area + areas - inter, 1e-12)

    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    boxes = boxes.astype(np.float64, copy=False)
    offset = (boxes.max() - boxes.min() + 1.0) * classes.astype(np.float64)
    shifted = boxes + offset[:, None]
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size and len(keep) < max_detections:
        best = order[0]
        keep.append(int(best))
        rest = order[1:]
        order = rest[box_iou(shifted[best], shifted[rest]) <= iou]
    return np.asarray(keep, dtype=np.int64)


def reference_yolov8(raw: np.ndarray) -> Candidates:
    """The YOLOv8 decode before the score-first fast path: every anchor decoded, verbatim."""
    rows = raw.T
    classes = rows[:, 4:].argmax(axis=1)
    best = rows[:, 4:][np.arange(len(rows)), classes]
    xywh = rows[:, :4].astype(np.float64)
    half = xywh[:, 2:4] / 2
    return Candidates(np.concatenate([xywh[:, :2] - half, xywh[:, :2] + half], axis=1), best, classes, suppressed=False)


def crowded_yolov8(seed: int, size: int = 320, classes: int = 5) -> np.ndarray:
    """[1, 4+C, A]: clusters of overlapping boxes, scores spread over [0, 1], ties included."""
    rng = np.random.default_rng(seed)
    cells = yolo_cells((size, size))
    centres = rng.uniform(0, size, (8, 2))[rng.integers(0, 8, cells)] + rng.normal(0, 6, (cells, 2))
    sizes = rng.uniform(20, 90, (cells, 2))
    scores = rng.uniform(0, 1, (classes, cells)) ** 3
    scores[:, :20] = 0.5  # exact ties across classes and anchors
    return np.concatenate([centres.T, sizes.T, scores]).astype(np.float32)[None]


@pytest.mark.parametrize("conf", [0.01, 0.25, 0.6])
def test_score_first_yolov8_decode_and_nms_keep_the_boxes_the_old_code_kept(conf) -> None:
    settings = DetectorSettings(conf=conf, iou=0.5)
    place = Placement(0.5, 0.5, 0.0, 40.0, 480, 640)
    for seed in range(3):
        raw = crowded_yolov8(seed)
        head = choose_head({"output0": raw.shape}, (320, 320))
        fast = select_detections(head.decode({"output0": raw}, 0, (320, 320), conf), settings, place, None)
        old = reference_yolov8(raw[0])
        keep = np.flatnonzero(old.scores >= conf)
        order = reference_nms(old.boxes[keep], old.scores[keep], old.classes[keep], 0.5)
        expected = place.to_frame(old.boxes[keep][order])
        assert len(fast) == len(order) > 0
        np.testing.assert_allclose([d.box for d in fast], expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose([d.score for d in fast], old.scores[keep][order], rtol=0, atol=1e-7)
        assert [d.class_id for d in fast] == old.classes[keep][order].tolist()


def test_nms_keeps_what_the_old_nms_kept_on_random_crowds() -> None:
    rng = np.random.default_rng(5)
    for n in [*rng.integers(1, 400, 20), 2000]:  # the NMS walks in blocks of 64: one block, several, many
        n = int(n)
        corner = rng.uniform(0, 600, (n, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(1, 120, (n, 2))], axis=1).astype(np.float32)
        scores = rng.uniform(0, 1, n).round(2)  # ties
        classes = rng.integers(0, 4, n)
        for iou, most in ((0.3, 50), (0.7, 50), (0.5, 300)):
            np.testing.assert_array_equal(nms(boxes, scores, classes, iou, most), reference_nms(boxes, scores, classes, iou, most))


@pytest.mark.parametrize("head", ["yolov5", "yolox", "boxes-scores", "ssd-raw"])
def test_every_head_decodes_the_same_candidates_above_the_floor_as_without_it(head) -> None:
    rng = np.random.default_rng(2)
    hw = (64, 64)
    cells = yolo_cells(hw)
    if head in ("yolov5", "yolox"):
        rows = 3 * cells if head == "yolov5" else cells
        outputs = {"output": rng.uniform(0, 1, (1, rows, 5 + 3)).astype(np.float32)}
        outputs["output"][..., :4] *= 30
    elif head == "boxes-scores":
        outputs = {"boxes": rng.uniform(0, 1, (1, 50, 4)).astype(np.float32),
                   "scores": rng.uniform(0, 1, (1, 3, 50)).astype(np.float32)}
    else:
        outputs = {"raw_detection_boxes": rng.uniform(0, 1, (1, 50, 4)).astype(np.float32),
                   "raw_detection_scores": rng.uniform(0, 1, (1, 50, 5)).astype(np.float32)}
    chosen = choose_head({k: v.shape for k, v in outputs.items()}, hw, head)
    everything = chosen.decode(outputs, 0, hw)
    floor = chosen.decode(outputs, 0, hw, 0.6)
    above = everything.scores >= 0.6
    assert 0 < above.sum() < len(above)
    np.testing.assert_array_equal(floor.boxes, everything.boxes[above])
    np.testing.assert_array_equal(floor.scores, everything.scores[above])
    np.testing.assert_array_equal(floor.classes, everything.classes[above])
