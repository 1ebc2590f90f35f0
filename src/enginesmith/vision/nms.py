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


# Boxes taken from the top of the score order at a time: their overlaps with each other and with every box
# left are one vectorized step, and only the greedy walk through the block is a Python loop.
BLOCK = 64


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, max_detections: int = 300) -> np.ndarray:
    """Indices of the boxes kept, best score first: a box is dropped when it overlaps a better one
    of the same class by more than ``iou``. Exactly the one-box-at-a-time greedy walk, in blocks."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    boxes = boxes.astype(np.float64, copy=False)
    offset = (boxes.max() - boxes.min() + 1.0) * classes.astype(np.float64)
    shifted = boxes + offset[:, None]
    x1, y1, x2, y2 = (np.ascontiguousarray(shifted[:, i]) for i in range(4))
    areas = (x2 - x1) * (y2 - y1)  # once, not per comparison

    def overlaps(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """IoU of every box in ``rows`` with every box in ``columns`` [len(rows), len(columns)]."""
        r, c = rows[:, None], columns[None, :]
        inter = (np.clip(np.minimum(x2[r], x2[c]) - np.maximum(x1[r], x1[c]), 0, None)
                 * np.clip(np.minimum(y2[r], y2[c]) - np.maximum(y1[r], y1[c]), 0, None))
        return inter / np.maximum(areas[r] + areas[c] - inter, 1e-12)

    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_detections:
        block, rest = order[:BLOCK], order[BLOCK:]
        within = overlaps(block, block) > iou
        alive = np.ones(len(block), dtype=bool)
        kept = []
        for i in range(len(block)):
            if not alive[i]:
                continue
            kept.append(i)
            if len(keep) + len(kept) == max_detections:
                break
            alive &= ~within[i]
        keep.extend(int(b) for b in block[kept])
        if rest.size and len(keep) < max_detections:
            rest = rest[~(overlaps(block[kept], rest) > iou).any(axis=0)]
        order = rest
    return np.asarray(keep, dtype=np.int64)
