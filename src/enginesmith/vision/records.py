"""The records live detection passes around: frames in, detections and timings out."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One picture from a source: BGR uint8 pixels (OpenCV's order) and where it came from."""

    source: str
    index: int  # position in its source (frames skipped as corrupt still count)
    time: float  # capture time, time.time() seconds
    pixels: np.ndarray = field(repr=False)
    # Boxes known to be in the picture (synthetic sources): [K, 4] x1,y1,x2,y2 in pixels, and their classes.
    truth: np.ndarray | None = field(default=None, repr=False)
    # A JPEG decoded at 1/reduction of its size (see vision.decode): the picture's own (height, width).
    reduction: int = 1
    full_size: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the picture, in the pixels boxes are reported in."""
        return self.full_size or self.pixels.shape[:2]


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the frame's pixels
    score: float
    class_id: int
    label: str

    def to_dict(self) -> dict:
        x1, y1, x2, y2 = self.box
        return {"box": [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)], "score": round(self.score, 5),
                "class": self.class_id, "label": self.label}


@dataclass(frozen=True)
class StageTimes:
    """Seconds one frame spent in each stage; ``queued`` is waiting between stages."""

    capture: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0
    end_to_end: float = 0.0

    STAGES = ("capture", "preprocess", "inference", "postprocess", "end_to_end")


@dataclass(frozen=True)
class FrameResult:
    frame: int  # running number over everything the pipeline produced
    source: str
    source_index: int
    time: float
    size: tuple[int, int]  # (height, width) of the frame
    detections: tuple[Detection, ...]
    times: StageTimes

    def to_dict(self) -> dict:
        """The JSON Lines record: {"frame", "time", "source", "detections": [{"box", "score", "class", "label"}]}."""
        return {
            "frame": self.frame,
            "time": round(self.time, 6),
            "source": self.source,
            "source_frame": self.source_index,
            "height": self.size[0],
            "width": self.size[1],
            "detections": [d.to_dict() for d in self.detections],
        }
