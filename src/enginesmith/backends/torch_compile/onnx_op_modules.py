"""The nn.Module classes the converters of ``onnx_ops`` put in converted graphs: one per ONNX op or
variant (constant axes, allowzero reshapes, run-time Clip bounds, ...), each written in plain torch ops
that torch.export traces. Made once torch is imported (``op_modules()``), so that importing the backend
does not import torch."""

from __future__ import annotations

import functools
import math
from typing import Any

from .common import _torch
from .onnx_nms import exportable_nms


def _reduce(op: str, x: Any, dims: list[int], keepdim: bool) -> Any:
    torch = _torch()
    if op == "ReduceMean":
        return x.mean(dim=dims, keepdim=keepdim)
    if op == "ReduceMax":
        return x.amax(dim=dims, keepdim=keepdim)
    if op == "ReduceMin":
        return x.amin(dim=dims, keepdim=keepdim)
    if op == "ReduceProd":
        out = x
        for dim in sorted(dims, reverse=True):
            out = out.prod(dim=dim, keepdim=keepdim)
        return out
    if op == "ReduceL1":
        return x.abs().sum(dim=dims, keepdim=keepdim)
    if op == "ReduceL2":
        return torch.sqrt((x * x).sum(dim=dims, keepdim=keepdim))
    if op == "ReduceLogSum":
        return torch.log(x.sum(dim=dims, keepdim=keepdim))
    if op == "ReduceLogSumExp":
        return torch.logsumexp(x, dim=dims, keepdim=keepdim)
    if op == "ReduceSumSquare":
        return (x * x).sum(dim=dims, keepdim=keepdim)
    raise ValueError(op)


@functools.lru_cache(maxsize=None)
def op_modules() -> dict[str, Any]:
    """The nn.Module classes, made once torch is imported (this module must import without torch)."""
    torch = _torch()

    class OnnxReduceConstAxes(torch.nn.Module):
        """A Reduce* whose axes (an input since opset 18) are known when converting."""

        def __init__(self, op: str, axes: list[int] | None, keepdims: bool, noop_with_empty_axes: bool):
            super().__init__()
            self.op, self.axes, self.keepdims, self.noop = op, axes, keepdims, noop_with_empty_axes

        def forward(self, x):
            if not self.axes:
                if self.noop:
                    return x
                dims = list(range(x.dim()))
            else:
                dims = sorted(a % x.dim() for a in self.axes)
            return _reduce(self.op, x, dims, self.keepdims)

    class OnnxReshapeAllowZero(torch.nn.Module):
        """Reshape with allowzero=1: the shape is taken literally (0 is an empty axis, never "copy")."""

        def forward(self, x, shape):
            return torch.reshape(x, [int(d) for d in shape.tolist()])

    class OnnxGelu(torch.nn.Module):
        def __init__(self, approximate: str):
            super().__init__()
            self.approximate = approximate

        def forward(self, x):
            return torch.nn.functional.gelu(x, approximate=self.approximate)

    class OnnxCastLike(torch.nn.Module):
        def forward(self, x, like):
            return x.to(like.dtype)

    class OnnxEyeLikeOnDevice(torch.nn.Module):
        """EyeLike made on its input's device (onnx2torch's makes it on the CPU: an engine on CUDA then mixes
        devices, "Tensor on device cpu is not on the expected device cuda:0", the SSD's batched NMS on the H200)."""

        def __init__(self, dtype: Any, k: int):
            super().__init__()
            self.dtype, self.k = dtype, k

        def forward(self, x):
            rows = torch.arange(x.shape[0], device=x.device)[:, None]
            cols = torch.arange(x.shape[1], device=x.device)[None, :]
            return (cols - rows == self.k).to(x.dtype if self.dtype is None else self.dtype)

    class OnnxSplitNumOutputs(torch.nn.Module):
        """Split into ``parts`` chunks of ceil(size / parts), the last one smaller (opset 18 semantics)."""

        def __init__(self, axis: int, parts: int):
            super().__init__()
            self.axis, self.parts = axis, parts

        def forward(self, x):
            size = x.shape[self.axis]
            return tuple(torch.split(x, math.ceil(size / self.parts), dim=self.axis))

    class OnnxResizeConst(torch.nn.Module):
        """Resize whose scales or sizes are constants: F.interpolate with Python values (torch.export cannot
        read a tensor's values, which onnx2torch's Resize does on every call)."""

        def __init__(self, mode: str, align_corners: bool | None, scales: list[float] | None, sizes: list[int] | None):
            super().__init__()
            self.mode, self.align_corners, self.scales, self.sizes = mode, align_corners, scales, sizes

        def forward(self, x):
            return torch.nn.functional.interpolate(x, size=self.sizes, scale_factor=self.scales, mode=self.mode,
                                                   align_corners=self.align_corners)

    class OnnxGatherNDIndex(torch.nn.Module):
        """GatherND as advanced indexing: no flattening through the indices' element count, which makes
        torch.export fix the batch (onnx2torch's version does; it has no batch_dims at all)."""

        def __init__(self, batch_dims: int = 0):
            super().__init__()
            self.batch_dims = batch_dims

        def forward(self, data, indices):
            leading = []
            for axis in range(self.batch_dims):  # each batch axis indexes itself, broadcast over the indices
                shape = [1] * (indices.dim() - 1)
                shape[axis] = -1
                leading.append(torch.arange(data.shape[axis], device=data.device).reshape(shape))
            return data[tuple(leading) + tuple(indices.unbind(-1))]

    class OnnxNonMaxSuppressionConst(torch.nn.Module):
        """NonMaxSuppression whose max_output_boxes_per_class and thresholds were constants in the model."""

        def __init__(self, max_per_class: int, iou_threshold: float, score_threshold: float | None, center_point_box: int):
            super().__init__()
            self.max_per_class, self.iou_threshold = max_per_class, iou_threshold
            self.score_threshold, self.center_point_box = score_threshold, center_point_box

        def forward(self, boxes, scores):
            return exportable_nms(boxes, scores, self.max_per_class, self.iou_threshold, self.score_threshold,
                                  self.center_point_box)

    class OnnxCumSumConstAxis(torch.nn.Module):
        """CumSum whose axis is a constant (onnx2torch's reads it with ``.item()`` on every call)."""

        def __init__(self, axis: int, exclusive: bool, reverse: bool):
            super().__init__()
            self.axis, self.exclusive, self.reverse = axis, exclusive, reverse

        def forward(self, x):
            if self.reverse:
                x = x.flip(self.axis)
            out = x.cumsum(self.axis)
            if self.exclusive:  # shifted by one: exactly the sums of the elements before, no subtraction
                out = torch.cat([torch.zeros_like(x.narrow(self.axis, 0, 1)),
                                 out.narrow(self.axis, 0, x.shape[self.axis] - 1)], dim=self.axis)
            return out.flip(self.axis) if self.reverse else out

    class OnnxTopKConst(torch.nn.Module):
        """TopK with a constant k, as a stable sort: equal values keep the lower index first (ONNX's rule;
        torch.topk leaves ties unordered)."""

        def __init__(self, k: int, axis: int, largest: bool):
            super().__init__()
            self.k, self.axis, self.largest = k, axis, largest

        def forward(self, x):
            values, indices = torch.sort(x, dim=self.axis, descending=self.largest, stable=True)
            return values.narrow(self.axis, 0, self.k), indices.narrow(self.axis, 0, self.k)

    class OnnxScatterNDIndex(torch.nn.Module):
        """ScatterND (no reduction) as ``index_put``: onnx2torch's reads the indices to a Python list."""

        def forward(self, data, indices, updates):
            return data.index_put(tuple(indices.unbind(-1)), updates)

    class OnnxPadEdges(torch.nn.Module):
        """Reflect / edge padding of the last axes. torch pads those modes only with one or two axes before the
        padded ones (batch, channels); a [1, 576] signal padded on its last axis gets leading size-1 axes for
        the pad, removed after."""

        def __init__(self, pads: list[int], mode: str):
            super().__init__()
            self.pads, self.mode = pads, mode

        def forward(self, x):
            extra = max(0, len(self.pads) // 2 + 2 - x.dim())
            out = torch.nn.functional.pad(x.reshape((1,) * extra + tuple(x.shape)) if extra else x, self.pads,
                                          mode=self.mode)
            return out.reshape(tuple(out.shape[extra:])) if extra else out

    class OnnxGlobalMaxPool(torch.nn.Module):
        """GlobalMaxPool: the maximum over every axis after the channels, kept as size-1 axes."""

        def forward(self, x):
            return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)

    class OnnxClipConst(torch.nn.Module):
        """Clip with constant bounds, either of which may be absent (None)."""

        def __init__(self, low: float | None, high: float | None):
            super().__init__()
            self.low, self.high = low, high

        def forward(self, x):
            return torch.clamp(x, self.low, self.high)

    class OnnxClipTensors(torch.nn.Module):
        """Clip with bounds given as tensors at run time; an absent bound is None."""

        def __init__(self, has_min: bool, has_max: bool):
            super().__init__()
            self.has_min, self.has_max = has_min, has_max

        def forward(self, x, *bounds):
            bounds = list(bounds)
            low = bounds.pop(0) if self.has_min else None
            high = bounds.pop(0) if self.has_max else None
            return torch.clamp(x, low, high)

    return {
        "global_max_pool": OnnxGlobalMaxPool, "pad_edges": OnnxPadEdges,
        "clip": OnnxClipTensors, "clip_const": OnnxClipConst,
        "scatter_nd": OnnxScatterNDIndex,
        "cumsum": OnnxCumSumConstAxis,
        "topk": OnnxTopKConst,
        "nms": OnnxNonMaxSuppressionConst,
        "gather_nd": OnnxGatherNDIndex,
        "resize": OnnxResizeConst,
        "reduce": OnnxReduceConstAxes, "reshape": OnnxReshapeAllowZero, "gelu": OnnxGelu,
        "cast_like": OnnxCastLike, "split": OnnxSplitNumOutputs, "eye_like": OnnxEyeLikeOnDevice,
    }
