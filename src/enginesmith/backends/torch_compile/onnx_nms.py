"""ONNX NonMaxSuppression in plain torch ops that torch.export traces (no torchvision, no host loop over boxes).

Selects exactly what ONNX Runtime's CPU kernel selects (``non_max_suppression.cc``): candidates strictly
above the score threshold, best score first with ties to the lower box index, suppressed when the IoU with
a kept box of the same batch and class is strictly above the threshold, in float32, at most
``max_output_boxes_per_class`` per class; output int64 [K, 3] (batch, class, box) per batch, per class, in
selection order. The converter that reads the constant thresholds is ``onnx_ops._nms``.
"""

from __future__ import annotations

from typing import Any

from .common import _torch


def _box_corners(boxes: Any, center_point_box: int) -> tuple[Any, Any, Any, Any, Any]:
    """(y_min, x_min, y_max, x_max, area), each [..., N], computed as ONNX Runtime does in float32:
    corner boxes are any diagonal pair of corners; centre boxes use w * h as the area."""
    torch = _torch()
    if center_point_box:
        cx, cy, w, h = boxes.unbind(-1)
        half_w, half_h = w / 2, h / 2
        return cy - half_h, cx - half_w, cy + half_h, cx + half_w, w * h
    a, b, c, d = boxes.unbind(-1)
    y_min, y_max = torch.minimum(a, c), torch.maximum(a, c)
    x_min, x_max = torch.minimum(b, d), torch.maximum(b, d)
    return y_min, x_min, y_max, x_max, (y_max - y_min) * (x_max - x_min)


def _pairwise_suppression(corners: tuple[Any, ...], valid: Any, iou_threshold: float) -> Any:
    """[G, M, M] float: 1 where candidate j (higher in the score order) suppresses candidate k > j.

    The comparisons are ONNX Runtime's (``SuppressByIOU``): no suppression without a positive
    intersection, then IoU = inter / (area_j + area_k - inter) > threshold.
    """
    torch = _torch()
    y_min, x_min, y_max, x_max, area = corners
    top, bottom = torch.maximum(y_min[:, :, None], y_min[:, None, :]), torch.minimum(y_max[:, :, None], y_max[:, None, :])
    left, right = torch.maximum(x_min[:, :, None], x_min[:, None, :]), torch.minimum(x_max[:, :, None], x_max[:, None, :])
    inter = (bottom - top) * (right - left)
    union = area[:, :, None] + area[:, None, :] - inter
    position = torch.arange(valid.shape[1], device=valid.device)
    later = position[:, None] < position[None, :]
    overlaps = (bottom > top) & (right > left) & (inter > 0) & (inter / union > iou_threshold)
    return (later & valid[:, :, None] & overlaps).to(torch.float32)


def _bound_by(kept: Any, ranked: Any) -> None:
    """Inside the while_loop: the bound ``widest <= count`` again, with ``ranked`` (whose width is ``count``) as
    an input of the subgraph. Inductor repeats the program's runtime assertions in each subgraph, and without
    it the subgraph's assertion names a size it was not given (NameError at run time)."""
    _torch()._check(kept.shape[1] <= ranked.shape[1])


def _loop_takes_data_dependent_sizes(torch) -> bool:
    """Whether torch.export traces a ``while_loop`` over tensors of data-dependent size. PyTorch 2.11 does not
    ("Could not extract specialized integer from data-dependent expression", seen on the GPU machine); 2.13
    does. Before, every box is compared (the same selection: candidates under the threshold are masked out), at
    the cost of a [batches x classes, boxes, boxes] matrix rather than one as wide as the candidates."""
    release = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return release >= (2, 13)


def exportable_nms(boxes: Any, scores: Any, max_per_class: int, iou_threshold: float, score_threshold: float | None,
                   center_point_box: int) -> Any:
    """ONNX NonMaxSuppression: int64 [K, 3] (batch, class, box) per batch, per class, by descending score
    (ties: the lower box index first), exactly as ONNX Runtime's CPU kernel selects.

    Every (batch, class) pair is one row of candidates sorted by score. Greedy NMS keeps a candidate
    unless a kept, better one suppresses it; that rule has one fixed point, which iterating it from
    "every candidate kept" reaches in at most (chain length of suppressions) steps: a ``while_loop``
    over one batched matrix product, which torch.export traces (a Python loop over the boxes would be
    unrolled per box). Data-dependent sizes: the candidates above the score threshold (the widest row)
    and the boxes kept (``nonzero``), unbacked sizes for torch.export.
    """
    torch = _torch()
    from torch._higher_order_ops import while_loop

    if max_per_class <= 0:  # ONNX Runtime: 0 (the default) selects nothing; negative counts as 0
        return torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)
    batches, classes, count = scores.shape
    # ONNX Runtime computes in float32 whatever precision the engine runs in.
    boxes, scores = boxes.float(), scores.float()
    if score_threshold is not None:  # NaN never passes the threshold; sorted last, the candidates stay a prefix
        scores = torch.where(scores.isnan(), float("-inf"), scores)
    ranked, order = torch.sort(scores.reshape(batches * classes, count), dim=1, descending=True, stable=True)
    if score_threshold is None:
        valid = torch.ones_like(ranked, dtype=torch.bool)
    else:
        valid = ranked > score_threshold
        if _loop_takes_data_dependent_sizes(torch):
            widest = valid.sum(dim=1).max().item()
            torch._check(widest >= 0)
            torch._check(widest <= count)
            # Sorted rows: the candidates are each row's prefix; only the widest prefix needs comparing.
            order, valid = order[:, :widest].contiguous(), valid[:, :widest].contiguous()
    rows = torch.arange(order.shape[0], device=boxes.device)
    row_batch = (rows // classes)[:, None]
    corners = tuple(part[row_batch, order] for part in _box_corners(boxes, center_point_box))
    suppresses = _pairwise_suppression(corners, valid, iou_threshold)
    candidates = valid.to(torch.float32)

    def unsettled(kept, changed):
        _bound_by(kept, ranked)
        return changed.clone()  # a while_loop predicate may not alias its input

    def step(kept, changed):
        _bound_by(kept, ranked)
        suppressed = torch.bmm(kept.unsqueeze(1), suppresses).squeeze(1) > 0
        settled = (candidates * (~suppressed).to(torch.float32)).clone(memory_format=torch.contiguous_format)
        return settled, (settled != kept).any()

    # Standard strides in and out of the loop (while_loop wants them equal): a slice of one row keeps the
    # source's row stride, which "contiguous" leaves alone when there is a single row.
    start = candidates.clone(memory_format=torch.contiguous_format)
    kept, _ = while_loop(unsettled, step, (start, torch.ones((), dtype=torch.bool, device=boxes.device)))
    selected = (kept > 0) & (torch.cumsum(kept, dim=1) <= max_per_class)
    row, rank = torch.nonzero(selected).unbind(1)  # row-major: batch, class, then score order
    return torch.stack([row // classes, row % classes, order[row, rank]], dim=1)
