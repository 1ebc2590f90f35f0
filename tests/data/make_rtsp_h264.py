"""Writes the H.264 streams the RTSP tests serve (tests/rtsp_server.py, ``codec="h264"``): 30 frames of 320x240,
Annex B, Constrained Baseline, one slice per frame, an IDR only at frame 0 (every session starts there).

    rtsp_grey_320x240.h264   frame i a flat grey of rtsp_server.level(i)
    rtsp_scene_320x240.h264  frame i the rectangles of test_vision_rtsp.SCENE at index i on a flat background
                             (the scene's noise would make the file a hundred times larger)

Committed, because no H.264 encoder is installed for the tests (OpenCV's wheel cannot write H.264). Made with
PyAV 18.1 (libx264) on 2026-12-02: ``pip install av && PYTHONPATH=src:tests python tests/data/make_rtsp_h264.py``.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from enginesmith.vision.sources import parse_synthetic
from rtsp_server import level

FRAMES, WIDTH, HEIGHT = 30, 320, 240
SCENE = "synthetic:frames=1000,width=320,height=240,objects=3,seed=3"  # as in tests/test_vision_rtsp.py


def encode(pictures: list[np.ndarray]) -> bytes:
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    encoder.time_base, encoder.framerate = Fraction(1, 30), Fraction(30)
    encoder.options = {"profile": "baseline", "preset": "ultrafast", "tune": "zerolatency", "crf": "12",
                       "x264-params": f"keyint={FRAMES}:min-keyint={FRAMES}:scenecut=0:bframes=0:threads=1:sliced-threads=0"}
    data = b""
    for index, picture in enumerate(pictures):
        frame = av.VideoFrame.from_ndarray(picture, format="bgr24")
        frame.pts = index
        data += b"".join(bytes(packet) for packet in encoder.encode(frame))
    return data + b"".join(bytes(packet) for packet in encoder.encode(None))


def main() -> None:
    here = Path(__file__).parent
    grey = [np.full((HEIGHT, WIDTH, 3), level(i), np.uint8) for i in range(FRAMES)]
    scene = parse_synthetic(SCENE)
    (here / "rtsp_grey_320x240.h264").write_bytes(encode(grey))
    (here / "rtsp_scene_320x240.h264").write_bytes(encode([on_flat_background(scene, i) for i in range(FRAMES)]))


def on_flat_background(scene, index: int) -> np.ndarray:
    pixels, truth = scene.render(index)
    inside = np.zeros(pixels.shape[:2], bool)
    for x1, y1, x2, y2, _ in truth.astype(int):
        inside[y1:y2, x1:x2] = True
    pixels[~inside] = 32
    return pixels


if __name__ == "__main__":
    main()
