"""Where results go: JSON Lines, a UDP or ZeroMQ socket (ROS 2 vision_msgs/Detection2DArray layout),
annotated images or video, a window. Each sink takes (frame, result) pairs and is closed once."""

from __future__ import annotations

import json
import socket
import sys
from abc import ABC, abstractmethod
from contextlib import ExitStack
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import InputError, MissingDependencyError
from ..files import atomic_writer, write_atomic
from ._cv import cv2_module
from .records import Frame, FrameResult

# The largest UDP payload over IPv4; a bigger message would be refused by the kernel.
MAX_DATAGRAM = 65507
VIDEO_SUFFIXES_WRITTEN = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


class Sink(ABC):
    @abstractmethod
    def write(self, frame: Frame, result: FrameResult) -> None: ...

    def close(self) -> None:
        """Finish the output (flush, rename into place)."""


class JsonLines(Sink):
    """One JSON object per frame, to a stream (stdout) or a file written atomically at close."""

    def __init__(self, target: IO[str] | Path):
        self._stack = ExitStack()
        if isinstance(target, Path):
            self._handle = self._stack.enter_context(atomic_writer(target))
            self._binary = True
        else:
            self._handle, self._binary = target, False

    def write(self, frame: Frame, result: FrameResult) -> None:
        line = json.dumps(result.to_dict(), separators=(",", ":")) + "\n"
        self._handle.write(line.encode() if self._binary else line)
        if not self._binary:
            self._handle.flush()

    def close(self) -> None:
        self._stack.close()

    def abort(self) -> None:
        """Leave no half-written file: the temp file is removed."""
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def detection2d_array(result: FrameResult) -> dict:
    """The result laid out like ROS 2 vision_msgs/msg/Detection2DArray (vision_msgs 4.x field names)."""
    seconds = int(result.time)
    header = {"stamp": {"sec": seconds, "nanosec": int(round((result.time - seconds) * 1e9)) % 1_000_000_000},
              "frame_id": result.source}
    detections = []
    for d in result.detections:
        x1, y1, x2, y2 = d.box
        detections.append({
            "header": header,
            "results": [{"hypothesis": {"class_id": d.label, "score": d.score},
                         "pose": {"pose": {"position": {"x": (x1 + x2) / 2, "y": (y1 + y2) / 2, "z": 0.0}}}}],
            "bbox": {"center": {"position": {"x": (x1 + x2) / 2, "y": (y1 + y2) / 2}, "theta": 0.0},
                     "size_x": x2 - x1, "size_y": y2 - y1},
            "id": str(d.class_id),
        })
    return {"header": header, "detections": detections}


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"'{text}' is not HOST:PORT, e.g. 127.0.0.1:5005")
    return host or "127.0.0.1", int(port)


class UdpSender(Sink):
    """Detection2DArray JSON datagrams. The socket never blocks: a full buffer, nobody listening, or a
    message too big for one datagram drops that message and counts it."""

    def __init__(self, endpoint: str):
        self.address = parse_endpoint(endpoint)
        try:
            infos = socket.getaddrinfo(*self.address, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise InputError(f"cannot resolve UDP host '{self.address[0]}': {exc}") from None
        family, _, _, _, self._target = infos[0]
        self._socket = socket.socket(family, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self.sent = self.dropped = 0

    def write(self, frame: Frame, result: FrameResult) -> None:
        data = json.dumps(detection2d_array(result), separators=(",", ":")).encode()
        if len(data) > MAX_DATAGRAM:
            self.dropped += 1
            return
        try:
            self._socket.sendto(data, self._target)
            self.sent += 1
        except OSError:  # BlockingIOError, ConnectionRefusedError (ICMP from an earlier send), ...
            self.dropped += 1

    def close(self) -> None:
        self._socket.close()


class ZmqPublisher(Sink):
    """The same messages on a ZeroMQ PUB socket (pyzmq); sends never block, slow subscribers lose messages."""

    def __init__(self, endpoint: str):
        try:
            import zmq
        except ImportError:
            raise MissingDependencyError("publishing on ZeroMQ needs pyzmq: pip install pyzmq") from None
        self._zmq = zmq
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, 16)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise InputError(f"cannot bind ZeroMQ endpoint '{endpoint}': {exc}; use e.g. tcp://*:5556") from None
        self.sent = self.dropped = 0

    def write(self, frame: Frame, result: FrameResult) -> None:
        try:
            self._socket.send(json.dumps(detection2d_array(result)).encode(), flags=self._zmq.NOBLOCK)
            self.sent += 1
        except self._zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        self._socket.close()


def draw(frame: Frame, result: FrameResult) -> np.ndarray:
    cv2 = cv2_module()
    image = frame.pixels.copy()
    for d in result.detections:
        x1, y1, x2, y2 = (int(round(v)) for v in d.box)
        colour = tuple(int(c) for c in np.random.default_rng(d.class_id).integers(64, 256, 3))
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, 2)
        cv2.putText(image, f"{d.label} {d.score:.2f}", (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1,
                    cv2.LINE_AA)
    return image


class SaveImages(Sink):
    """Annotated JPEGs in a folder, one per frame: SOURCE-NAME_FRAME.jpg."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder

    def write(self, frame: Frame, result: FrameResult) -> None:
        cv2 = cv2_module()
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(result.source).stem or "source")[:60]
        ok, data = cv2.imencode(".jpg", draw(frame, result))
        if ok:
            write_atomic(self.folder / f"{stem}_{result.source_index:06d}.jpg", data.tobytes())


class SaveVideo(Sink):
    """An annotated video (first source's frame size; other sizes are resized), renamed into place at close."""

    def __init__(self, path: Path, fps: float = 30.0):
        if path.suffix.lower() not in VIDEO_SUFFIXES_WRITTEN:
            raise InputError(f"cannot write video '{path.name}': use .mp4, .avi or .mkv, or a folder for images")
        self.path, self.fps = path, fps
        self._tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
        self._writer = None
        self._size: tuple[int, int] | None = None

    def write(self, frame: Frame, result: FrameResult) -> None:
        cv2 = cv2_module()
        image = draw(frame, result)
        if self._writer is None:
            self._size = (image.shape[1], image.shape[0])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fourcc = cv2.VideoWriter_fourcc(*VIDEO_SUFFIXES_WRITTEN[self.path.suffix.lower()])
            self._writer = cv2.VideoWriter(str(self._tmp), fourcc, self.fps, self._size)
            if not self._writer.isOpened():
                raise InputError(f"OpenCV cannot write '{self.path.name}' here; try .avi")
        if (image.shape[1], image.shape[0]) != self._size:
            image = cv2.resize(image, self._size)
        self._writer.write(image)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._tmp.replace(self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.release()
        self._tmp.unlink(missing_ok=True)


class Window(Sink):
    """cv2.imshow; pressing q or Esc raises KeyboardInterrupt, which ends the run cleanly."""

    def __init__(self) -> None:
        cv2 = cv2_module()
        try:
            cv2.namedWindow("enginesmith detect", cv2.WINDOW_NORMAL)
        except cv2.error:
            raise MissingDependencyError(
                "showing frames in a window needs an OpenCV with a GUI (pip install opencv-python instead of "
                "opencv-python-headless) and a display"
            ) from None

    def write(self, frame: Frame, result: FrameResult) -> None:
        cv2 = cv2_module()
        cv2.imshow("enginesmith detect", draw(frame, result))
        if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
            raise KeyboardInterrupt

    def close(self) -> None:
        cv2_module().destroyAllWindows()


def save_sink(target: Path, fps: float = 30.0) -> Sink:
    """A path with a video suffix is a video; anything else is a folder of images."""
    if target.suffix.lower() in VIDEO_SUFFIXES_WRITTEN or target.suffix.lower() in (".mov", ".webm"):
        return SaveVideo(target, fps)
    return SaveImages(target)


def stdout_lines() -> JsonLines:
    return JsonLines(sys.stdout)
