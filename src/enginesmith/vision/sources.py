"""Where frames come from: image files, a folder or glob, a video, a camera, a network stream,
a GStreamer pipeline, or a synthetic scene with known boxes (for tests and benchmarks).

A source is *live* when frames arrive whether or not anyone reads them (cameras, streams,
a real-time synthetic scene): the pipeline then drops the oldest frame when it falls behind.
File sources are read as fast as the pipeline takes them and never drop a frame.
"""

from __future__ import annotations

import glob
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError, MissingDependencyError
from ..runtime.preprocess import IMAGE_SUFFIXES
from ._cv import cv2_module
from .decode import Reduction, decode_image, read_image
from .records import Frame

STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")
# How many unreadable frames in a row end a video rather than being skipped one by one.
MAX_CORRUPT_RUN = 50
# The longest wait between two attempts to open a lost live source again.
MAX_RECONNECT_DELAY_S = 8.0
# How far the synthetic scene's background noise moves between frames.
NOISE_MARGIN = 61


class Source(ABC):
    """An iterator of frames; ``corrupt`` counts frames that could not be decoded and were skipped,
    ``reconnects`` the times a live source that stopped delivering was opened again."""

    name: str
    live: bool = False
    corrupt: int = 0
    reconnects: int = 0
    lost: bool = False

    def __init__(self) -> None:
        self.corrupt = 0
        self.reconnects = 0
        self.lost = False  # a live source that stopped delivering and could not be opened again
        self._stopping = threading.Event()

    @abstractmethod
    def frames(self) -> Iterator[Frame]: ...

    def request_stop(self) -> None:
        """Ask ``frames`` to end soon (a wait before reconnecting ends at once); any thread may call it."""
        self.__dict__.setdefault("_stopping", threading.Event()).set()

    def close(self) -> None:
        """Release the device or file; called once the pipeline is done with the source."""


@dataclass(frozen=True)
class CaptureSettings:
    """What to ask a camera for (None leaves the driver's choice), and how a live source that stops
    delivering (a camera unplugged, a stream that drops) is opened again: up to ``reconnect`` attempts in
    a row, waiting ``reconnect_delay_s`` before the first and twice as long before each next one (at most
    MAX_RECONNECT_DELAY_S); 0 attempts end the source at once."""

    width: int | None = None
    height: int | None = None
    fps: float | None = None
    reconnect: int = 5
    reconnect_delay_s: float = 0.5


class ImageFiles(Source):
    """Image files in order. With ``reduction`` (e.g. :meth:`Detector.decode_reduction`), JPEGs are decoded at
    the reduced size it picks (``reduced`` counts them); frames then say their full size."""

    def __init__(self, name: str, paths: list[Path], reduction: Reduction | None = None):
        super().__init__()
        self.name, self.paths, self.reduction = name, paths, reduction
        self.reduced = 0

    def frames(self) -> Iterator[Frame]:
        for index, path in enumerate(self.paths):
            pixels, k, full_size = read_image(path, self.reduction)
            if pixels is None:
                self.corrupt += 1
                continue
            self.reduced += int(k > 1)
            yield Frame(str(path), index, time.time(), pixels, reduction=k, full_size=full_size)


class VideoCapture(Source):
    """A video file, camera, stream or GStreamer pipeline, through cv2.VideoCapture.

    MJPEG files and streams that FFmpeg reads come as their undecoded JPEG packets, decoded here by
    libjpeg-turbo (:mod:`.decode`): faster than FFmpeg's decoder and colour conversion, and at 1/2, 1/4
    or 1/8 of the size where ``reduction`` allows (``reduced`` counts those frames). The first packet is
    checked to decode at the video's size; if not (interlaced fields, say), FFmpeg decodes as usual.
    """

    def __init__(self, name: str, target: str | int, live: bool, backend: int | None = None,
                 settings: CaptureSettings = CaptureSettings(), reduction: Reduction | None = None):
        super().__init__()
        self.name, self.target, self.live, self.backend, self.settings = name, target, live, backend, settings
        self.reduction = reduction
        self.reduced = 0
        self._capture = None
        self._packets = False  # reading JPEG packets, not decoded frames
        self._first: np.ndarray | None = None  # the packet read to check them, handed out first

    def open(self) -> "VideoCapture":
        cv2 = cv2_module()
        capture = self._new_capture(cv2)
        self._packets, self._first = False, None
        if self._is_mjpeg_file_or_stream(capture, cv2):
            size = (int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)))
            if capture.set(cv2.CAP_PROP_FORMAT, -1):
                ok, packet = capture.read()
                pixels = cv2.imdecode(packet, cv2.IMREAD_COLOR) if ok and packet is not None and packet.size else None
                if pixels is not None and pixels.shape[:2] == size:
                    self._packets, self._first = True, packet
                else:  # FFmpeg decodes it, from the start
                    capture.release()
                    capture = self._new_capture(cv2)
        self._capture = capture
        return self

    def _new_capture(self, cv2):
        capture = cv2.VideoCapture(self.target) if self.backend is None else cv2.VideoCapture(self.target, self.backend)
        if not capture.isOpened():
            capture.release()
            raise InputError(f"cannot open source '{self.name}': {self._open_hint()}")
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, self.settings.width), (cv2.CAP_PROP_FRAME_HEIGHT, self.settings.height),
                            (cv2.CAP_PROP_FPS, self.settings.fps)):
            if value:
                capture.set(prop, value)
        return capture

    def _is_mjpeg_file_or_stream(self, capture, cv2) -> bool:
        if isinstance(self.target, int) or str(self.target).startswith("/dev/video") or capture.getBackendName() != "FFMPEG":
            return False  # cameras deliver MJPEG through V4L2, whose raw buffers this was not tried on
        return int(capture.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").upper() == b"MJPG"

    def _read(self, capture, index: int) -> tuple[bool, Frame | None]:
        """(whether the source gave anything, frame ``index`` or None when it could not be decoded)."""
        if not self._packets:
            ok, pixels = capture.read()
            ok = ok and pixels is not None
            return ok, Frame(self.name, index, time.time(), pixels) if ok else None
        packet, self._first = self._first, None
        if packet is None:
            ok, packet = capture.read()
            if not ok or packet is None:
                return False, None
        pixels, k, full_size = decode_image(packet, self.reduction)
        if pixels is None:
            return True, None
        self.reduced += int(k > 1)
        return True, Frame(self.name, index, time.time(), pixels, reduction=k, full_size=full_size)

    def _open_hint(self) -> str:
        if isinstance(self.target, int) or str(self.target).startswith("/dev/video"):
            return "no camera there, or it is busy; list cameras with 'v4l2-ctl --list-devices'"
        if "!" in str(self.target):
            return "OpenCV could not start the GStreamer pipeline (is this OpenCV built with GStreamer? end it with appsink)"
        if str(self.target).startswith(STREAM_SCHEMES):
            return "the stream did not answer or its format is not supported"
        return "not a video OpenCV can decode"

    def frames(self) -> Iterator[Frame]:
        cv2 = cv2_module()
        capture = self._capture or self.open()._capture
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if not self.live else 0
        index, failures = 0, 0
        while True:
            ok, frame = self._read(capture, index)
            if frame is not None:
                failures = 0
                yield frame
                index += 1
                continue
            if ok:  # a packet that is no JPEG: skipped and counted, the next one follows
                self.corrupt += 1
                index += 1
                continue
            if self.live:
                if not self._reopen():
                    return
                capture = self._capture
                continue
            # A read that fails before the known end is a damaged frame: skip it, count it, go on.
            position = int(capture.get(cv2.CAP_PROP_POS_FRAMES))
            if total <= 0 or max(position, index) >= total - 1 or failures >= MAX_CORRUPT_RUN:
                return
            failures += 1
            self.corrupt += 1
            index += 1
            capture.set(cv2.CAP_PROP_POS_FRAMES, index)

    def _reopen(self) -> bool:
        """Open a live source that stopped delivering again, with growing waits; False: it stays lost."""
        self.close()
        delay = self.settings.reconnect_delay_s
        for _ in range(self.settings.reconnect):
            if self._stopping.wait(delay):
                return False
            try:
                self.open()
            except InputError:
                delay = min(2 * delay, MAX_RECONNECT_DELAY_S)
                continue
            self.reconnects += 1
            return True
        self.lost = self.settings.reconnect > 0 and not self._stopping.is_set()
        return False

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


@dataclass(frozen=True)
class SyntheticScene:
    """Moving rectangles on noise; frame i depends only on (seed, i), so runs are repeatable."""

    width: int = 640
    height: int = 480
    frames: int = 100
    objects: int = 3
    classes: int = 3
    seed: int = 0
    fps: float = 0.0  # frames a second to produce at; 0: as fast as they are taken
    live: bool = False

    @cached_property
    def _layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Sizes, starts, velocities and classes of the rectangles (drawn once: every frame uses them)."""
        rng = np.random.default_rng(self.seed)
        sizes = np.stack([rng.integers(self.width // 10, self.width // 4, self.objects),
                          rng.integers(self.height // 10, self.height // 4, self.objects)], axis=1)
        starts = rng.uniform(0, 1, (self.objects, 2)) * (np.array([self.width, self.height]) - sizes)
        velocities = rng.uniform(-6, 6, (self.objects, 2))
        classes = rng.integers(0, self.classes, self.objects)
        return sizes, starts, velocities, classes

    def truth(self, index: int) -> np.ndarray:
        """[K, 5]: x1, y1, x2, y2, class of every rectangle in frame ``index``; they bounce off the edges."""
        sizes, starts, velocities, classes = self._layout
        room = np.array([self.width, self.height]) - sizes
        travel = np.abs((starts + velocities * index) % (2 * room))
        corner = np.where(travel > room, 2 * room - travel, travel).round()
        return np.concatenate([corner, corner + sizes, classes[:, None]], axis=1).astype(np.float64)

    @cached_property
    def _noise(self) -> np.ndarray:
        """Dark noise a little larger than a frame, drawn once: each frame is a window of it."""
        rng = np.random.default_rng(self.seed)
        return rng.integers(0, 64, (self.height + NOISE_MARGIN, self.width + NOISE_MARGIN, 3), dtype=np.uint8)

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        # A window that moves from frame to frame, rather than fresh noise each frame: a camera's raw
        # frame costs nothing to make, and drawing 900k random bytes took longer than the rest of a frame.
        top, left = (index * 37) % NOISE_MARGIN, (index * 11) % NOISE_MARGIN
        pixels = self._noise[top : top + self.height, left : left + self.width].copy()
        palette = ((0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255), (255, 255, 0))
        boxes = self.truth(index)
        fill = _rectangle_filler()
        for x1, y1, x2, y2, cls in boxes.astype(int):
            fill(pixels, x1, y1, x2, y2, palette[cls % len(palette)])
        return pixels, boxes


def _rectangle_filler():
    """Fills pixels [y1:y2, x1:x2] with a colour: OpenCV's filled rectangle (a tenth of numpy's time, which made
    the synthetic source the slowest stage of a multi-source pipeline), numpy where OpenCV is missing."""
    try:
        cv2 = cv2_module()
    except MissingDependencyError:
        def fill(pixels, x1, y1, x2, y2, colour):
            pixels[y1:y2, x1:x2] = colour
        return fill

    def fill(pixels, x1, y1, x2, y2, colour):
        if x2 > x1 and y2 > y1:  # OpenCV's corners are inclusive
            cv2.rectangle(pixels, (int(x1), int(y1)), (int(x2) - 1, int(y2) - 1), colour, -1)
    return fill


class Synthetic(Source):
    def __init__(self, name: str, scene: SyntheticScene):
        super().__init__()
        self.name, self.scene, self.live = name, scene, scene.live

    def frames(self) -> Iterator[Frame]:
        start = time.perf_counter()
        for index in range(self.scene.frames):
            if self.scene.fps > 0:
                delay = start + index / self.scene.fps - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            pixels, truth = self.scene.render(index)
            yield Frame(self.name, index, time.time(), pixels, truth)


def parse_synthetic(text: str) -> SyntheticScene:
    """``synthetic`` or ``synthetic:width=640,height=480,frames=100,objects=3,seed=0,fps=30,live=1``."""
    _, _, options = text.partition(":")
    fields = SyntheticScene.__dataclass_fields__
    values: dict = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise InputError(f"'{item}' in source '{text}' is not one of {', '.join(f'{k}=' for k in fields)}")
        try:
            values[key] = value.lower() in ("1", "true", "yes") if key == "live" else type(getattr(SyntheticScene, key))(value)
        except ValueError:
            raise InputError(f"'{item}' in source '{text}' is not a number") from None
    scene = SyntheticScene(**values)
    if min(scene.width, scene.height) < 16 or scene.frames < 1 or scene.objects < 0 or scene.classes < 1:
        raise InputError(f"source '{text}': width and height must be at least 16, frames and classes at least 1")
    return scene


VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".wmv", ".flv", ".gif"}


def open_source(text: str, settings: CaptureSettings = CaptureSettings(), reduction: Reduction | None = None) -> Source:
    """A source from its command-line spelling; an unusable one raises :class:`InputError` naming it.
    ``reduction``: JPEG files, and MJPEG videos and streams, are decoded at the size it picks (see
    :class:`ImageFiles`, :class:`VideoCapture`)."""
    if text == "synthetic" or text.startswith("synthetic:"):
        return Synthetic(text, parse_synthetic(text))  # needs no OpenCV
    cv2 = cv2_module()
    if re.fullmatch(r"\d+", text) or re.fullmatch(r"/dev/video\d+", text):
        target = int(text) if text.isdigit() else text
        return VideoCapture(text, target, live=True, backend=cv2.CAP_V4L2 if text.startswith("/dev/") else None,
                            settings=settings).open()
    if text.startswith(STREAM_SCHEMES):
        return VideoCapture(text, text, live=True, backend=cv2.CAP_FFMPEG, settings=settings, reduction=reduction).open()
    if "!" in text:
        return VideoCapture(text, text, live=True, backend=cv2.CAP_GSTREAMER, settings=settings).open()
    path = Path(text)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise InputError(f"folder '{text}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return ImageFiles(text, images, reduction)
    if glob.has_magic(text):
        images = sorted(Path(p) for p in glob.glob(text) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise InputError(f"no images match '{text}'")
        return ImageFiles(text, images, reduction)
    if not path.exists():
        raise InputError(
            f"source '{text}' not found: give an image, folder, glob, video file, camera index or /dev/videoN, "
            "rtsp:// or http:// stream, GStreamer pipeline, or synthetic"
        )
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageFiles(text, [path], reduction)
    return VideoCapture(text, str(path), live=False, reduction=reduction).open()
