"""What live detection costs outside the engine call, at 640x480 on this CPU.

For each detector, on the same 640x480 MJPEG video (moving rectangles on noise, written once):
  * engine only   - ``engine.infer`` on an already preprocessed batch, repeated (the ceiling)
  * per stage     - one frame at a time, sequentially: decode (cv2 read), preprocess (letterbox,
                    normalize, layout), head decode + score filter, NMS + box mapping, JSON encoding
  * end to end    - ``enginesmith.vision.run_pipeline`` over the video (a file source: no frame is
                    dropped), JSON Lines to /dev/null; the stages overlap on threads. Engine-only and
                    end-to-end blocks alternate over --rounds; the ratio is the median of per-round ratios
Batch 1 everywhere (one camera). The baseline in the same run is the engine alone: end-to-end FPS
over engine-only FPS says how much of the engine's speed reaches the user.

Detectors:
  * nudenet 320n (YOLOv8n, 18 classes, 320x320, dynamic axes): a real detector from the PyPI package
    ``nudenet`` (fixture table below), downloaded once with ``pip download --no-deps`` into
    ~/.cache/enginesmith-vision and checked by sha256; at --conf 0.25 and 0.01 (the second makes NMS work)
  * colour-yolov8 (tests/vision_models.py, 160x160): a tiny model, so the overhead dominates

    python benchmarks/detect.py [--frames 200] [--rounds 4] [--no-real] [--json benchmarks/results/detect.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import enginesmith as es
from enginesmith import vision
from enginesmith.bench import machine_facts
from enginesmith.files import write_atomic
from enginesmith.vision.detector import select_detections
from enginesmith.vision.sinks import JsonLines
from enginesmith.vision.transform import to_tensor

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from vision_models import REAL_DETECTORS, fetch_real_detector, make_colour_yolov8  # noqa: E402

FRAME_W, FRAME_H = 640, 480


def write_video(path: Path, frames: int) -> None:
    import cv2

    scene = vision.SyntheticScene(width=FRAME_W, height=FRAME_H, frames=frames, objects=4, seed=7)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (FRAME_W, FRAME_H))
    for i in range(frames):
        writer.write(scene.render(i)[0])
    writer.release()


def ms(values: list[float]) -> dict:
    a = np.asarray(values) * 1e3
    return {"mean_ms": round(float(a.mean()), 3), "p50_ms": round(float(np.median(a)), 3),
            "p95_ms": round(float(np.percentile(a, 95)), 3)}


def measure(name: str, engine_path: Path, video: Path, frames: int, conf: float, rounds: int) -> dict:
    import cv2

    detector = vision.Detector(es.load(engine_path), vision.DetectorSettings(conf=conf, size=None))
    # engine only, on one preprocessed frame (after a warm-up)
    capture = cv2.VideoCapture(str(video))
    first = capture.read()[1]
    capture.release()
    feeds, placements = detector.preprocess([first])
    for _ in range(5):
        detector.infer(feeds)
    # per stage, sequentially
    stages: dict[str, list[float]] = {k: [] for k in ("decode", "preprocess", "head", "nms", "json")}
    detections = 0
    capture = cv2.VideoCapture(str(video))
    while True:
        t0 = time.perf_counter()
        ok, pixels = capture.read()
        if not ok:
            break
        t1 = time.perf_counter()
        tensor, place = to_tensor(pixels, detector.spec, detector.input_hw)
        batch = {detector.input_name: tensor[None]}
        t2 = time.perf_counter()
        outputs = detector.infer(batch)
        t3 = time.perf_counter()
        found = detector.head.decode(outputs, 0, detector.input_hw)
        t4 = time.perf_counter()
        kept = select_detections(found, detector.settings, place, detector.names, detector.head.first_class)
        t5 = time.perf_counter()
        json.dumps({"detections": [d.to_dict() for d in kept]})
        t6 = time.perf_counter()
        detections += len(kept)
        for key, value in zip(stages, (t1 - t0, t2 - t1, t4 - t3, t5 - t4, t6 - t5)):
            stages[key].append(value)
    capture.release()
    outside = [sum(parts) for parts in zip(*stages.values())]
    # engine only and end to end (overlapped), in alternating rounds so load from other jobs hits both alike
    per_round = max(1, frames // rounds)
    engine_times, pipeline_fps, ratios = [], [], []
    with open(os.devnull, "w") as sink_stream:
        sink = JsonLines(sink_stream)
        for _ in range(rounds):
            block = []
            for _ in range(per_round):
                start = time.perf_counter()
                detector.infer(feeds)
                block.append(time.perf_counter() - start)
            engine_times += block
            summary = vision.run_pipeline(detector, [vision.open_source(str(video))], sink.write, max_frames=per_round)
            pipeline_fps.append(summary.fps)
            ratios.append(summary.fps * float(np.median(block)))
    engine_fps = 1.0 / float(np.median(engine_times))
    return {
        "detector": name, "conf": conf, "input": list(detector.input_hw), "head": detector.head.name,
        "frames_per_round": per_round, "rounds": rounds, "detections_per_frame": round(detections / max(1, len(outside)), 2),
        "engine_only": {**ms(engine_times), "fps": round(engine_fps, 2)},
        "outside_engine": {**{k: ms(v) for k, v in stages.items()}, "total": ms(outside)},
        "end_to_end": {"fps": round(float(np.median(pipeline_fps)), 2), "fps_per_round": [round(f, 2) for f in pipeline_fps],
                       "dropped": summary.to_dict()["dropped"], "stages_last_round": summary.to_dict()["stages"]},
        # median over rounds of (pipeline FPS / engine-only FPS of the same round)
        "end_to_end_over_engine_only": round(float(np.median(ratios)), 3),
        "ratio_per_round": [round(r, 3) for r in ratios],
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'detector':24} {'conf':>5} {'engine ms':>9} {'outside ms':>10} {'decode':>7} {'prep':>6} {'head':>6} "
          f"{'nms':>6} {'json':>6} {'e2e fps':>8} {'engine fps':>10} {'ratio':>6}")
    for r in rows:
        o = r["outside_engine"]
        print(f"{r['detector']:24} {r['conf']:>5} {r['engine_only']['p50_ms']:>9.2f} {o['total']['p50_ms']:>10.2f} "
              f"{o['decode']['p50_ms']:>7.2f} {o['preprocess']['p50_ms']:>6.2f} {o['head']['p50_ms']:>6.2f} "
              f"{o['nms']['p50_ms']:>6.2f} {o['json']['p50_ms']:>6.2f} {r['end_to_end']['fps']:>8.1f} "
              f"{r['engine_only']['fps']:>10.1f} {r['end_to_end_over_engine_only']:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4, help="Alternating engine-only / pipeline rounds.")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "detect.json")
    parser.add_argument("--no-real", action="store_true", help="Skip the detector downloaded from PyPI.")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video = tmp / "scene.avi"
        write_video(video, args.frames)
        onnx.save(make_colour_yolov8(160, ["red", "green", "blue"]), tmp / "colour.onnx")
        models = [("colour-yolov8 (160, in code)", es.build(tmp / "colour.onnx", output=tmp / "colour.engine").path, 0.25)]
        if not args.no_real:
            real = fetch_real_detector("nudenet_yolov8n_320")
            engine = es.build(real, output=tmp / "nudenet.engine").path
            models += [("nudenet yolov8n (320)", engine, 0.25), ("nudenet yolov8n (320)", engine, 0.01)]
        for name, path, conf in models:
            rows.append(measure(name, path, video, args.frames, conf, args.rounds))
    print_table(rows)
    report = {"benchmark": "detect", "frame_size": [FRAME_H, FRAME_W], "batch": 1, "machine": machine_facts(),
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "fixtures": {k: vars(v) for k, v in REAL_DETECTORS.items()},
              "versions": {"enginesmith": es.__version__, "opencv": __import__("cv2").__version__,
                           "onnxruntime": __import__("onnxruntime").__version__, "numpy": np.__version__},
              "results": rows}
    write_atomic(args.json, json.dumps(report, indent=2).encode())
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
