"""Thermal-looking synthetic detection scenes with COCO annotations: the data the shipped detectors train on.

Each image is a grayscale 'thermal' frame: a smooth temperature gradient, warm and cold blobs,
clutter that is none of the classes (lines, ellipses, speckles), sensor noise and blur. Objects of
four classes (circle, square, triangle, cross) are drawn hotter or colder than the ground under
them, at random size, contrast and rotation; their COCO boxes are the tight bounds of the drawn
pixels, so a perfect detector scores mAP 1.0. Everything follows from the seed: the same call
writes the same bytes.

    python benchmarks/detection/synth_data.py out/ --train 2000 --val 200 --size 160 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "triangle", "cross")
MIN_SIDE, MAX_SIDE = 10, 48  # object size in pixels (bounding box side, before rotation)
MAX_OVERLAP = 0.2  # an object is redrawn elsewhere when it covers more than this of another's box


@dataclass(frozen=True)
class Box:
    x1: int
    y1: int
    x2: int  # exclusive
    y2: int
    category: int  # index into CLASSES

    def coco_bbox(self) -> list[float]:
        return [float(self.x1), float(self.y1), float(self.x2 - self.x1), float(self.y2 - self.y1)]


def _cv2():
    import cv2

    return cv2


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float temperatures in [0, 255]: a tilted gradient, soft blobs and a little fixed-pattern banding."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * math.pi)
    ground = rng.uniform(50, 170) + rng.uniform(-50, 50) * (np.cos(angle) * xs + np.sin(angle) * ys)
    for _ in range(rng.integers(2, 7)):
        cx, cy, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.35)
        ground += rng.uniform(-45, 45) * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * radius**2))
    ground += rng.uniform(0, 4) * np.sin(ys * size * rng.uniform(0.5, 1.5))  # row banding of cheap sensors
    return ground


def _clutter(rng: np.random.Generator, image: np.ndarray) -> None:
    """Things that are not objects: lines (wires, edges), thin ellipses, speckles."""
    cv2 = _cv2()
    size = image.shape[0]
    for _ in range(rng.integers(2, 8)):
        value = float(image.mean() + rng.uniform(-60, 60))
        kind = rng.integers(3)
        if kind == 0:
            p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
            cv2.line(image, tuple(int(v) for v in p1), tuple(int(v) for v in p2), value, int(rng.integers(1, 3)))
        elif kind == 1:
            centre = tuple(int(v) for v in rng.integers(0, size, 2))
            axes = (int(rng.integers(8, 32)), int(rng.integers(1, 4)))  # elongated: never a circle
            cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, value, -1)
        else:
            for _ in range(rng.integers(5, 30)):
                x, y = rng.integers(0, size, 2)
                cv2.circle(image, (int(x), int(y)), int(rng.integers(1, 3)), value, -1)


def _shape_mask(rng: np.random.Generator, category: int, side: int) -> np.ndarray:
    """A uint8 mask of one object on a canvas a little larger than ``side`` (room for rotation)."""
    cv2 = _cv2()
    canvas = int(side * 1.5) + 4
    mask = np.zeros((canvas, canvas), np.uint8)
    c = canvas / 2
    half = side / 2
    name = CLASSES[category]
    if name == "circle":
        cv2.circle(mask, (int(c), int(c)), int(half), 255, -1, lineType=cv2.LINE_AA)
        return mask
    if name == "square":
        corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        spin = rng.uniform(-0.35, 0.35)
    elif name == "triangle":
        corners = np.array([[0, -half], [half, half * 0.8], [-half, half * 0.8]])
        spin = rng.uniform(0, 2 * math.pi)
    else:  # cross: a plus sign, arms a third of the side wide
        t = half / 3
        corners = np.array([[-t, -half], [t, -half], [t, -t], [half, -t], [half, t], [t, t], [t, half], [-t, half],
                            [-t, t], [-half, t], [-half, -t], [-t, -t]])
        spin = rng.uniform(-0.35, 0.35)
    rotation = np.array([[math.cos(spin), -math.sin(spin)], [math.sin(spin), math.cos(spin)]])
    points = (corners @ rotation.T + c).round().astype(np.int32)
    cv2.fillPoly(mask, [points], 255, lineType=cv2.LINE_AA)
    return mask


def _overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area."""
    w = min(a.x2, b.x2) - max(a.x1, b.x1)
    h = min(a.y2, b.y2) - max(a.y1, b.y1)
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a.x2 - a.x1) * (a.y2 - a.y1), (b.x2 - b.x1) * (b.y2 - b.y1))
    return w * h / smaller


def render_scene(seed: int, size: int = 160, objects: tuple[int, int] = (2, 7)) -> tuple[np.ndarray, list[Box]]:
    """One grayscale uint8 [size, size] image and its object boxes, from ``seed`` alone."""
    cv2 = _cv2()
    rng = np.random.default_rng(seed)
    image = _background(rng, size)
    _clutter(rng, image)
    boxes: list[Box] = []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        category = int(rng.integers(len(CLASSES)))
        side = int(rng.integers(MIN_SIDE, min(MAX_SIDE, size // 3) + 1))
        mask = _shape_mask(rng, category, side)
        ys, xs = np.nonzero(mask > 127)
        y0, x0 = ys.min(), xs.min()
        mask = mask[y0 : ys.max() + 1, x0 : xs.max() + 1]
        h, w = mask.shape
        for _attempt in range(10):
            left, top = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = Box(left, top, left + w, top + h, category)
            if all(_overlap(box, other) <= MAX_OVERLAP for other in boxes):
                break
        else:
            continue
        ground = image[top : top + h, left : left + w]
        # Hot objects mostly (people, engines), some cold ones; contrast from faint to strong.
        contrast = rng.uniform(35, 110) * (1 if rng.random() < 0.8 else -1)
        body = ground.mean() + contrast + rng.normal(0, 4, (h, w))
        alpha = mask.astype(np.float32) / 255.0
        image[top : top + h, left : left + w] = ground * (1 - alpha) + body * alpha
        boxes.append(box)
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.3))
    image += rng.normal(0, rng.uniform(2, 8), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), boxes


def coco_categories() -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]


def write_split(folder: Path, count: int, seed: int, size: int = 160) -> Path:
    """``count`` PNG images under ``folder/images`` and ``folder/annotations.json``; returns the JSON path.

    Image i is rendered from seed ``seed * 1_000_003 + i``, so splits with different seeds never share a scene."""
    cv2 = _cv2()
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        pixels, boxes = render_scene(seed * 1_000_003 + i, size)
        name = f"{i:05d}.png"
        if not cv2.imwrite(str(images_dir / name), pixels):
            raise OSError(f"cannot write {images_dir / name}")
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        for box in boxes:
            bbox = box.coco_bbox()
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": box.category + 1,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    path = folder / "annotations.json"
    text = json.dumps({"images": images, "annotations": annotations, "categories": coco_categories()})
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(text)
    temporary.replace(path)
    return path


def scenes_in_memory(count: int, seed: int, size: int = 160) -> tuple[np.ndarray, list[list[Box]]]:
    """Images [count, size, size] uint8 and their boxes, rendered like :func:`write_split` (same seeds)."""
    pixels = np.empty((count, size, size), np.uint8)
    labels = []
    for i in range(count):
        pixels[i], boxes = render_scene(seed * 1_000_003 + i, size)
        labels.append(boxes)
    return pixels, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0, help="train uses seed, val seed + 1")
    args = parser.parse_args()
    for split, count, seed in (("train", args.train, args.seed), ("val", args.val, args.seed + 1)):
        if count:
            print(write_split(args.out / split, count, seed, args.size))


if __name__ == "__main__":
    main()
