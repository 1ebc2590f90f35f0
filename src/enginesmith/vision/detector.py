"""An engine seen as a detector: frames in, boxes in frame pixels out, in three separable steps
(preprocess, infer, postprocess) so a pipeline can run them on different threads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..runtime.engine import DeviceOps, Engine, ImageGeometry
from .decode import REDUCTIONS
from .heads import Candidates, Head, choose_head
from .labels import check_names, label_for, names_from_metadata, read_names_file
from .nms import nms
from .records import Detection
from .transform import Placement, detector_spec, input_size, placement_for, to_batch

# Candidates kept (best scores) before NMS: NMS is quadratic in the worst case.
MAX_CANDIDATES = 30000

Infer = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class DetectorSettings:
    head: str | None = None  # None: chosen from the outputs
    names: str | Path | Sequence[str] | None = None  # a file, a list, or None: the model's metadata
    conf: float = 0.25
    iou: float = 0.45
    max_detections: int = 300
    size: tuple[int, int] | None = None  # input (height, width) for engines with dynamic image dims
    # Pre- and post-processing on the engine's device (frames go up as uint8, only kept boxes come back).
    # None: when the engine runs on a GPU and its backend offers device ops (the PyTorch backend on CUDA).
    on_device: bool | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf <= 1.0 or not 0.0 <= self.iou <= 1.0:
            raise InputError(f"the score and IoU thresholds must be within [0, 1], got {self.conf} and {self.iou}")
        if self.max_detections < 1:
            raise InputError("the most detections per frame must be at least 1")


class Detector:
    """Wraps a loaded :class:`Engine`. The head is chosen, and class names checked, on a first call with
    a blank frame, so a model that is not a detector fails before any source is opened."""

    def __init__(self, engine: Engine, settings: DetectorSettings = DetectorSettings(), infer: Infer | None = None):
        self.engine, self.settings = engine, settings
        self.spec = detector_spec(engine.signature, engine.manifest.preprocess, settings.size)
        self.input_hw = input_size(engine.signature, self.spec)
        self.input_name = engine.signature.input_names[0]
        self._infer = infer or engine.infer
        self.device_ops = self._pick_device_ops(engine, settings.on_device, infer is None)
        blank = np.zeros((self.input_hw[0], self.input_hw[1], 3), np.uint8)
        feeds, _ = self.preprocess([blank])
        self._feeds_shape, self._feeds_dtype = tuple(feeds[self.input_name].shape), np.dtype(self.spec.dtype)
        outputs = self.infer(feeds)
        if self.device_ops is not None:
            outputs = {name: self.device_ops.to_host(value) for name, value in outputs.items()}
        shapes = {name: tuple(np.asarray(v).shape) for name, v in outputs.items()}
        self.head: Head = choose_head(shapes, self.input_hw, settings.head, values=outputs)
        self.names = self._class_names()

    def _pick_device_ops(self, engine: Engine, wanted: bool | None, own_infer: bool) -> DeviceOps | None:
        ops = engine.device_ops if own_infer else None
        spec = self.spec
        # The device makes colour float batches by resizing or letterboxing; crops and gray stay on the host.
        fits = (spec.color != "GRAY" and np.dtype(spec.dtype).kind in "fu" and not spec.center_crop
                and isinstance(spec.resize, tuple))
        if wanted and (ops is None or not fits):
            raise InputError(
                f"pre- and post-processing on the device needs an engine with device I/O and device ops (the "
                f"PyTorch backend: build with --backend torch; this is a {engine.backend} engine) and a colour, "
                "float or uint8 input made by an exact resize or letterbox (no crop); pass on_device=False"
            )
        if wanted is None:
            wanted = ops is not None and fits and ops.device.startswith("cuda")
        return ops if wanted else None

    def _class_names(self) -> list[str] | None:
        given = self.settings.names
        if given is None:
            names = names_from_metadata(model_metadata(self.engine))
            where = "the model's metadata"
        elif isinstance(given, (str, Path)):
            names, where = read_names_file(given), f"class names file '{given}'"
        else:
            names, where = list(given), "the class names given"
        if names is not None:
            check_names(names, self.head.classes, self.head.first_class, where)
        return names

    def preprocess(self, frames: Sequence[np.ndarray], out: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], list[Placement]]:
        """The input batch and where each frame landed; ``out`` (see :meth:`batch_buffer`) is filled when given.
        On the device the batch is a device tensor."""
        if self.device_ops is not None:
            return self._preprocess_on_device(frames)
        batch, placements = to_batch(frames, self.spec, self.input_hw, out)
        return {self.input_name: batch}, placements

    def _preprocess_on_device(self, frames: Sequence[np.ndarray]) -> tuple[dict, list[Placement]]:
        spec, target = self.spec, self.input_hw
        placements = [placement_for(f.shape[0], f.shape[1], spec, target) for f in frames]
        places = [ImageGeometry(round(p.height * p.scale_y), round(p.width * p.scale_x), int(p.offset_y), int(p.offset_x))
                  for p in placements]
        batch = self.device_ops.images_to_batch(
            frames, places, target, pad_value=spec.pad_value if spec.letterbox else 0.0, swap_rb=spec.color == "RGB",
            scale=spec.scale, mean=spec.mean, std=spec.std, layout=spec.layout, dtype=spec.dtype)
        return {self.input_name: batch}, placements

    def decode_reduction(self, height: int, width: int) -> int:
        """The largest k of 2, 4, 8 at which a (height, width) picture decoded at 1/k is still shrunk (or kept)
        on its way into the input, else 1: decoding it smaller loses nothing the model would have seen."""
        place = placement_for(height, width, self.spec, self.input_hw)
        largest = max(place.scale_x, place.scale_y)
        return next((k for k in REDUCTIONS if k * largest <= 1.0), 1)

    def batching_note(self, sources: int) -> str | None:
        """What to tell a user whose sources outnumber the frames one engine call takes (the engine splits the
        batch into several calls), and how to batch them; None when they fit."""
        per_call = self.engine.max_batch
        if per_call is None or sources <= per_call:
            return None
        calls = -(-sources // per_call)
        return (f"this engine takes {per_call} frame{'s' if per_call > 1 else ''} per call (its batch is fixed), so "
                f"{sources} sources run as {calls} calls per round; to batch them into one call, build it again with a "
                f"dynamic batch: enginesmith build MODEL --dynamic {self.input_name}:0")

    def batch_buffer(self, frames: int) -> np.ndarray | None:
        """An input batch buffer for up to ``frames`` frames, to reuse across :meth:`preprocess` calls
        (fresh multi-megabyte arrays cost page faults on every batch); None when batches are made on the device."""
        if self.device_ops is not None:
            return None
        return np.empty((frames, *self._feeds_shape[1:]), self._feeds_dtype)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ops = self.device_ops
        if ops is None:
            return dict(self._infer(feeds))
        # infer_device neither splits nor pads batches: a batch larger than the engine's runs in pieces here,
        # and a short one for a fixed-batch engine is padded with copies of its last frame (as Engine.infer does).
        rows = len(feeds[self.input_name])
        step, fixed = self.engine.max_batch or rows, self.engine.signature.fixed_batch()
        pieces = []
        for start in range(0, rows, step):
            piece = {n: v[start : start + step] for n, v in feeds.items()}
            real = len(piece[self.input_name])
            if fixed and real < fixed:
                piece = {n: ops.concat([v] + [v[-1:]] * (fixed - real)) for n, v in piece.items()}
            pieces.append((real, self.engine.infer_device(piece)))
        if len(pieces) == 1 and pieces[0][0] == rows and not (fixed and rows < fixed):
            return dict(pieces[0][1])
        return {name: ops.concat([outputs[name][:real] for real, outputs in pieces]) for name in pieces[0][1]}

    def postprocess(self, outputs: Mapping[str, np.ndarray], placements: Sequence[Placement]) -> list[tuple[Detection, ...]]:
        ops = self.device_ops
        if ops is not None and self.head.name == "yolov8":
            # Score floor, top-k and NMS where the outputs are; only the boxes kept cross to the host.
            settings = self.settings
            found = ops.select_boxes(outputs[self.head.outputs[0]], "channels_cxcywh", settings.conf, settings.iou,
                                     settings.max_detections, MAX_CANDIDATES)
            return [select_detections(Candidates(boxes, scores, classes, suppressed=True), settings, place, self.names,
                                      self.head.first_class)
                    for (boxes, scores, classes), place in zip(found, placements)]
        if ops is not None:
            outputs = {name: ops.to_host(value) for name, value in outputs.items()}
        return [self._one_image(outputs, i, place) for i, place in enumerate(placements)]

    def __call__(self, frames: Sequence[np.ndarray]) -> list[tuple[Detection, ...]]:
        """BGR uint8 frames -> detections per frame, boxes in each frame's pixels."""
        feeds, placements = self.preprocess(frames)
        return self.postprocess(self.infer(feeds), placements)

    def _one_image(self, outputs: Mapping[str, np.ndarray], image: int, place: Placement) -> tuple[Detection, ...]:
        found = self.head.decode(outputs, image, self.input_hw, self.settings.conf)
        return select_detections(found, self.settings, place, self.names, self.head.first_class)


def select_detections(found: Candidates, settings: DetectorSettings, place: Placement, names: Sequence[str] | None,
                      first_class: int = 0) -> tuple[Detection, ...]:
    """Score filter, class-aware NMS (unless the model ran it), boxes to frame pixels, labels; best first."""
    keep = np.flatnonzero(found.scores >= settings.conf)
    if keep.size > MAX_CANDIDATES:
        keep = keep[np.argsort(-found.scores[keep])[:MAX_CANDIDATES]]
    boxes, scores, classes = found.boxes[keep], found.scores[keep], found.classes[keep]
    if found.suppressed:
        order = np.argsort(-scores, kind="stable")[: settings.max_detections]
    else:
        order = nms(boxes, scores, classes, settings.iou, settings.max_detections)
    if not order.size:
        return ()
    # Python numbers from whole arrays at once (tolist), not element by element: this runs for every box of every
    # frame on the pipeline's result thread.
    framed = place.to_frame(boxes[order]).tolist()
    kept_scores, kept_classes = scores[order].astype(np.float64).tolist(), classes[order].astype(np.int64).tolist()
    names = list(names) if names else None
    return tuple(Detection(tuple(box), score, class_id, label_for(class_id, names, first_class))
                 for box, score, class_id in zip(framed, kept_scores, kept_classes))


def model_metadata(engine: Engine) -> dict[str, str]:
    """ONNX metadata_props of the model the engine was built from (the bundle's source, else an ONNX payload)."""
    import onnx

    from ..bundle import read_bundle

    if engine.path is None:
        return {}
    manifest = engine.manifest
    want_source = manifest.has_source and manifest.source_name.lower().endswith(".onnx")
    if not want_source and not manifest.payload_name.lower().endswith(".onnx"):
        return {}
    contents = read_bundle(engine.path, payload=not want_source, source=want_source)
    data = contents.source if want_source else contents.payload
    try:
        model = onnx.load_from_string(data)
    except Exception:  # noqa: BLE001 - metadata is optional: an unparsable model just has no names
        return {}
    return {prop.key: prop.value for prop in model.metadata_props}
