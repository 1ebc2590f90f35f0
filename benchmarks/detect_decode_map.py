"""Does decoding JPEGs at the model's size (``enginesmith detect``'s default) cost accuracy? COCO mAP both ways.

The synthetic thermal validation scenes of benchmarks/detection (160x160, exact boxes) are enlarged 2x
(bicubic) and saved as JPEG quality 95 with their boxes doubled, so a 160-input detector shrinks them by 2:
``detect`` then decodes them at 1/2 (libjpeg's DCT scaling), ``--full-decode`` decodes them whole and
resizes (area). Each detector is scored both ways on the same images (pycocotools, --conf 0.001, IoU 0.6,
boxes mapped back to the 320x320 pictures). Detectors: the ones trained here (benchmarks/detection/models).

    python benchmarks/detect_decode_map.py [--val 300] [--json benchmarks/results/detect_decode_map.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2

import enginesmith as es
from enginesmith import vision
from enginesmith.bench import machine_facts
from enginesmith.files import write_atomic
from enginesmith.vision.decode import read_image

HERE = Path(__file__).parent
MODELS = HERE / "detection" / "models"
DETECTORS = ["ssd_mobilenet_v2_synth_raw.pb", "ssd_mobilenet_v2_synth.pb", "yolov8_synth.onnx"]


def enlarged_val_set(folder: Path, count: int) -> Path:
    """The validation scenes at 2x, as JPEGs, with their annotations; returns the annotations file."""
    subprocess.run([sys.executable, str(HERE / "detection" / "synth_data.py"), str(folder), "--train", "0",
                    "--val", str(count), "--size", "160", "--seed", "0"], check=True, capture_output=True)
    val, out = folder / "val", folder / "val2x"
    (out / "images").mkdir(parents=True)
    coco = json.loads((val / "annotations.json").read_text())
    for image in coco["images"]:
        pixels = cv2.imread(str(val / "images" / image["file_name"]), cv2.IMREAD_COLOR)
        name = Path(image["file_name"]).with_suffix(".jpg").name
        cv2.imwrite(str(out / "images" / name), cv2.resize(pixels, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        image.update(file_name=name, height=image["height"] * 2, width=image["width"] * 2)
    for box in coco["annotations"]:
        box["bbox"] = [v * 2 for v in box["bbox"]]
        box["area"] *= 4
    (out / "annotations.json").write_text(json.dumps(coco))
    return out / "annotations.json"


def score(detector: vision.Detector, annotations: Path, reduce: bool) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotations))
    by_name = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    results, reductions = [], set()
    for image in coco.loadImgs(coco.getImgIds()):
        pixels, k, full_size = read_image(annotations.parent / "images" / image["file_name"],
                                          detector.decode_reduction if reduce else None)
        reductions.add(k)
        feeds, placements = detector.preprocess([pixels])
        if k > 1:  # as the pipeline does: boxes back to the full-size picture
            placements = [p.of_full_size(k, *full_size) for p in placements]
        for d in detector.postprocess(detector.infer(feeds), placements)[0]:
            x1, y1, x2, y2 = d.box
            results.append({"image_id": image["id"], "category_id": by_name.get(d.label, d.class_id),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d.score})
    with contextlib.redirect_stdout(io.StringIO()):
        run = COCOeval(coco, coco.loadRes(results), "bbox")
        run.evaluate()
        run.accumulate()
        run.summarize()
    return {"map": round(float(run.stats[0]) * 100, 2), "map50": round(float(run.stats[1]) * 100, 2),
            "decoded_at": sorted(reductions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val", type=int, default=300, help="validation scenes")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "detect_decode_map.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        annotations = enlarged_val_set(Path(tmp), args.val)
        for name in DETECTORS:
            detector = vision.Detector(es.build(MODELS / name, verify=False), vision.DetectorSettings(conf=0.001, iou=0.6))
            full, reduced = score(detector, annotations, False), score(detector, annotations, True)
            rows.append({"detector": name, "full_decode": full, "reduced_decode": reduced,
                         "map_change_points": round(reduced["map"] - full["map"], 2)})
            print(f"{name:32} full: mAP {full['map']:6.2f} (.5: {full['map50']:6.2f})   decoded at 1/{reduced['decoded_at'][-1]}: "
                  f"mAP {reduced['map']:6.2f} (.5: {reduced['map50']:6.2f})   change {rows[-1]['map_change_points']:+.2f}", flush=True)
    report = {"benchmark": "detect_decode_map", "machine": machine_facts(), "val_images": args.val, "results": rows}
    write_atomic(args.json, json.dumps(report, indent=2).encode())
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
