"""Image preprocessing specs: the exact steps between a picture file and an input tensor.

A spec is stored in the engine's manifest, so ``enginesmith run model.engine --image
cat.jpg`` applies the same resize, crop, channel order and normalization the engine
was calibrated with. Specs come from the command line (``resize=256,crop=224,...``)
or from a TOML file.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ValidationDataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class PreprocessSpec:
    # Shorter side resized to this, keeping aspect (int), or exact (height, width).
    resize: int | tuple[int, int] | None = None
    # Center crop (height, width) after resizing.
    center_crop: tuple[int, int] | None = None
    # With an exact resize (height, width): keep the aspect ratio and pad the rest with
    # ``pad_value`` (pixels 0-255, before scaling), centred, as YOLO-family detectors expect.
    letterbox: bool = False
    pad_value: float = 114.0
    layout: str = "NCHW"
    color: str = "RGB"
    # Applied in this order: x * scale, then (x - mean) / std, per channel.
    scale: float = 1.0 / 255.0
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.layout = self.layout.upper()
        self.color = self.color.upper()
        if self.layout not in ("NCHW", "NHWC"):
            raise ValidationDataError(f"preprocessing layout must be NCHW or NHWC, got '{self.layout}'")
        if self.color not in ("RGB", "BGR", "GRAY"):
            raise ValidationDataError(f"preprocessing color must be RGB, BGR or GRAY, got '{self.color}'")
        if isinstance(self.resize, list):
            self.resize = tuple(self.resize)
        if isinstance(self.center_crop, (list, int)):
            crop = self.center_crop
            self.center_crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
        if any(s == 0 for s in self.std):
            raise ValidationDataError("preprocessing std must not contain 0")
        if self.letterbox and not isinstance(self.resize, tuple):
            raise ValidationDataError("preprocessing letterbox needs an exact size, e.g. resize=640x640;letterbox=true")

    @property
    def channels(self) -> int:
        return 1 if self.color == "GRAY" else 3

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("resize", "center_crop"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessSpec":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValidationDataError(
                f"unknown preprocessing keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.replace("/", ",").split(",") if v]


def parse_spec(text: str) -> PreprocessSpec:
    """A spec from ``key=value;key=value`` text, or from a TOML file path.

    Keys: resize=256 or resize=224x224, crop=224, layout=NCHW, color=RGB, scale=0.00392,
    mean=0.485/0.456/0.406, std=0.229/0.224/0.225, dtype=float32, letterbox=true (with an
    exact resize: keep the aspect ratio, pad with pad_value=114).
    """
    path = Path(text)
    if path.suffix.lower() == ".toml":
        return spec_from_toml(path)
    data: dict[str, Any] = {}
    try:
        for item in filter(None, (part.strip() for part in text.split(";"))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"'{item}' is not key=value")
            key = {"crop": "center_crop"}.get(key.strip(), key.strip())
            value = value.strip()
            if key in ("resize", "center_crop"):
                dims = [int(v) for v in value.lower().split("x")]
                if len(dims) == 1:
                    # resize=256 keeps the aspect ratio; crop=224 is square
                    data[key] = dims[0] if key == "resize" else (dims[0], dims[0])
                else:
                    data[key] = tuple(dims[:2])
            elif key in ("mean", "std"):
                data[key] = _floats(value)
            elif key in ("scale", "pad_value"):
                data[key] = float(value)
            elif key == "letterbox":
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(f"letterbox={value} is not true or false")
                data[key] = value.lower() in ("1", "true", "yes")
            else:
                data[key] = value
    except ValueError as exc:
        raise ValidationDataError(f"cannot read preprocessing spec '{text}': {exc}") from None
    return PreprocessSpec.from_dict(data)


def spec_from_toml(path: Path) -> PreprocessSpec:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValidationDataError(f"cannot read preprocessing file '{path}': {exc}") from None
    return PreprocessSpec.from_dict(data.get("preprocess", data))


def load_image(path: Path, spec: PreprocessSpec) -> np.ndarray:
    """One image as an array of the spec's layout without the batch axis."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if spec.color == "GRAY" else "RGB")
            img = _letterbox(img, spec.resize, spec.pad_value) if spec.letterbox else _resize(img, spec.resize)
            if spec.center_crop:
                img = _center_crop(img, spec.center_crop)
            pixels = np.asarray(img, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValidationDataError(f"cannot read image '{path}': {exc}") from None
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if spec.color == "BGR":
        pixels = pixels[..., ::-1]
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    pixels = (pixels * spec.scale - mean) / std
    if spec.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels.astype(spec.dtype))


def _resize(img, size):
    from PIL import Image

    if size is None:
        return img
    if isinstance(size, int):
        w, h = img.size
        scale = size / min(w, h)
        return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    return img.resize((size[1], size[0]), Image.BILINEAR)


def _center_crop(img, crop):
    w, h = img.size
    ch, cw = crop
    if ch > h or cw > w:
        raise ValueError(f"crop {ch}x{cw} is larger than the resized image {h}x{w}")
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def letterbox_geometry(height: int, width: int, target: tuple[int, int]) -> tuple[float, int, int, int, int]:
    """(scale, new height, new width, pad top, pad left) that fit a picture into ``target`` keeping its aspect."""
    scale = min(target[0] / height, target[1] / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return scale, new_h, new_w, (target[0] - new_h) // 2, (target[1] - new_w) // 2


def _letterbox(img, size, pad_value: float):
    from PIL import Image

    _, new_h, new_w, top, left = letterbox_geometry(img.size[1], img.size[0], size)
    fill = int(round(pad_value))
    canvas = Image.new(img.mode, (size[1], size[0]), fill if img.mode == "L" else (fill,) * 3)
    canvas.paste(img.resize((new_w, new_h), Image.BILINEAR), (left, top))
    return canvas
