"""mAP of the detectors trained here (benchmarks/detection/), source vs engine per precision, and
``detect`` on real detectors shipped in public packages.

For every shipped detector (SSD-MobileNetV2-style frozen graph with and without NMS, its SavedModel,
the YOLOv8-style ONNX) on --val synthetic thermal scenes it never trained on (seed 2):
  * source  - the model run by its own framework (TensorFlow / ONNX Runtime unoptimized: the reference
              runner ``eval --against`` uses), through the same preprocessing, head decode and NMS
  * engines - one per (backend, precision) the backend offers on this CPU: ONNX Runtime fp32 / int8,
              OpenVINO fp32 / its native fp16-bf16 where the CPU has it / int8; int8 calibrated on
              --calib other scenes (seed 3; the uint8 SSD input takes raw pixels)
mAP@[.5:.95] and mAP@.5 by pycocotools; the baseline in the same run is the source's mAP, and every
engine row gives its drop in points (100 x mAP).

Real detectors from packages: each runs through ``Detector`` as an engine and as its source on the
same frames (a photograph of a person, four ways); the boxes must agree (the count, IoU of matched boxes,
classes). Zoo detectors whose
outputs no head decodes (BlazeFace's anchor-encoded regressors) are recorded with the error
``detect`` gives them.

    python benchmarks/detectors.py [--val 200] [--calib 64] [--json benchmarks/results/detectors.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import enginesmith as es
from enginesmith.bench import machine_facts
from enginesmith.files import write_atomic
from enginesmith.vision.evaluate import evaluate

sys.path.insert(0, str(Path(__file__).parent / "detection"))
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import scoring  # noqa: E402
import synth_data  # noqa: E402
from vision_models import REAL_DETECTORS, fetch_real_detector  # noqa: E402

# Detectors in benchmarks/zoo/models.toml (sha256-checked, cached by zoo.py) that detect gets pointed at.
ZOO_DETECTORS = ("blazeface_short_range",)
BUILDS = (("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "fp16"),
          ("openvino", "bf16"), ("openvino", "int8"))


def calibration_folder(folder: Path, count: int) -> Path:
    synth_data.write_split(folder, count, scoring.CALIB_SEED)
    return folder / "images"


def offered(backend: str, precision: str) -> bool:
    from enginesmith.backends import get_backend
    from enginesmith.backends.base import BuildOptions

    try:
        chosen = get_backend(backend)
    except Exception:  # noqa: BLE001 - a backend this machine lacks is simply not measured
        return False
    return chosen.available().ok and precision in chosen.precisions(BuildOptions())


def score_detector(detector: scoring.ShippedDetector, annotations: Path, images: Path, calib: Path, work: Path) -> dict:
    rows, source_scores = [], None
    for backend, precision in BUILDS:
        if not offered(backend, precision):
            continue
        started = time.perf_counter()
        try:
            engine = es.build(detector.source, backend=backend, precision=precision,
                              calibration_data=calib if precision == "int8" else None, holdout=0.0,
                              verify=False, output=work / f"{detector.key}_{backend}_{precision}.engine")
        except es.EnginesmithError as exc:
            rows.append({"backend": backend, "precision": precision, "error": str(exc)[:300]})
            continue
        build_s = time.perf_counter() - started
        on_engine, on_source = scoring.detectors_for(engine, detector.source if source_scores is None else None)
        if on_source is not None:
            source_scores = evaluate(on_source, annotations, images)
        scores = evaluate(on_engine, annotations, images)
        rows.append({"backend": backend, "precision": precision, "head": on_engine.head.name, **scores.to_dict(),
                     "drop_points": round(100 * (source_scores.map - scores.map), 3),
                     "drop_points_50": round(100 * (source_scores.map50 - scores.map50), 3), "build_s": round(build_s, 1)})
        print(f"{detector.key:22s} {backend:12s} {precision:5s} mAP {scores.map:.4f} (source {source_scores.map:.4f}) "
              f"mAP@.5 {scores.map50:.4f} (source {source_scores.map50:.4f})", flush=True)
    return {"source": str(detector.source.relative_to(Path(__file__).parents[1])), "framework": detector.framework,
            "source_scores": source_scores.to_dict() if source_scores else None, "engines": rows}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    top_left, bottom_right = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def agreement(engine_found, source_found) -> dict:
    """Per frame: detections counted, best-IoU of each source box among the engine's of the same class."""
    counts, ious = [], []
    for e, s in zip(engine_found, source_found):
        counts.append((len(e), len(s)))
        if s and e:
            for cls in {d.class_id for d in s}:
                eb = np.array([d.box for d in e if d.class_id == cls]).reshape(-1, 4)
                sb = np.array([d.box for d in s if d.class_id == cls]).reshape(-1, 4)
                ious.extend((_iou(sb, eb).max(axis=1) if len(eb) else np.zeros(len(sb))).tolist())
    return {"frames": len(counts), "detections_engine": sum(c[0] for c in counts),
            "detections_source": sum(c[1] for c in counts), "same_count_frames": sum(c[0] == c[1] for c in counts),
            "min_matched_iou": round(min(ious), 4) if ious else None,
            "mean_matched_iou": round(float(np.mean(ious)), 4) if ious else None}


def portrait_frames() -> list[np.ndarray]:
    """A photograph of a person (matplotlib's sample Grace Hopper portrait), as is, mirrored, squeezed to
    640x480 and cropped: frames where a detector of people finds something."""
    import cv2
    from matplotlib import cbook

    photo = cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    return [photo, np.ascontiguousarray(photo[:, ::-1]), cv2.resize(photo, (640, 480)), photo[40:440, 60:460]]


def real_detector(key: str, work: Path) -> dict:
    import hashlib

    from enginesmith import vision
    from enginesmith.importers import ImportOptions, reference_runner

    model = REAL_DETECTORS[key]
    path = fetch_real_detector(key)
    engine = es.build(path, output=work / f"{key}.engine", backend="onnxruntime")
    pictures = portrait_frames()
    record = {"package": model.package, "version": model.version, "member": model.member, "license": model.license,
              "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "task": model.task}
    for conf in (0.25, 0.05):
        settings = vision.DetectorSettings(conf=conf)
        on_engine = vision.Detector(engine, settings)
        on_source = vision.Detector(engine, settings, infer=reference_runner(path, ImportOptions()))
        record[f"conf_{conf}"] = {"head": on_engine.head.name,
                                  **agreement([on_engine([p])[0] for p in pictures], [on_source([p])[0] for p in pictures])}
    return record


def zoo_detector(model_id: str, work: Path) -> dict:
    """Build the zoo's detector and open it as a Detector: its head, or the error ``detect`` prints."""
    import os

    import zoo_corpus
    from enginesmith import vision

    model = next(m for m in zoo_corpus.load_manifest() if m.id == model_id)
    cache = Path(os.environ.get("ENGINESMITH_ZOO_CACHE", Path.home() / ".cache" / "enginesmith-zoo"))
    path = zoo_corpus.fetch_model(model, cache)
    record = {"package": model.package, "version": model.version, "member": model.path, "license": model.license,
              "sha256": model.sha256, "task": model.task}
    engine = es.build(path, output=work / f"{model_id}.engine", backend="onnxruntime")
    try:
        record["head"] = vision.Detector(engine).head.name
    except es.EnginesmithError as exc:
        record["detect_error"] = f"{type(exc).__name__}: {exc}"
    return record


def table(results: dict) -> str:
    lines = ["| detector | engine | head | mAP@[.5:.95] (source) | mAP@.5 (source) | drop, points |", "|---|---|---|---|---|---|"]
    for key, entry in results["detectors"].items():
        src = entry["source_scores"]
        for row in entry["engines"]:
            if "error" in row:
                lines.append(f"| {key} | {row['backend']} {row['precision']} | | error: {row['error'][:80]} | | |")
                continue
            lines.append(f"| {key} | {row['backend']} {row['precision']} | {row['head']} | {row['map']:.4f} ({src['map']:.4f}) "
                         f"| {row['map50']:.4f} ({src['map50']:.4f}) | {row['drop_points']:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val", type=int, default=200, help="validation scenes (seed 2)")
    parser.add_argument("--calib", type=int, default=64, help="int8 calibration scenes (seed 3)")
    parser.add_argument("--only", action="append", help="detector keys to run (default: all)")
    parser.add_argument("--no-real", action="store_true", help="skip the detectors from packages")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "detectors.json")
    args = parser.parse_args()
    results: dict = {"machine": machine_facts(), "val_images": args.val, "calib_images": args.calib, "detectors": {}, "real": {}}
    with tempfile.TemporaryDirectory(prefix="enginesmith-detectors-") as tmp:
        work = Path(tmp)
        annotations, images = scoring.write_val_set(work / "val", args.val)
        calib = calibration_folder(work / "calib", args.calib)
        for detector in scoring.DETECTORS:
            if args.only and detector.key not in args.only:
                continue
            results["detectors"][detector.key] = score_detector(detector, annotations, images, calib, work)
        if not args.no_real:
            for key in REAL_DETECTORS:
                try:
                    results["real"][key] = real_detector(key, work)
                except Exception as exc:  # noqa: BLE001 - recorded: no registry, say, is a result too
                    results["real"][key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                print(key, json.dumps(results["real"][key]), flush=True)
            for model_id in ZOO_DETECTORS:
                try:
                    results["real"][model_id] = zoo_detector(model_id, work)
                except Exception as exc:  # noqa: BLE001 - recorded like the others
                    results["real"][model_id] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                print(model_id, json.dumps(results["real"][model_id]), flush=True)
    print(table(results))
    write_atomic(args.json, (json.dumps(results, indent=2) + "\n").encode())
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
