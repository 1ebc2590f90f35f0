"""OpenCV, imported when a frame is first touched, with the one error that names the extra."""

from __future__ import annotations

import os
from types import ModuleType

from ..errors import MissingDependencyError


def cv2_module() -> ModuleType:
    # FFmpeg's own log lines ("[mjpeg @ 0x...] No JPEG data found") for a damaged frame would interleave
    # with our output; damaged frames are counted instead. Set the variables yourself to see them.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    try:
        import cv2
    except ImportError:
        raise MissingDependencyError(
            "live detection needs OpenCV: pip install 'enginesmith[vision]' (opencv-python-headless)"
        ) from None
    return cv2
