"""COCO box mAP of a detector on a folder of images (pycocotools' COCOeval, the reference implementation).

Detections are matched to COCO categories by name when the detector's labels are category
names (a names file or ultralytics metadata), else their class id is taken as the category id
(TensorFlow detection models use the COCO ids themselves).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, MissingDependencyError
from ._cv import cv2_module
from .detector import Detector


@dataclass(frozen=True)
class CocoScores:
    map: float  # mAP@[.5:.95]
    map50: float  # mAP@.5
    images: int
    detections: int

    def to_dict(self) -> dict:
        return {"map": round(self.map, 5), "map50": round(self.map50, 5), "images": self.images,
                "detections": self.detections}


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise MissingDependencyError("COCO evaluation needs pycocotools: pip install 'enginesmith[vision]'") from None
    return COCO, COCOeval


def load_annotations(path: Path):
    COCO, _ = _pycocotools()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read COCO annotations '{path}': {exc}") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise InputError(f"'{path}' is not COCO instances JSON (it needs images, annotations and categories)")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def evaluate(detector: Detector, annotations: str | Path, images: str | Path, limit: int | None = None) -> CocoScores:
    """mAP@[.5:.95] and mAP@.5 of ``detector`` over the annotated images found in ``images``."""
    _, COCOeval = _pycocotools()
    cv2 = cv2_module()
    coco = load_annotations(Path(annotations))
    folder = Path(images)
    if not folder.is_dir():
        raise InputError(f"image folder '{folder}' not found")
    by_name = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    image_ids = sorted(coco.getImgIds())[:limit] if limit else sorted(coco.getImgIds())
    results = []
    for image_id in image_ids:
        info = coco.loadImgs(image_id)[0]
        path = folder / info["file_name"]
        pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if pixels is None:
            raise InputError(f"image '{path}' of the annotations is missing or unreadable")
        for d in detector([pixels])[0]:
            x1, y1, x2, y2 = d.box
            category = by_name.get(d.label, d.class_id)
            results.append({"image_id": image_id, "category_id": category, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": d.score})
    if not results:
        return CocoScores(0.0, 0.0, len(image_ids), 0)
    with contextlib.redirect_stdout(io.StringIO()):
        found = coco.loadRes(results)
        run = COCOeval(coco, found, "bbox")
        run.params.imgIds = image_ids
        run.evaluate()
        run.accumulate()
        run.summarize()
    # COCOeval reports -1 where there is nothing to score (no ground truth in a category/size).
    return CocoScores(max(0.0, float(run.stats[0])), max(0.0, float(run.stats[1])), len(image_ids), len(results))
