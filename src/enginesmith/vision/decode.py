"""Image files to pixels, JPEGs at a reduced size when the model will shrink them anyway.

libjpeg decodes a JPEG at 1/2, 1/4 or 1/8 of its size by scaling its DCT blocks: less work than
decoding every pixel and resizing afterwards (a 640x480 photo: 1.18 -> 0.97 ms, and no resize to a
320 input; a 4000x3000 one: several times faster). The picture then covers each k x k block of the
original with one pixel, so a box found in it maps back to the original exactly by a factor k.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from ._cv import cv2_module

JPEG_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif"}
REDUCTIONS = (8, 4, 2)
# Start-of-frame markers (0xC0-0xCF) other than DHT, JPG and DAC carry the picture's size.
_NOT_SOF = {0xC4, 0xC8, 0xCC}

# (height, width) of a full-size picture -> the reduction k (1, 2, 4 or 8) to decode it at
Reduction = Callable[[int, int], int]


def jpeg_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """(height, width) as stored in a JPEG's start-of-frame header, before any EXIF rotation; None when
    ``data`` is not a JPEG or its header cannot be read (the caller then decodes at full size)."""
    data = bytes(data.reshape(-1)[:65536]) if isinstance(data, np.ndarray) else data
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in _NOT_SOF:
            if at + 9 > len(data):
                return None
            height, width = int.from_bytes(data[at + 5 : at + 7], "big"), int.from_bytes(data[at + 7 : at + 9], "big")
            return (height, width) if height > 0 and width > 0 else None
        if marker == 0xDA or length < 2:  # scan data before any frame header: not a JPEG we can size
            return None
        at += 2 + length
    return None


def read_image(path: Path, reduction: Reduction | None = None) -> tuple[np.ndarray | None, int, tuple[int, int] | None]:
    """(BGR pixels or None when unreadable, the reduction k they were decoded at, the full-size (height, width)
    when k > 1). EXIF orientation is applied as OpenCV applies it; the full size follows the rotation."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError:
        return None, 1, None
    return decode_image(data, reduction if path.suffix.lower() in JPEG_SUFFIXES else None)


def decode_image(data: np.ndarray, reduction: Reduction | None = None) -> tuple[np.ndarray | None, int, tuple[int, int] | None]:
    """:func:`read_image` for the bytes of one picture (a JPEG is reduced when ``reduction`` asks)."""
    cv2 = cv2_module()
    stored = jpeg_size(data) if reduction is not None else None
    # Either orientation may be the one EXIF asks for: the reduction must suit both.
    k = min(reduction(*stored), reduction(*stored[::-1])) if stored else 1
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[k]
    pixels = cv2.imdecode(data, flag) if data.size else None
    if pixels is None or k == 1:
        return pixels, 1, None
    height, width = stored
    if pixels.shape[:2] != (math.ceil(height / k), math.ceil(width / k)):
        height, width = width, height  # rotated by EXIF
    return pixels, k, (height, width)
