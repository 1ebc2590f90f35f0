"""Pre- and post-processing with torch on the engine's device, so frames go up as uint8 and only the
boxes kept come back (see :class:`~enginesmith.backends.base.DeviceOps`).

NMS is torchvision's ``batched_nms`` where torchvision is installed; without it, the same greedy
class-aware NMS from an IoU matrix computed on the device.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from ..base import DeviceOps, ImageGeometry
from .common import _torch, _torch_dtype

LAYOUTS = ("channels_cxcywh",)


class TorchDeviceOps(DeviceOps):
    def __init__(self, device: Any):
        self._torch = _torch()
        self._device = self._torch.device(device)
        self.device = str(self._device)
        try:
            from torchvision.ops import batched_nms
        except ImportError:
            batched_nms = None
        self._batched_nms = batched_nms
        self._local = threading.local()  # per thread: pinned staging buffers, the upload stream

    def _staging(self, shape: tuple) -> list:
        """The next of this thread's pinned host buffers for a batch of frames of one shape, and the event its
        last upload recorded. Two per shape go round: one is filled while the other's copy may still run."""
        rings = self._local.__dict__.setdefault("pinned", {})
        ring = rings.get(shape)
        if ring is None:
            if len(rings) > 8:
                rings.clear()
            torch = self._torch
            ring = rings[shape] = [[torch.empty(shape, dtype=torch.uint8, pin_memory=True), None] for _ in range(2)]
        ring.append(ring.pop(0))
        return ring[-1]

    def _upload_stream(self) -> Any:
        """This thread's stream for host-to-device copies: a copy on the compute stream would wait behind the
        inference queued there (another thread's), and a synchronous copy would hold this thread as long."""
        stream = self._local.__dict__.get("stream")
        if stream is None:
            stream = self._local.stream = self._torch.cuda.Stream(self._device)
        return stream

    def _upload(self, frames: Sequence[np.ndarray]) -> list[tuple[list[int], Any]]:
        """(rows, [n, C, H, W] float32 on the device) per frame shape: frames of one shape go up in one copy."""
        torch = self._torch
        groups: dict[tuple, list[int]] = {}
        for row, frame in enumerate(frames):
            groups.setdefault(frame.shape, []).append(row)
        uploaded = []
        for shape, rows in groups.items():
            if self._device.type == "cuda":
                slot = self._staging((len(rows), *shape))
                staging, copied = slot
                if copied is not None:
                    copied.synchronize()  # the copy that last read this buffer is done before it is refilled
                host = staging.numpy()
                for index, row in enumerate(rows):
                    np.copyto(host[index], frames[row], casting="no")
                stream, compute = self._upload_stream(), torch.cuda.current_stream(self._device)
                with torch.cuda.stream(stream):
                    on_device = staging.to(self._device, non_blocking=True)
                slot[1] = stream.record_event()
                compute.wait_stream(stream)  # the device waits for the copy; this thread does not
                on_device.record_stream(compute)  # made on the copy stream, used on the compute stream
            else:
                on_device = torch.from_numpy(np.stack([frames[row] for row in rows]))
            uploaded.append((rows, on_device.reshape(len(rows), shape[0], shape[1], -1).permute(0, 3, 1, 2).float()))
        return uploaded

    def images_to_batch(self, frames: Sequence[np.ndarray], places: Sequence[ImageGeometry], size: tuple[int, int],
                        *, pad_value: float, swap_rb: bool, scale: float, mean: Sequence[float], std: Sequence[float],
                        layout: str, dtype: str):
        torch = self._torch
        functional = torch.nn.functional
        channels = frames[0].shape[2] if frames[0].ndim == 3 else 1
        batch = torch.full((len(frames), channels, *size), float(pad_value), dtype=torch.float32, device=self._device)
        for rows, images in self._upload(frames):
            height, width = images.shape[2:]
            # Pictures of one size placed alike (a camera's frames) are resized together, in one call.
            runs = [rows] if len({places[row] for row in rows}) == 1 else [[row] for row in rows]
            for run in runs:
                place = places[run[0]]
                image = images if len(run) == len(rows) else images[rows.index(run[0])][None]
                if (place.height, place.width) != (height, width):
                    shrinking = place.height < height and place.width < width
                    image = functional.interpolate(image, size=(place.height, place.width), mode="bilinear",
                                                   align_corners=False, antialias=shrinking)
                ys, xs = slice(place.top, place.top + place.height), slice(place.left, place.left + place.width)
                if run == list(range(run[0], run[0] + len(run))):
                    batch[run[0] : run[0] + len(run), :, ys, xs] = image
                else:
                    batch[torch.as_tensor(run, device=self._device), :, ys, xs] = image
        if swap_rb:
            batch = batch.flip(1)
        batch.mul_(float(scale))
        # Judged on the host: asking the device whether to normalize would wait for it.
        mean_np = np.broadcast_to(np.asarray(mean, np.float32), channels)
        std_np = np.broadcast_to(np.asarray(std, np.float32), channels)
        if mean_np.any() or (std_np != 1).any():
            mean_t = torch.from_numpy(mean_np.copy()).to(self._device)[:, None, None]
            std_t = torch.from_numpy(std_np.copy()).to(self._device)[:, None, None]
            batch = (batch - mean_t) / std_t
        if layout.upper() == "NHWC":
            batch = batch.permute(0, 2, 3, 1)
        target = _torch_dtype(dtype)
        if not target.is_floating_point:  # uint8 pictures (TensorFlow detectors): rounded like the host's resize
            info = torch.iinfo(target)
            batch = batch.round().clamp_(info.min, info.max)
        return batch.to(target).contiguous()

    def select_boxes(self, output: Any, layout: str, min_score: float, iou: float, max_boxes: int,
                     top_k: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown box layout '{layout}'; the layouts are {', '.join(LAYOUTS)}")
        torch = self._torch
        images, anchors = output.shape[0], output.shape[2]
        scores, classes = output[:, 4:].max(dim=1)  # [N, A]
        if anchors > top_k:  # only the top_k best of each image go on (a static check: no wait for the device)
            floor = scores.topk(top_k, dim=1).values[:, -1:]
            scores = torch.where(scores >= floor, scores, torch.full_like(scores, -1.0))
        # The whole batch at once: one NMS over every image (an image's boxes never suppress another's), one copy
        # to the host, then the rows split by image.
        image, anchor = torch.nonzero(scores >= min_score).unbind(1)
        centres = output[image, :4, anchor].double()
        half = centres[:, 2:4] / 2
        boxes = torch.cat([centres[:, :2] - half, centres[:, :2] + half], dim=1)
        kept_scores, kept_classes = scores[image, anchor].float(), classes[image, anchor]
        groups = image * (output.shape[1] - 4) + kept_classes
        order = self._nms(boxes, kept_scores, groups, iou)  # best first
        order = order[torch.sort(image[order], stable=True).indices]  # by image, best first within each
        rows = image[order]
        rank = torch.arange(len(order), device=order.device) - torch.searchsorted(rows, rows)  # place within its image
        order, rows = order[rank < max_boxes], rows[rank < max_boxes]
        host_boxes, host_scores = boxes[order].cpu().numpy(), kept_scores[order].cpu().numpy()
        host_classes, host_rows = kept_classes[order].cpu().numpy().astype(np.int64), rows.cpu().numpy()
        cuts = np.searchsorted(host_rows, np.arange(1, images))
        return list(zip(np.split(host_boxes, cuts), np.split(host_scores, cuts), np.split(host_classes, cuts)))

    def _nms(self, boxes, scores, classes, iou: float):
        torch = self._torch
        if boxes.shape[0] == 0:
            return torch.zeros(0, dtype=torch.int64, device=boxes.device)
        if self._batched_nms is not None:
            return self._batched_nms(boxes, scores.double(), classes, iou)
        # Classes apart by more than the boxes' extent never overlap: one pass does every class.
        shifted = boxes + ((boxes.max() - boxes.min() + 1.0) * classes.double())[:, None]
        order = torch.sort(scores, descending=True, stable=True).indices
        ordered = shifted[order]
        lows = torch.maximum(ordered[:, None, :2], ordered[None, :, :2])
        highs = torch.minimum(ordered[:, None, 2:], ordered[None, :, 2:])
        inter = (highs - lows).clamp(min=0).prod(dim=2)
        areas = (ordered[:, 2:] - ordered[:, :2]).prod(dim=1)
        overlap = (inter / (areas[:, None] + areas[None, :] - inter).clamp(min=1e-12)).cpu().numpy() > iou
        alive = np.ones(len(order), bool)
        kept = []
        for i in range(len(order)):
            if alive[i]:
                kept.append(i)
                alive &= ~overlap[i]
        return order[torch.as_tensor(kept, dtype=torch.int64, device=order.device)]

    def to_host(self, value: Any) -> np.ndarray:
        return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)

    def concat(self, values: Sequence[Any]):
        return self._torch.cat(list(values), dim=0)
