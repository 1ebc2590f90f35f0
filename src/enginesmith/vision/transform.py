"""Frames into input tensors (resize, letterbox, crop, normalization) and boxes back to frame pixels.

The steps are the engine's :class:`~enginesmith.runtime.preprocess.PreprocessSpec`, done with
OpenCV on BGR frames. Each frame's :class:`Placement` records where it landed in the input, so
boxes found in input pixels map back to the frame exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..runtime.preprocess import PreprocessSpec, letterbox_geometry
from ..signature import Signature
from ._cv import cv2_module


@dataclass(frozen=True)
class Placement:
    """input_x = frame_x * scale_x + offset_x (likewise y); the frame is (height, width)."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    height: int
    width: int

    def to_frame(self, boxes: np.ndarray) -> np.ndarray:
        """x1,y1,x2,y2 boxes in input pixels -> frame pixels, clipped to the frame."""
        out = np.empty_like(boxes, dtype=np.float64)
        out[:, [0, 2]] = (boxes[:, [0, 2]] - self.offset_x) / self.scale_x
        out[:, [1, 3]] = (boxes[:, [1, 3]] - self.offset_y) / self.scale_y
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.height)
        return out

    def of_full_size(self, reduction: int, height: int, width: int) -> "Placement":
        """This placement of a picture decoded at 1/``reduction`` of its size, for the picture at full size."""
        return Placement(self.scale_x / reduction, self.scale_y / reduction, self.offset_x, self.offset_y, height, width)

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        out = np.empty_like(boxes, dtype=np.float64)
        out[:, [0, 2]] = boxes[:, [0, 2]] * self.scale_x + self.offset_x
        out[:, [1, 3]] = boxes[:, [1, 3]] * self.scale_y + self.offset_y
        return out


def input_size(signature: Signature, spec: PreprocessSpec | None, default: int = 640) -> tuple[int, int]:
    """(height, width) of the image input: the spec's crop or exact resize, else the model's fixed dims, else default."""
    if spec is not None and spec.center_crop:
        return tuple(spec.center_crop)  # type: ignore[return-value]
    if spec is not None and isinstance(spec.resize, tuple):
        return tuple(spec.resize)  # type: ignore[return-value]
    dims = signature.inputs[0].shape
    layout = image_layout(signature)
    h, w = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return h, w
    return default, default


def image_layout(signature: Signature) -> str:
    spec = signature.inputs[0]
    if spec.rank != 4:
        raise InputError(f"detection needs an image input of rank 4, but '{spec.name}' has shape {list(spec.shape)}")
    return "NCHW" if spec.shape[1] in (1, 3) else "NHWC"


def detector_spec(signature: Signature, stored: dict | None, size: tuple[int, int] | None = None) -> PreprocessSpec:
    """The engine's stored spec; without one, the YOLO convention: letterbox to the input size, RGB in [0, 1]
    (uint8 inputs, as TensorFlow detection models take, get raw pixels)."""
    if stored:
        spec = PreprocessSpec.from_dict(stored)
        if size is not None:
            spec.resize, spec.center_crop = tuple(size), None
        return spec
    tensor = signature.inputs[0]
    height_width = size or input_size(signature, None)
    raw = np.dtype(tensor.dtype).kind in "iu"
    layout = image_layout(signature)
    channels = tensor.shape[1] if layout == "NCHW" else tensor.shape[3]
    return PreprocessSpec(resize=tuple(height_width), letterbox=not raw, layout=layout,
                          color="GRAY" if channels == 1 else "RGB", scale=1.0 if raw else 1.0 / 255.0, dtype=tensor.dtype)


def placement_for(height: int, width: int, spec: PreprocessSpec, target: tuple[int, int]) -> Placement:
    if spec.letterbox:
        scale, _, _, top, left = letterbox_geometry(height, width, target)
        return Placement(scale, scale, left, top, height, width)
    if isinstance(spec.resize, int):
        s = spec.resize / min(height, width)
        new_h, new_w = max(1, round(height * s)), max(1, round(width * s))
        top, left = ((new_h - target[0]) // 2, (new_w - target[1]) // 2) if spec.center_crop else (0, 0)
        return Placement(new_w / width, new_h / height, -left, -top, height, width)
    resized = spec.resize or (height, width)
    top = left = 0
    if spec.center_crop:
        top, left = (resized[0] - target[0]) // 2, (resized[1] - target[1]) // 2
    return Placement(resized[1] / width, resized[0] / height, -left, -top, height, width)


def to_tensor(pixels: np.ndarray, spec: PreprocessSpec, target: tuple[int, int]) -> tuple[np.ndarray, Placement]:
    """One BGR uint8 frame -> an input tensor without the batch axis, and where the frame landed in it.

    The plain step-by-step reference; :func:`to_batch` is what the detector runs, and gives the same numbers."""
    cv2 = cv2_module()
    height, width = pixels.shape[:2]
    place = placement_for(height, width, spec, target)
    if spec.color == "GRAY":
        image = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)[..., None]
    elif spec.color == "RGB":
        image = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    else:
        image = pixels
    image = _fit(image, place, spec, target, cv2)
    tensor = image.astype(np.float32)
    if spec.scale != 1.0:
        tensor *= np.float32(spec.scale)
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    if mean.any() or (std != 1).any():
        tensor = (tensor - mean) / std
    if spec.layout == "NCHW":
        tensor = tensor.transpose(2, 0, 1)
    return np.ascontiguousarray(tensor.astype(spec.dtype, copy=False)), place


def to_batch(frames: Sequence[np.ndarray], spec: PreprocessSpec, target: tuple[int, int],
             out: np.ndarray | None = None) -> tuple[np.ndarray, list[Placement]]:
    """BGR uint8 frames -> one input batch and where each frame landed: the same numbers as stacking
    :func:`to_tensor`, in fewer passes over the pixels.

    Each frame is resized once while still BGR uint8 (a channel swap commutes with resizing), letterboxed
    with one ``copyMakeBorder`` and split into contiguous planes; each plane is scaled straight into its
    place in the batch (float32 throughout). ``out``, a batch buffer of at least ``len(frames)`` rows with
    the input's shape and dtype, is filled and a view of it returned; without it a new one is made."""
    cv2 = cv2_module()
    if spec.color == "GRAY" or np.dtype(spec.dtype).kind != "f":
        # Gray conversion does not commute with resizing, and integer inputs take raw pixels: the reference path.
        tensors, placements = zip(*(to_tensor(f, spec, target) for f in frames))
        return np.stack(tensors), list(placements)
    shape = (len(frames), 3, *target) if spec.layout == "NCHW" else (len(frames), *target, 3)
    if out is None or out.shape[1:] != shape[1:] or out.shape[0] < len(frames) or out.dtype != np.dtype(spec.dtype):
        out = np.empty(shape, spec.dtype)
    batch = out[: len(frames)]
    scale = np.float32(spec.scale)
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    mean, std = np.broadcast_to(mean, 3), np.broadcast_to(std, 3)
    normalize = bool(mean.any() or (std != 1).any())
    # float16 inputs are computed in float32 and cast once, as the reference does.
    scratch = None if batch.dtype == np.float32 else np.empty(target, np.float32)
    placements = []
    for row, pixels in enumerate(frames):
        place = placement_for(pixels.shape[0], pixels.shape[1], spec, target)
        planes = cv2.split(_fit(pixels, place, spec, target, cv2))
        if spec.color == "RGB":
            planes = planes[::-1]
        for channel, plane in enumerate(planes):
            into = batch[row, channel] if spec.layout == "NCHW" else batch[row, :, :, channel]
            work = into if scratch is None else scratch
            np.multiply(plane, scale, out=work, dtype=np.float32)
            if normalize:
                work -= mean[channel]
                work /= std[channel]
            if work is not into:
                into[...] = work
        placements.append(place)
    return batch, placements


def _fit(image: np.ndarray, place: Placement, spec: PreprocessSpec, target: tuple[int, int], cv2) -> np.ndarray:
    """Resize (area when shrinking both ways, else bilinear), then letterbox or crop to ``target``; uint8 HWC out."""
    height, width = image.shape[:2]
    interpolation = cv2.INTER_AREA if place.scale_x < 1 and place.scale_y < 1 else cv2.INTER_LINEAR
    new_w, new_h = round(width * place.scale_x), round(height * place.scale_y)
    if (new_h, new_w) != (height, width):
        image = cv2.resize(image, (new_w, new_h), interpolation=interpolation).reshape(new_h, new_w, -1)
    if spec.letterbox:
        top, left = int(place.offset_y), int(place.offset_x)
        bottom, right = target[0] - new_h - top, target[1] - new_w - left
        if top or bottom or left or right:
            pad = round(spec.pad_value)
            image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT,
                                       value=(pad,) * image.shape[2]).reshape(target[0], target[1], -1)
        return image
    top, left = int(-place.offset_y), int(-place.offset_x)
    cropped = image[top : top + target[0], left : left + target[1]]
    if cropped.shape[:2] != tuple(target):
        raise InputError(
            f"a {height}x{width} frame resized to {new_h}x{new_w} cannot give the {target[0]}x{target[1]} input "
            "the engine takes; fix the preprocessing spec (resize/crop)"
        )
    return cropped
