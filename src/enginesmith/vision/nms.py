"""Class-aware non-maximum suppression, vectorized with numpy.

Boxes of different classes never suppress each other: each class's boxes are moved
by an offset larger than the whole image (the trick torchvision's ``batched_nms``
uses), so one pass over all boxes does every class at once.
"""

from __future__ import annotations

import numpy as np


def box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one x1,y1,x2,y2 box with each of ``others`` [K, 4]."""
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, max_detections: int = 300) -> np.ndarray:
    """Indices of the boxes kept, best score first: a box is dropped when it overlaps a better one
    of the same class by more than ``iou``."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    boxes = boxes.astype(np.float64, copy=False)
    offset = (boxes.max() - boxes.min() + 1.0) * classes.astype(np.float64)
    shifted = boxes + offset[:, None]
    x1, y1, x2, y2 = (np.ascontiguousarray(shifted[:, i]) for i in range(4))
    areas = (x2 - x1) * (y2 - y1)  # once, not per comparison
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_detections:
        best = order[0]
        keep.append(int(best))
        rest = order[1:]
        if not rest.size:
            break
        inter = (np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
                 * np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None))
        overlap = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-12)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)
