"""A ``map`` accuracy budget: the engine and the source each detect on COCO-labelled images, and the
engine may lose at most the budget's points (100 x mAP) of mAP@[.5:.95] (``map``) or mAP@.5 (``map50``).

Detectors are judged this way because their raw outputs are not: under int8, near-tied boxes swap
places and top-1 agreement means nothing for a ``[1, 4+C, anchors]`` head. ``vision`` (OpenCV,
pycocotools) is imported here only when a map budget is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EnginesmithError, ValidationDataError, VerificationFailedError
from ..runtime.engine import Engine
from ..validate import MAP_METRICS, AccuracyBudget
from .state import BuildState

# What ``enginesmith eval`` scores with: mAP wants every low-scoring box, NMS as in COCO practice.
MAP_CONF, MAP_IOU = 0.001, 0.6


@dataclass(frozen=True)
class CocoSet:
    """COCO instances JSON and the folder holding its images."""

    annotations: Path
    images: Path


def coco_set(budget: AccuracyBudget | None, annotations: str | Path | None, images: str | Path | None) -> CocoSet | None:
    """The labelled images a map budget is judged on, checked before anything is built; None without a map budget.

    Every image the annotations name must be in the folder, so a mismatched pair fails here, not after the build.
    """
    if budget is None or not budget.is_map:
        if annotations is not None or images is not None:
            # Given for nothing would look like a check that never ran.
            raise ValidationDataError(
                "--coco and --images judge a mAP budget: add --max-accuracy-drop map:1% (or map50:1%), or leave them out"
            )
        return None
    if annotations is None or images is None:
        raise ValidationDataError(
            f"the accuracy budget '{budget}' needs labelled images: give --coco ANNOTATIONS.json and --images DIR "
            "(coco_annotations= and coco_images= in the API)"
        )
    from ..vision._cv import cv2_module
    from ..vision.evaluate import load_annotations

    cv2_module()  # both extras' errors come before the build, not after it
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise ValidationDataError(f"COCO annotations '{annotations}' not found (--coco)")
    if not images.is_dir():
        raise ValidationDataError(f"image folder '{images}' not found (--images)")
    coco = load_annotations(annotations)
    names = [info.get("file_name") if isinstance(info, dict) else None for info in coco.dataset["images"]]
    if not names:
        raise ValidationDataError(f"COCO annotations '{annotations}' list no images")
    folder = images.resolve()
    for name in names:
        # A name is read as a path under the folder: one that is not (absent, absolute, '..') is refused.
        if not isinstance(name, str) or not name or not (folder / name).resolve().is_relative_to(folder):
            raise ValidationDataError(
                f"'{annotations.name}' names an image '{name}' that is not a file name inside the image folder"
            )
    missing = [name for name in names if not (images / name).is_file()]
    if missing:
        raise ValidationDataError(
            f"{len(missing)} of the {len(names)} images in '{annotations.name}' are not in '{images}' "
            f"(first: '{missing[0]}'); give the folder these annotations describe (--images)"
        )
    return CocoSet(annotations, images)


def map_check(state: BuildState, engine: Engine) -> dict[str, Any]:
    """Score ``engine`` and (once per build) the source on the build's COCO set; the record for ``checks``."""
    from ..vision import Detector, DetectorSettings
    from ..vision.evaluate import evaluate
    from ..vision.labels import names_from_metadata

    budget, labelled = state.budget, state.coco
    assert budget is not None and labelled is not None  # coco_set ran in the import stage
    # The detector reads letterbox and scaling from the manifest, which the package stage fills in later.
    engine.manifest.preprocess = state.preprocess.to_dict() if state.preprocess else None
    # A built engine has no file yet to read class names from; the imported model carries them (ultralytics
    # metadata), and COCO categories are matched by name when there are names.
    model = state.imported.model  # None while a torch source's ONNX conversion runs (it has no such metadata)
    metadata = {prop.key: prop.value for prop in model.metadata_props} if model is not None else {}
    settings = DetectorSettings(names=names_from_metadata(metadata), conf=MAP_CONF, iou=MAP_IOU)
    try:
        on_engine = Detector(engine, settings)
    except EnginesmithError as exc:  # not an image model, or outputs no detector head decodes
        raise ValidationDataError(f"the accuracy budget '{budget}' needs a detector: {exc}; "
                                  "judge other models by '1%' or 'rel_l2<=0.05'") from None
    if state.source_map is None:
        source_detector = Detector(engine, settings, infer=state.reference)
        state.source_map = evaluate(source_detector, labelled.annotations, labelled.images)
    got = evaluate(on_engine, labelled.annotations, labelled.images)
    want = state.source_map
    key = "map" if budget.metric == "map" else "map50"
    drop = 100.0 * (getattr(want, key) - getattr(got, key))
    return {
        "metric": MAP_METRICS[budget.metric],
        "budget_points": budget.value,
        "source": want.to_dict(),
        "engine": got.to_dict(),
        "drop_points": round(drop, 3),
        "images": got.images,
        "annotations": labelled.annotations.name,
        "passed": drop <= budget.value + 1e-9,
    }


def summary(record: dict[str, Any]) -> str:
    """One line: both scores, the drop and the budget."""
    key = "map" if record["metric"] == MAP_METRICS["map"] else "map50"
    return (f"{record['metric']} source {record['source'][key]:.4f}, engine {record['engine'][key]:.4f}: "
            f"{record['drop_points']:.2f} points lost (budget {record['budget_points']:g}) on {record['images']} images")


def check_map_budget(state: BuildState, engine: Engine) -> None:
    """The verify stage's mAP check: recorded in ``checks["map_budget"]``; over the budget stops the build."""
    record = map_check(state, engine)
    engine.manifest.checks["map_budget"] = record
    if not record["passed"]:
        raise VerificationFailedError(
            f"the built {engine.precision} engine is over the accuracy budget: {summary(record)}"
        )
