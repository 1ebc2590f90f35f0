"""Detector heads: the layouts of detection outputs, told apart by their shapes, decoded into boxes.

Every head turns one image's slice of the engine's outputs into candidates in *input*
pixels (x1, y1, x2, y2), scores and class ids; the caller filters by score, runs NMS
where the model did not, and maps boxes back to the frame.

| head | outputs | boxes | NMS in the model |
|---|---|---|---|
| ``ssd`` | TensorFlow Object Detection API: detection_boxes [N,K,4], detection_scores [N,K], detection_classes [N,K], num_detections [N] | normalized ymin,xmin,ymax,xmax; classes are label-map ids (1-based) | yes |
| ``ssd-raw`` | boxes [N,A,4] (normalized ymin,xmin,ymax,xmax) + scores [N,A,1+C] (column 0 background) | as above | no |
| ``yolov8`` | one [N, 4+C, A] (YOLOv8 / v11, ultralytics export) | cx,cy,w,h in input pixels; class scores | no |
| ``yolov5`` | one [N, A, 5+C], A = 3 anchors per cell | cx,cy,w,h in input pixels; objectness x class | no |
| ``yolox`` | one [N, A, 5+C], A = one per cell of strides 8,16,32, not decoded | grid offsets and log sizes; objectness x class | no |
| ``boxes-scores`` | boxes [N,A,4] x1,y1,x2,y2 (pixels, or normalized when all are within [0, 1]) + scores [N,A,C] or [N,C,A] | | no |
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import numpy as np

from ..errors import EnginesmithError

HEADS = ("ssd", "ssd-raw", "yolov8", "yolov5", "yolox", "boxes-scores")
YOLO_STRIDES = (8, 16, 32)
SSD_NAMES = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


class HeadMismatchError(EnginesmithError):
    """The engine's outputs do not have a detector layout enginesmith knows (or not the one named)."""


@dataclass(frozen=True)
class Candidates:
    """One image's decoded outputs, before the score filter and NMS; boxes in input pixels."""

    boxes: np.ndarray  # [K, 4] float x1,y1,x2,y2
    scores: np.ndarray  # [K]
    classes: np.ndarray  # [K] int
    suppressed: bool  # the model already ran NMS


@dataclass(frozen=True)
class Head:
    """A head bound to the engine's output names; ``classes`` is how many the model scores (None: not known)."""

    name: str
    outputs: tuple[str, ...]
    classes: int | None
    first_class: int = 0  # TensorFlow label maps count from 1

    def decode(self, outputs: Mapping[str, np.ndarray], image: int, input_hw: tuple[int, int],
               min_score: float = 0.0) -> Candidates:
        """Candidates scoring at least ``min_score``: the score is found first, so boxes and classes are
        decoded only for the few that pass (a 640 YOLO has 8400 anchors and keeps a handful)."""
        slices = [np.asarray(outputs[name][image]) for name in self.outputs]
        return _DECODERS[self.name](slices, input_hw, min_score)


def describe_outputs(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} [{', '.join(str(d) for d in shape)}]" for name, shape in shapes.items())


def choose_head(shapes: Mapping[str, tuple[int, ...]], input_hw: tuple[int, int], name: str | None = None,
                values: Mapping[str, np.ndarray] | None = None) -> Head:
    """The head whose layout the outputs (their names and actual shapes) have, or the one named."""
    if name is not None and name not in HEADS:
        raise HeadMismatchError(f"unknown detector head '{name}'; the heads are {', '.join(HEADS)}")
    for kind in (name,) if name else HEADS:
        head = _match(kind, shapes, input_hw, values, named=name is not None)
        if head is not None:
            return head
    seen = describe_outputs(shapes)
    if name:
        raise HeadMismatchError(f"the engine's outputs ({seen}) do not have the '{name}' layout; "
                                f"name the head that fits: {', '.join(HEADS)}")
    raise HeadMismatchError(f"the engine's outputs ({seen}) match no detector head enginesmith knows; "
                            f"name the layout if it is one of {', '.join(HEADS)}")


def yolo_cells(input_hw: tuple[int, int]) -> int:
    """Grid cells over strides 8, 16, 32 (ultralytics rounds up: 640 -> 80 + 40 + 20 per side)."""
    return sum(-(-input_hw[0] // s) * -(-input_hw[1] // s) for s in YOLO_STRIDES)


def _match(kind: str, shapes: Mapping[str, tuple[int, ...]], input_hw: tuple[int, int],
           values: Mapping[str, np.ndarray] | None, named: bool) -> Head | None:
    items = list(shapes.items())
    if kind == "ssd":
        return _match_ssd(shapes, values)
    if kind in ("yolov8", "yolov5", "yolox"):
        rank3 = [(n, s) for n, s in items if len(s) == 3]
        if len(rank3) != 1:
            return None
        output, (_, rows, cols) = rank3[0]
        cells = yolo_cells(input_hw)
        if kind == "yolov8" and rows > 4 and cols > rows:
            return Head(kind, (output,), rows - 4)
        # Both are [N, A, 5+C]; YOLOX has one row per grid cell, YOLOv5 three anchors per cell.
        if kind in ("yolov5", "yolox") and cols > 5 and rows > cols and (rows == cells) == (kind == "yolox"):
            return Head(kind, (output,), cols - 5)
        return None
    boxes = [n for n, s in items if len(s) == 3 and s[2] == 4]
    scores = [n for n, s in items if len(s) == 3 and n not in boxes]
    if len(boxes) != 1 or len(scores) != 1:
        return None
    anchors = shapes[boxes[0]][1]
    score_shape = shapes[scores[0]]
    # Unnamed, a boxes + scores pair is the generic head unless TensorFlow's raw_detection_* names say SSD.
    tf_raw = "raw_detection" in boxes[0]
    if kind == "ssd-raw" and (named or tf_raw) and score_shape[1] == anchors and score_shape[2] >= 2:
        return Head(kind, (boxes[0], scores[0]), score_shape[2] - 1, first_class=1)
    if kind == "boxes-scores" and anchors in score_shape[1:]:
        classes = score_shape[2] if score_shape[1] == anchors else score_shape[1]
        return Head(kind, (boxes[0], scores[0]), classes)
    return None


def _match_ssd(shapes: Mapping[str, tuple[int, ...]], values: Mapping[str, np.ndarray] | None) -> Head | None:
    """Named outputs first (TensorFlow's names, maybe with a ':0' suffix); else by shapes, classes being the
    [N,K] output whose values are whole numbers."""
    by_name = {}
    for name in shapes:
        base = name.split(":")[0].split("/")[-1]
        for wanted in SSD_NAMES:
            if base == wanted:
                by_name[wanted] = name
    if len(by_name) == 4:
        return Head("ssd", tuple(by_name[n] for n in SSD_NAMES), None, first_class=1)
    if len(shapes) != 4:
        return None
    boxes = [n for n, s in shapes.items() if len(s) == 3 and s[2] == 4]
    pairs = [n for n, s in shapes.items() if len(s) == 2]
    counts = [n for n, s in shapes.items() if len(s) == 1]
    if len(boxes) != 1 or len(pairs) != 2 or len(counts) != 1 or values is None:
        return None
    whole = [n for n in pairs if np.array_equal(values[n], np.round(values[n]))]
    if len(whole) != 1:
        return None
    scores = next(n for n in pairs if n not in whole)
    return Head("ssd", (boxes[0], scores, whole[0], counts[0]), None, first_class=1)


def _yxyx_normalized(boxes: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    h, w = input_hw
    return np.stack([boxes[:, 1] * w, boxes[:, 0] * h, boxes[:, 3] * w, boxes[:, 2] * h], axis=1)


def _cxcywh(boxes: np.ndarray) -> np.ndarray:
    half = boxes[:, 2:4] / 2
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)


def _best_class(scores: np.ndarray, min_score: float, class_axis: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows kept, their best score, its class) for a score matrix whose classes lie along ``class_axis``;
    the best score is a max over classes for every row, the argmax only for the rows kept."""
    best = scores.max(axis=class_axis) if scores.shape[class_axis] else np.zeros(scores.shape[1 - class_axis])
    keep = np.flatnonzero(best >= min_score)
    kept = scores[keep] if class_axis == 1 else scores[:, keep]
    return keep, best[keep], kept.argmax(axis=class_axis) if keep.size else np.zeros(0, np.int64)


def _decode_ssd(slices: list[np.ndarray], input_hw: tuple[int, int], min_score: float) -> Candidates:
    boxes, scores, classes, count = slices
    n = int(np.asarray(count).reshape(-1)[0]) if np.asarray(count).size else len(scores)
    n = max(0, min(n, len(scores)))
    return Candidates(_yxyx_normalized(boxes[:n].astype(np.float64), input_hw), scores[:n].astype(np.float64),
                      np.round(classes[:n]).astype(np.int64), suppressed=True)


def _decode_ssd_raw(slices: list[np.ndarray], input_hw: tuple[int, int], min_score: float) -> Candidates:
    boxes, scores = slices
    keep, best, classes = _best_class(scores[:, 1:], min_score)
    return Candidates(_yxyx_normalized(boxes[keep].astype(np.float64), input_hw), best, classes + 1, suppressed=False)


def _decode_yolov8(slices: list[np.ndarray], input_hw: tuple[int, int], min_score: float) -> Candidates:
    channels = slices[0]  # [4+C, A]: reduced over its class rows as laid out, never transposed whole
    keep, best, classes = _best_class(channels[4:], min_score, class_axis=0)
    return Candidates(_cxcywh(channels[:4, keep].T.astype(np.float64)), best, classes, suppressed=False)


def _decode_yolov5(slices: list[np.ndarray], input_hw: tuple[int, int], min_score: float) -> Candidates:
    rows = slices[0]
    keep, best, classes = _best_class(rows[:, 5:] * rows[:, 4:5], min_score)
    return Candidates(_cxcywh(rows[keep, :4].astype(np.float64)), best, classes, suppressed=False)


@lru_cache(maxsize=8)
def yolox_grid(input_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Cell corners [A, 2] (x, y) and strides [A, 1], in YOLOX's order: stride by stride, row by row
    (made once per input size and shared, so read-only)."""
    grids, strides = [], []
    for stride in YOLO_STRIDES:
        rows, cols = -(-input_hw[0] // stride), -(-input_hw[1] // stride)
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        grids.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        strides.append(np.full((rows * cols, 1), stride))
    grid, stride = np.concatenate(grids).astype(np.float64), np.concatenate(strides).astype(np.float64)
    grid.flags.writeable = stride.flags.writeable = False
    return grid, stride


def _decode_yolox(slices: list[np.ndarray], input_hw: tuple[int, int], min_score: float) -> Candidates:
    keep, best, classes = _best_class(slices[0][:, 5:] * slices[0][:, 4:5], min_score)
    rows = slices[0][keep].astype(np.float64)
    grid, stride = yolox_grid(input_hw)
    grid, stride = grid[keep], stride[keep]
    centres = (rows[:, :2] + grid) * stride
    sizes = np.exp(np.minimum(rows[:, 2:4], 20.0)) * stride
    return Candidates(_cxcywh(np.concatenate([centres, sizes], axis=1)), best, classes, suppressed=False)


def _decode_boxes_scores(slices: list[np.ndarray], input_hw: tuple[int, int], min_score: float) -> Candidates:
    boxes, scores = slices[0].astype(np.float64), slices[1]
    if scores.shape[0] != boxes.shape[0]:
        scores = scores.T
    # Normalized or pixels is judged on every box, not only those kept, so the filter cannot change it.
    if boxes.size and boxes.min() >= 0 and boxes.max() <= 1.0:
        boxes = boxes * np.array([input_hw[1], input_hw[0], input_hw[1], input_hw[0]], dtype=np.float64)
    keep, best, classes = _best_class(scores, min_score)
    return Candidates(boxes[keep], best, classes, suppressed=False)


_DECODERS = {
    "ssd": _decode_ssd,
    "ssd-raw": _decode_ssd_raw,
    "yolov8": _decode_yolov8,
    "yolov5": _decode_yolov5,
    "yolox": _decode_yolox,
    "boxes-scores": _decode_boxes_scores,
}
