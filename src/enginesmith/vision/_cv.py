"""OpenCV, imported when a frame is first touched, with the one error that names the extra."""

from __future__ import annotations

from types import ModuleType

from ..errors import MissingDependencyError


def cv2_module() -> ModuleType:
    try:
        import cv2
    except ImportError:
        raise MissingDependencyError(
            "live detection needs OpenCV: pip install 'enginesmith[vision]' (opencv-python-headless)"
        ) from None
    return cv2
