"""Live detection: frames from cameras, videos, streams or files become boxes within a frame budget.

The pieces, each replaceable on its own:

* a :class:`~enginesmith.vision.sources.Source` yields :class:`Frame` records (BGR pixels, where
  and when they were captured); live sources (cameras, streams) may drop frames, files never do;
* a :class:`Detector` wraps an engine: ``preprocess`` (the bundle's preprocessing spec, letterbox
  included, via OpenCV), ``infer`` (the engine call), ``postprocess`` (a detector *head* decodes
  the outputs, then score filter, class-aware NMS, boxes mapped back to frame pixels);
* :func:`run_pipeline` runs capture, preprocessing, inference and post-processing on separate
  threads joined by bounded queues, batching one frame of every source into one engine call;
* sinks write :class:`FrameResult` records: JSON Lines, UDP / ZeroMQ messages laid out like
  ROS 2 ``vision_msgs/Detection2DArray``, annotated images or video, a window.

Only ``runtime/`` is imported from below; OpenCV is imported when the first frame is touched.

    import enginesmith as es
    from enginesmith import vision
    detector = vision.Detector(es.load("yolo.engine"), vision.DetectorSettings(conf=0.3))
    for result in vision.detect(detector, ["video.mp4"], max_frames=100):
        print(result.to_dict())
"""

from __future__ import annotations

from typing import Sequence

from .detector import Detector, DetectorSettings
from .heads import HEADS, HeadMismatchError
from .pipeline import RunSummary, run_pipeline
from .records import Detection, Frame, FrameResult, StageTimes
from .sources import CaptureSettings, Source, SyntheticScene, open_source

__all__ = [
    "HEADS",
    "CaptureSettings",
    "Detection",
    "Detector",
    "DetectorSettings",
    "Frame",
    "FrameResult",
    "HeadMismatchError",
    "RunSummary",
    "Source",
    "StageTimes",
    "SyntheticScene",
    "detect",
    "open_source",
    "run_pipeline",
]


def detect(detector: Detector, sources: Sequence[str | Source], max_frames: int | None = None,
           settings: CaptureSettings = CaptureSettings(), full_decode: bool = False) -> list[FrameResult]:
    """Run the pipeline over sources (their command-line spellings, or Source objects) and return every result.

    For unbounded sources give ``max_frames``, or use :func:`run_pipeline` with a callback. JPEG files and
    MJPEG videos the model shrinks by 2x or more are decoded at 1/2, 1/4 or 1/8 of their size (boxes are
    still in their full size's pixels) unless ``full_decode``.
    """
    reduction = None if full_decode else detector.decode_reduction
    opened = [s if isinstance(s, Source) else open_source(s, settings, reduction) for s in sources]
    results: list[FrameResult] = []
    run_pipeline(detector, opened, lambda frame, result: results.append(result), max_frames=max_frames)
    return results
