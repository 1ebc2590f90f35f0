"""What live detection costs outside the engine call at 640x480, and how much of the engine's speed reaches the user.

CPU mode (the default), three parts:
  * decoders   - ms per 640x480 frame for each kind of source, on the same moving-rectangles-on-noise
                 scene (noise is a codec's worst case: real footage decodes faster): the synthetic
                 source (a raw frame made in memory), a camera's raw YUYV converted to BGR, an MJPEG .avi,
                 an MPEG-4 part 2 .mp4, an H.264 .mp4 (written with PyAV when it is installed), a folder
                 of JPEGs; read with OpenCV (default threads, and cv2.setNumThreads(1)) and, for the
                 videos, PyAV with frame threading when it is installed; then the same kinds of file for a
                 slow pan across a real photograph shipped in an installed package (scikit-learn's china.jpg,
                 else matplotlib's grace_hopper.jpg; recorded with its sha256): camera-like footage
  * per stage  - one frame at a time, sequentially, per detector: preprocessing (letterbox, normalize,
                 layout, into a reused batch buffer), head decode with the score floor, NMS + boxes to
                 frame pixels, the JSON Lines record; "outside the engine" per source kind is the
                 source's decode plus these. JPEG folders and MJPEG videos are read as the pipeline reads
                 them for each detector: decoded at 1/2, 1/4 or 1/8 where the model shrinks the frames that
                 much (then their own decode and preprocessing times count)
  * end to end - ``vision.run_pipeline`` over the synthetic source and over the MJPEG video (files: no
                 frame dropped), JSON Lines to /dev/null, the stages overlapping on threads. Engine-only
                 blocks (``engine.infer`` on a preprocessed batch) and pipeline blocks alternate over
                 --rounds; the ratio is the median of per-round ratios (pipeline FPS / engine-only FPS)
Batch 1 (one camera). Detectors: nudenet 320n (a real YOLOv8n, 18 classes, 320x320, from the PyPI wheel
``nudenet``, sha256-checked, cached) at --conf 0.25 and 0.01 (the second makes NMS work), and the colour
YOLOv8-layout detector of tests/vision_models.py at 160 and 640.

Device mode (``--device cuda``, the GPU machine; scripts/gpu_detect.sh): the detector (--model: an engine,
or an ONNX / TensorFlow frozen-graph detector built here with ``--backend torch --precision fp16``; default
the nudenet YOLOv8n and the colour detector at 640) on 640x480 synthetic frames with pre- and
post-processing on the GPU: per-frame latency at batch 1 (``detector([frame])``, p50), engine-only
latency, pipeline FPS with one source and with 4 sources batched (4 frames per engine call), and the
ratio of the two. ``--dry-run`` runs the same on this CPU (fp32, eager, few frames).

    python benchmarks/detect.py [--frames 200] [--rounds 4] [--no-real] [--json benchmarks/results/detect.json]
    python benchmarks/detect.py --device cuda [--model M.engine|M.onnx|M.pb ...] [--json ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

import enginesmith as es
from enginesmith import vision
from enginesmith.bench import machine_facts
from enginesmith.files import write_atomic
from enginesmith.vision.detector import select_detections
from enginesmith.vision.sinks import JsonLines
from enginesmith.vision.records import Frame
from enginesmith.vision.sources import Source, Synthetic

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from vision_models import REAL_DETECTORS, fetch_real_detector, make_colour_yolov8  # noqa: E402

FRAME_W, FRAME_H = 640, 480
SCENE = vision.SyntheticScene(width=FRAME_W, height=FRAME_H, frames=100_000, objects=4, seed=7)
OUTSIDE_BUDGET_MS = 2.0
RATIO_TARGET = 0.9


def colour_yolov8_batch(size: int, batch: int | str) -> onnx.ModelProto:
    """tests/vision_models.py's colour detector with another batch: a fixed number, or a symbolic name (dynamic)."""
    model = make_colour_yolov8(size, ["red", "green", "blue"])
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name.startswith("shape"):  # the Reshape targets [1, 4 + C, cells]
            target = numpy_helper.to_array(tensor).copy()
            target[0] = -1 if isinstance(batch, str) else batch
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(target, tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if isinstance(batch, str):
            dim.dim_param = batch
        else:
            dim.dim_value = batch
    onnx.checker.check_model(model)
    return model


def ms(values: list[float]) -> dict:
    a = np.asarray(values) * 1e3
    return {"mean_ms": round(float(a.mean()), 3), "p50_ms": round(float(np.median(a)), 3),
            "p95_ms": round(float(np.percentile(a, 95)), 3)}


# --------------------------------------------------------------------------- decoders


# Real photographs shipped inside installed packages, for camera-like content: (package, member, license).
PHOTOS = (("scikit-learn", "sklearn/datasets/images/china.jpg", "CC BY 2.0 (see sklearn.datasets.load_sample_images)"),
          ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg", "public domain (US Navy photograph)"))
PHOTO_SUFFIX = " (photo pan)"


def find_photo() -> dict | None:
    """The first of PHOTOS installed here: where it lies and what it is (sha256 recorded)."""
    import hashlib
    import importlib.metadata
    import sysconfig

    for package, member, license_text in PHOTOS:
        path = Path(sysconfig.get_paths()["purelib"]) / member
        if path.is_file():
            return {"package": package, "version": importlib.metadata.version(package), "member": member,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "license": license_text, "path": str(path)}
    return None


def photo_pan(photo: Path, frames: int) -> list[np.ndarray]:
    """640x480 windows panning slowly across a photograph enlarged to 2x the frame: footage a codec meets
    from a camera that moves (smooth areas, edges, small motion), unlike the noise scene's worst case."""
    import cv2

    big = cv2.resize(cv2.imread(str(photo)), (2 * FRAME_W, 2 * FRAME_H), interpolation=cv2.INTER_CUBIC)
    room_y, room_x = big.shape[0] - FRAME_H, big.shape[1] - FRAME_W
    pictures = []
    for i in range(frames):
        y, x = (2 * i) % (2 * room_y), (3 * i) % (2 * room_x)
        y, x = (2 * room_y - y if y > room_y else y), (2 * room_x - x if x > room_x else x)
        pictures.append(np.ascontiguousarray(big[y : y + FRAME_H, x : x + FRAME_W]))
    return pictures


def write_inputs(folder: Path, frames: int) -> dict[str, Path]:
    """The scene as every kind of file source (H.264 only where PyAV can write it), and the same kinds of
    file for a pan over a real photograph where one is installed (keys ending in PHOTO_SUFFIX)."""
    paths = write_media(folder, [SCENE.render(i)[0] for i in range(frames)], "")
    photo = find_photo()
    if photo is not None:
        paths.update(write_media(folder, photo_pan(Path(photo["path"]), frames), PHOTO_SUFFIX))
    return paths


def write_media(folder: Path, pictures: list[np.ndarray], suffix: str) -> dict[str, Path]:
    import cv2

    folder = folder / ("photo" if suffix else "scene")
    folder.mkdir()
    paths = {}
    for kind, name, fourcc in (("MJPEG .avi", "scene.avi", "MJPG"), ("MPEG-4 .mp4", "scene.mp4", "mp4v")):
        writer = cv2.VideoWriter(str(folder / name), cv2.VideoWriter_fourcc(*fourcc), 30, (FRAME_W, FRAME_H))
        for picture in pictures:
            writer.write(picture)
        writer.release()
        paths[kind + suffix] = folder / name
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        with av.open(str(folder / "scene_h264.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = FRAME_W, FRAME_H, "yuv420p"
            for picture in pictures:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="bgr24")))
            container.mux(stream.encode())
        paths["H.264 .mp4" + suffix] = folder / "scene_h264.mp4"
    (folder / "jpegs").mkdir()
    for i, picture in enumerate(pictures):
        cv2.imwrite(str(folder / "jpegs" / f"{i:05d}.jpg"), picture)
    paths["JPEG folder" + suffix] = folder / "jpegs"
    return paths


def timed(frames: Iterator) -> list[float]:
    times = []
    while True:
        start = time.perf_counter()
        if next(frames, None) is None:
            return times
        times.append(time.perf_counter() - start)


@contextmanager
def cv2_threads(count: int | None) -> Iterator[None]:
    import cv2

    before = cv2.getNumThreads()
    if count is not None:
        cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def pyav_frames(path: Path, size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    import av

    scaled = {"width": size[0], "height": size[1]} if size else {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="bgr24", **scaled)


def _has_simplejpeg() -> bool:
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        return False
    return True


def simplejpeg_frames(folder: Path, reduction: int) -> Iterator:
    import simplejpeg

    for path in sorted(folder.glob("*.jpg")):
        yield simplejpeg.decode_jpeg(path.read_bytes(), colorspace="BGR", fastdct=True, fastupsample=True,
                                     min_height=FRAME_H // reduction, min_width=FRAME_W // reduction)


def measure_decoders(paths: dict[str, Path], frames: int) -> list[dict]:
    import cv2

    yuyv = cv2.cvtColor(SCENE.render(0)[0], cv2.COLOR_BGR2YUV_YUY2) if hasattr(cv2, "COLOR_BGR2YUV_YUY2") else None
    rows = []

    def add(kind: str, reader: str, make: Callable[[], Iterator]) -> None:
        times = timed(iter(make()))
        rows.append({"source": kind, "reader": reader, "frames": len(times), **ms(times)})

    add("synthetic (raw, in memory)", "SyntheticScene.render", lambda: (SCENE.render(i)[0] for i in range(frames)))
    if yuyv is not None:
        add("camera raw YUYV", "cv2.cvtColor YUV2BGR_YUYV", lambda: (cv2.cvtColor(yuyv, cv2.COLOR_YUV2BGR_YUYV) for _ in range(frames)))
    for kind, path in paths.items():
        for threads in (None, 1):
            label = "default threads" if threads is None else f"cv2.setNumThreads({threads})"
            with cv2_threads(threads):
                source = vision.open_source(str(path))
                add(kind, f"enginesmith source (OpenCV, {label})", lambda: (f.pixels for f in source.frames()))
                source.close()
        if kind.startswith("JPEG folder") and _has_simplejpeg():
            # Another libjpeg-turbo binding, with its fast (less exact) IDCT and upsampling: whether the decoder
            # choice matters where a frame's entropy decoding (noise: ~180 KB a frame) is most of the cost.
            add(kind, "simplejpeg, fastdct, at 1/2 (reference only)", lambda: simplejpeg_frames(path, 2))
            add(kind, "simplejpeg, fastdct, full size (reference only)", lambda: simplejpeg_frames(path, 1))
        if not kind.startswith("JPEG folder") and _has_pyav():
            add(kind, "PyAV, frame threading", lambda: pyav_frames(path))
            add(kind, "PyAV, frame threading, scaled to 320x240 (reference only)", lambda: pyav_frames(path, (320, 240)))
    # (JPEG folders and MJPEG videos decoded at a model's reduced size are timed per detector: see reduced_decoding.)
    return rows


def reduced_decoding(detector: vision.Detector, media: Path, frames: int) -> dict | None:
    """A JPEG folder or MJPEG video as the pipeline reads it for ``detector`` (decoded at 1/k where the model shrinks
    the frames by k or more): decode and preprocessing p50 per frame; None when this model gets them at full size."""
    source, decode = vision.open_source(str(media), reduction=detector.decode_reduction), []
    try:
        pictures = list(itertools.islice(iter_timed(source.frames(), decode), frames))
    finally:
        source.close()
    if not pictures or pictures[0].reduction == 1:
        return None
    buffer, preprocess = detector.batch_buffer(1), []
    for frame in pictures:
        start = time.perf_counter()
        detector.preprocess([frame.pixels], out=buffer)
        preprocess.append(time.perf_counter() - start)
    return {"reduction": pictures[0].reduction, "decode": ms(decode), "preprocess": ms(preprocess)}


def iter_timed(frames: Iterator, into: list[float]) -> Iterator:
    """``frames``, with the seconds each took to come appended to ``into``."""
    while True:
        start = time.perf_counter()
        item = next(frames, None)
        if item is None:
            return
        into.append(time.perf_counter() - start)
        yield item


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- per stage, end to end


def per_stage(detector: vision.Detector, frames: int) -> dict:
    """Preprocess, head, NMS and JSON per frame, one frame at a time, after a warm-up."""
    stages: dict[str, list[float]] = {k: [] for k in ("preprocess", "head", "nms", "json")}
    buffer = detector.batch_buffer(1)
    detections = 0
    line = []
    for i in range(frames):
        pixels = SCENE.render(i)[0]
        t0 = time.perf_counter()
        feeds, placements = detector.preprocess([pixels], out=buffer)
        t1 = time.perf_counter()
        outputs = detector.infer(feeds)
        t2 = time.perf_counter()
        found = detector.head.decode(outputs, 0, detector.input_hw, detector.settings.conf)
        t3 = time.perf_counter()
        kept = select_detections(found, detector.settings, placements[0], detector.names, detector.head.first_class)
        t4 = time.perf_counter()
        record = vision.FrameResult(i, "synthetic", i, time.time(), pixels.shape[:2], kept, vision.StageTimes())
        line.append(json.dumps(record.to_dict(), separators=(",", ":")))  # as JsonLines writes it
        t5 = time.perf_counter()
        detections += len(kept)
        for key, value in zip(stages, (t1 - t0, t3 - t2, t4 - t3, t5 - t4)):
            stages[key].append(value)
    summary = {k: ms(v[len(v) // 10:]) for k, v in stages.items()}
    summary["detections_per_frame"] = round(detections / frames, 2)
    return summary


def alternate(detector: vision.Detector, source_factory: Callable[[int], list], frames: int, rounds: int, batch: int = 1) -> dict:
    """Engine-only and pipeline blocks in turn, so load from other jobs hits both alike."""
    pixels = SCENE.render(0)[0]
    feeds, _ = detector.preprocess([pixels] * batch)
    for _ in range(5):
        detector.infer(feeds)
    per_round = max(1, frames // rounds)
    engine_times, pipeline_fps, ratios, stages = [], [], [], None
    with open(os.devnull, "w") as devnull:
        sink = JsonLines(devnull)
        for _ in range(rounds):
            block = []
            for _ in range(max(1, per_round // batch)):
                start = time.perf_counter()
                detector.infer(feeds)
                block.append(time.perf_counter() - start)
            engine_times += block
            summary = vision.run_pipeline(detector, source_factory(per_round), sink.write, max_frames=per_round)
            pipeline_fps.append(summary.fps)
            ratios.append(summary.fps * float(np.median(block)) / batch)
            stages = summary.to_dict()
    engine_fps = batch / float(np.median(engine_times))
    return {"frames_per_round": per_round, "rounds": rounds, "batch": batch,
            "engine_only": {**ms(engine_times), "fps": round(engine_fps, 2)},
            "pipeline_fps": round(float(np.median(pipeline_fps)), 2), "pipeline_fps_per_round": [round(f, 2) for f in pipeline_fps],
            "ratio": round(float(np.median(ratios)), 3), "ratio_per_round": [round(r, 3) for r in ratios],
            "dropped_last_round": stages["dropped"], "stages_last_round": stages["stages"]}


class CameraLike(Source):
    """Frames drawn once and handed out again, as a camera driver hands out its buffers: capture that costs next
    to nothing on the CPU (the synthetic source draws every frame in Python, which bounds a multi-source run)."""

    def __init__(self, name: str, pictures: list[np.ndarray], frames: int):
        super().__init__()
        self.name, self.pictures, self.count = name, pictures, frames

    def frames(self) -> Iterator[Frame]:
        for index in range(self.count):
            yield Frame(self.name, index, time.time(), self.pictures[index % len(self.pictures)], None)


def camera_like_sources(count: int, pictures: list[np.ndarray]) -> Callable[[int], list]:
    return lambda frames: [CameraLike(f"camera{i}", pictures[i:] + pictures[:i], frames) for i in range(count)]


def synthetic_sources(count: int = 1) -> Callable[[int], list]:
    def make(frames: int) -> list:
        return [Synthetic(f"synthetic{i}", vision.SyntheticScene(width=FRAME_W, height=FRAME_H, frames=frames, objects=4, seed=7 + i))
                for i in range(count)]
    return make


def measure_cpu(name: str, engine: es.Engine, conf: float, paths: dict[str, Path], decoders: list[dict], frames: int,
                rounds: int, size: tuple[int, int] | None = None) -> dict:
    detector = vision.Detector(engine, vision.DetectorSettings(conf=conf, size=size))
    stages = per_stage(detector, min(frames, 200))
    rest = sum(stages[k]["p50_ms"] for k in ("preprocess", "head", "nms", "json"))
    fastest = {}
    for row in decoders:
        if "reference only" in row["reader"]:
            continue
        if row["source"] not in fastest or row["p50_ms"] < fastest[row["source"]]["p50_ms"]:
            fastest[row["source"]] = row
    outside = {kind: {"decode_ms": row["p50_ms"], "reader": row["reader"], "total_ms": round(row["p50_ms"] + rest, 3),
                      "within_budget": row["p50_ms"] + rest <= OUTSIDE_BUDGET_MS}
               for kind, row in fastest.items()}
    for kind in [k for k in outside if k.startswith(("JPEG folder", "MJPEG"))]:
        reduced = reduced_decoding(detector, paths[kind], frames)
        if reduced is not None:  # what the pipeline does for this model: decode smaller, preprocess less
            total = reduced["decode"]["p50_ms"] + reduced["preprocess"]["p50_ms"] + rest - stages["preprocess"]["p50_ms"]
            outside[kind] = {"decode_ms": reduced["decode"]["p50_ms"], "preprocess_ms": reduced["preprocess"]["p50_ms"],
                             "reader": f"enginesmith source, decoded at 1/{reduced['reduction']}",
                             "full_size_decode_ms": outside[kind]["decode_ms"], "total_ms": round(total, 3),
                             "within_budget": total <= OUTSIDE_BUDGET_MS}
    synthetic = alternate(detector, synthetic_sources(), frames, rounds)
    # as `enginesmith detect` reads it (JPEG packets decoded at the model's size where it shrinks them)
    mjpeg = alternate(detector, lambda n: [vision.open_source(str(paths["MJPEG .avi"]), reduction=detector.decode_reduction)],
                      frames, rounds)
    return {"detector": name, "conf": conf, "input": list(detector.input_hw), "head": detector.head.name,
            "stages_p50_excluding_decode": stages, "outside_engine_per_source": outside,
            "end_to_end_synthetic": synthetic, "end_to_end_mjpeg": mjpeg}


def print_cpu(decoders: list[dict], rows: list[dict]) -> None:
    print(f"\n{'source':28} {'reader':50} {'p50 ms':>7} {'mean ms':>8}")
    for d in decoders:
        print(f"{d['source']:28} {d['reader']:50} {d['p50_ms']:>7.2f} {d['mean_ms']:>8.2f}")
    print(f"\n{'detector':26} {'conf':>5} {'prep':>6} {'head':>6} {'nms':>6} {'json':>6} | outside ms: "
          f"{'synth':>6} {'yuyv':>6} {'mjpeg':>6} {'mp4v':>6} {'h264':>6} {'jpeg':>6}")
    keys = ["synthetic (raw, in memory)", "camera raw YUYV", "MJPEG .avi", "MPEG-4 .mp4", "H.264 .mp4", "JPEG folder"]
    for r in rows:
        s, o = r["stages_p50_excluding_decode"], r["outside_engine_per_source"]
        for content, suffix in (("noise scene", ""), ("photo pan", PHOTO_SUFFIX)):
            cells = " ".join(f"{o[k + suffix]['total_ms']:>6.2f}" if k + suffix in o else f"{'-':>6}" for k in keys)
            if suffix and all(k + suffix not in o for k in keys):
                continue
            print(f"{r['detector']:26} {r['conf']:>5} {s['preprocess']['p50_ms']:>6.2f} {s['head']['p50_ms']:>6.2f} "
                  f"{s['nms']['p50_ms']:>6.2f} {s['json']['p50_ms']:>6.2f} | {content:11} {cells}")
    print(f"\n{'detector':26} {'conf':>5} {'engine ms':>9} {'engine fps':>10} {'e2e synth':>9} {'ratio':>6} {'e2e mjpeg':>9} {'ratio':>6}")
    for r in rows:
        a, b = r["end_to_end_synthetic"], r["end_to_end_mjpeg"]
        print(f"{r['detector']:26} {r['conf']:>5} {a['engine_only']['p50_ms']:>9.2f} {a['engine_only']['fps']:>10.1f} "
              f"{a['pipeline_fps']:>9.1f} {a['ratio']:>6.2f} {b['pipeline_fps']:>9.1f} {b['ratio']:>6.2f}")


def run_cpu(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_inputs(tmp, args.frames)
        decoders = measure_decoders(paths, args.frames)
        models = []
        for size in (160, 640):
            onnx.save(make_colour_yolov8(size, ["red", "green", "blue"]), tmp / f"colour{size}.onnx")
            models.append((f"colour-yolov8 ({size}, in code)", es.build(tmp / f"colour{size}.onnx"), 0.25, None))
        if not args.no_real:
            # Its image dims are dynamic: without a size the detector would run it at 640 (earlier runs did).
            engine = es.build(fetch_real_detector("nudenet_yolov8n_320"))
            models += [("nudenet yolov8n (320)", engine, 0.25, (320, 320)), ("nudenet yolov8n (320)", engine, 0.01, (320, 320))]
        rows = [measure_cpu(name, engine, conf, paths, decoders, args.frames, args.rounds, size)
                for name, engine, conf, size in models]
    print_cpu(decoders, rows)
    photo = find_photo()
    return {"decoders": decoders, "results": rows, "photo": {k: v for k, v in photo.items() if k != "path"} if photo else None,
            "targets": {"outside_engine_ms": OUTSIDE_BUDGET_MS, "end_to_end_over_engine_only": RATIO_TARGET}}


# --------------------------------------------------------------------------- device mode


def skip(skipped: list[dict], model: str, exc: BaseException) -> None:
    """One line and one JSON record for a model that could not be built or measured; the others go on."""
    error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    print(f"{model} skipped: {error}", flush=True)
    skipped.append({"model": model, "error": error})


def batch_one_input(model: Path) -> str | None:
    """The image input's name when the ONNX file fixes its batch at 1; None otherwise, and for a file that cannot be
    read as ONNX (the build then says why)."""
    try:
        image = onnx.load(str(model), load_external_data=False).graph.input[0]
    except Exception:  # noqa: BLE001 - not ONNX (or unreadable): es.build reports it
        return None
    dims = image.type.tensor_type.shape.dim
    return image.name if dims and dims[0].dim_value == 1 else None


def device_engines(models: list[Path] | None, device: str, sources: int, dry_run: bool, mode: str,
                   workdir: Path, skipped: list[dict]) -> list[tuple[str, es.Engine, es.Engine]]:
    """(name, engine for one source, engine for ``sources`` batched) to measure: given engines loaded as they are,
    given ONNX / frozen graphs built for the device, or the defaults: the colour detector at 640 with a dynamic
    batch (batches 1 and N compiled) and the nudenet YOLOv8n, whose export needs fixed shapes (one engine each).
    A model that fails to load or build is added to ``skipped``."""
    precision = "fp32" if dry_run else "fp16"

    def build(path: Path, batches: list[int] | None = None, shape: tuple[int, ...] | None = None,
              imports: es.ImportOptions | None = None) -> es.Engine:
        options = {"device": device, **({"compile": "eager"} if dry_run else {"mode": mode}),
                   **({"batches": batches} if batches else {})}
        imports = imports or (es.ImportOptions(input_shapes={"images": shape}) if shape else None)
        return es.build(path, backend="torch", precision=precision, backend_options=options, import_options=imports)

    engines = []
    for model in models or []:
        try:
            if model.suffix == ".engine":
                engine = es.load(model, trust_code=True)
                engines.append((model.name, engine, engine))
                continue
            image = batch_one_input(model)
            if image is not None:
                # Exported with its batch fixed at 1 (TF OD API, ultralytics' default): N sources would run as N
                # calls, so the batch axis is made dynamic (checked item by item against the original).
                name = f"{model.name} (batch made dynamic) torch {precision}"
                engine = build(model, batches=[1, sources], imports=es.ImportOptions(dynamic_axes={image: [0]}))
            else:
                name, engine = f"{model.name} torch {precision}", build(model, batches=[1, sources])
            engines.append((name, engine, engine))
        except Exception as exc:  # noqa: BLE001 - one model that cannot be built must not end the run
            skip(skipped, model.name, exc)
    if models:
        return engines
    size = 160 if dry_run else 640
    onnx.save(colour_yolov8_batch(size, "batch"), workdir / "colour.onnx")
    colour = build(workdir / "colour.onnx", batches=[1, sources])
    engines.append((f"colour-yolov8 ({size}) torch {precision}", colour, colour))
    try:
        real = fetch_real_detector("nudenet_yolov8n_320")
        engines.append((f"nudenet yolov8n (320) torch {precision}", build(real, shape=(1, 3, 320, 320)),
                        build(real, shape=(sources, 3, 320, 320))))
    except Exception as exc:  # noqa: BLE001 - no cached copy and no registry, or no build: measure what there is
        skip(skipped, "nudenet", exc)
    return engines


def measure_device(name: str, engine: es.Engine, batched_engine: es.Engine, frames: int, sources: int) -> dict:
    detector = vision.Detector(engine, vision.DetectorSettings(conf=0.25, on_device=True))
    batched = vision.Detector(batched_engine, vision.DetectorSettings(conf=0.25, on_device=True))
    pictures = [SCENE.render(i)[0] for i in range(8)]
    latency, engine_only = [], []
    feeds, _ = detector.preprocess(pictures[:1])
    for i in range(frames + 10):
        start = time.perf_counter()
        detector([pictures[i % len(pictures)]])  # preprocess, infer, postprocess: boxes on the host
        latency.append(time.perf_counter() - start)
        start = time.perf_counter()
        detector.device_ops.to_host(next(iter(detector.infer(feeds).values())))  # the engine call, synchronized
        engine_only.append(time.perf_counter() - start)
    record = {"detector": name, "backend": engine.backend, "precision": engine.precision, "device": detector.device_ops.device,
              "input": list(detector.input_hw), "head": detector.head.name,
              "latency_batch1": ms(latency[10:]), "engine_only_batch1": ms(engine_only[10:])}
    # The stages of one batched call apart (each synchronized): where the time of N sources goes.
    group = [pictures[i % len(pictures)] for i in range(sources)]
    many_feeds, _ = batched.preprocess(group)
    stages: dict[str, list[float]] = {"preprocess": [], "engine": [], "whole": []}
    for i in range(frames // 2 + 10):
        start = time.perf_counter()
        batched.preprocess(group)  # returns once the batch is on the device
        stages["preprocess"].append(time.perf_counter() - start)
        start = time.perf_counter()
        batched.device_ops.to_host(next(iter(batched.infer(many_feeds).values())))
        stages["engine"].append(time.perf_counter() - start)
        start = time.perf_counter()
        batched(group)
        stages["whole"].append(time.perf_counter() - start)
    record[f"batch{sources}_alone"] = {stage: ms(values[10:]) for stage, values in stages.items()}
    with open(os.devnull, "w") as devnull:
        sink = JsonLines(devnull)
        for kind, make in (("", synthetic_sources), ("_camera_like", lambda n: camera_like_sources(n, pictures))):
            for count, runner in ((1, detector), (sources, batched)):
                vision.run_pipeline(runner, make(count)(20), sink.write)  # warm this batch size
                summary = vision.run_pipeline(runner, make(count)(frames), sink.write)
                record[f"pipeline_{count}_sources{kind}"] = {"fps": round(summary.fps, 1), "batches": summary.batches,
                                                             "stages": summary.to_dict()["stages"]}
    single, many = record["pipeline_1_sources"]["fps"], record[f"pipeline_{sources}_sources"]["fps"]
    record["batched_over_single"] = round(many / single, 2) if single else None
    single, many = record["pipeline_1_sources_camera_like"]["fps"], record[f"pipeline_{sources}_sources_camera_like"]["fps"]
    record["batched_over_single_camera_like"] = round(many / single, 2) if single else None
    record["met"] = {"latency_p50_within_3ms": record["latency_batch1"]["p50_ms"] <= 3.0,
                     f"{sources}_sources_at_least_3x": (record["batched_over_single"] or 0) >= 3.0,
                     f"{sources}_camera_like_sources_at_least_3x": (record["batched_over_single_camera_like"] or 0) >= 3.0}
    return record


def run_device(args: argparse.Namespace) -> dict:
    device = "cpu" if args.dry_run else args.device
    frames = min(args.frames, 40) if args.dry_run else args.frames
    rows: list[dict] = []
    skipped: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, engine, batched in device_engines(args.model, device, args.sources, args.dry_run, args.mode, Path(tmp),
                                                    skipped):
            try:
                r = measure_device(name, engine, batched, frames, args.sources)
            except Exception as exc:  # noqa: BLE001 - e.g. an engine that is no detector: measure the others
                skip(skipped, name, exc)
                continue
            rows.append(r)
            print(f"{name:40} latency p50 {r['latency_batch1']['p50_ms']:.2f} ms (engine {r['engine_only_batch1']['p50_ms']:.2f})  "
                  f"1 source {r['pipeline_1_sources']['fps']:.1f} FPS  {args.sources} sources "
                  f"{r[f'pipeline_{args.sources}_sources']['fps']:.1f} FPS ({r['batched_over_single']}x); camera-like sources "
                  f"{r['batched_over_single_camera_like']}x", flush=True)
    return {"device": device, "dry_run": args.dry_run, "sources": args.sources, "compile_mode": args.mode, "results": rows,
            "skipped": skipped, "targets": {"latency_batch1_p50_ms": 3.0, "batched_over_single": 3.0}}


def _version(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except ImportError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4, help="Alternating engine-only / pipeline rounds.")
    parser.add_argument("--json", type=Path, default=None, help="Default: benchmarks/results/detect.json (CPU) or detect_DEVICE.json.")
    parser.add_argument("--no-real", action="store_true", help="Skip the detector downloaded from PyPI.")
    parser.add_argument("--device", default="cpu", help="cpu (the CPU report) or cuda / cuda:N (device mode).")
    parser.add_argument("--model", type=Path, action="append", help="Device mode: an engine, ONNX or frozen-graph detector (repeatable).")
    parser.add_argument("--sources", type=int, default=4, help="Device mode: sources batched into one engine call.")
    parser.add_argument("--dry-run", action="store_true", help="Device mode on this CPU: fp32, eager, few frames.")
    parser.add_argument("--mode", default="reduce-overhead",
                        help="Device mode: torch.compile mode of the engines (reduce-overhead: CUDA graphs, builds of "
                             "seconds; max-autotune takes minutes per batch size).")
    args = parser.parse_args()
    load_before = os.getloadavg()
    device_mode = args.device != "cpu" or args.dry_run
    report = run_device(args) if device_mode else run_cpu(args)
    report = {"benchmark": "detect", "mode": "device" if device_mode else "cpu", "frame_size": [FRAME_H, FRAME_W],
              "machine": machine_facts(), "load_average": {"before": load_before, "after": os.getloadavg()},
              "fixtures": {k: vars(v) for k, v in REAL_DETECTORS.items()},
              "versions": {name: _version(name) for name in ("enginesmith", "cv2", "onnxruntime", "numpy", "torch", "torchvision", "av")},
              **report}
    target = args.json or Path(__file__).parent / "results" / ("detect.json" if not device_mode else
                                                               f"detect_{'dry_run' if args.dry_run else args.device.replace(':', '')}.json")
    write_atomic(target, json.dumps(report, indent=2).encode())
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
