"""Where the time of N batched sources goes on the GPU machine (issue 16: 4 sources gave 1.2x one source).

One device-mode detector (``--model``, default the trained SSD without in-graph NMS) built with the torch backend,
batches 1 and N compiled. Measured, each on fresh threads as the pipeline makes them:
  * the engine alone at batch 1 and N, on the main thread and on a new thread (CUDA graph trees are per
    thread: a new thread records its graphs again), first calls listed;
  * ``run_pipeline`` with 1 and N sources under variants: as shipped; the upload as it was before (a
    synchronous copy on the compute stream); capture made cheap (frames rendered once, handed out again);
    a 0.2 ms GIL switch interval. The inference and preprocess stages record wall and thread CPU time per
    call: wall far above CPU is waiting (the GIL, a device sync), not work.
Writes $OUT/detect_probe.json (or --json) and prints a table.

    python scripts/gpu_detect_probe.py [--model M.onnx] [--sources 4] [--frames 400] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import enginesmith as es  # noqa: E402
from enginesmith import vision  # noqa: E402
from enginesmith.vision.sinks import JsonLines  # noqa: E402

from detect import SCENE, CameraLike, ms, synthetic_sources  # noqa: E402


def old_upload(ops, frames):
    """TorchDeviceOps._upload before the copy stream: a synchronous copy on the compute stream."""
    torch = ops._torch
    if ops._device.type != "cuda":
        return type(ops)._upload(ops, frames)
    groups: dict[tuple, list[int]] = {}
    for row, frame in enumerate(frames):
        groups.setdefault(frame.shape, []).append(row)
    uploaded = []
    buffers = ops._local.__dict__.setdefault("old_pinned", {})
    for shape, rows in groups.items():
        key = (len(rows), *shape)
        staging = buffers.get(key)
        if staging is None:
            staging = buffers[key] = torch.empty(key, dtype=torch.uint8, pin_memory=True)
        host = staging.numpy()
        for slot, row in enumerate(rows):
            np.copyto(host[slot], frames[row], casting="no")
        on_device = staging.to(ops._device)
        uploaded.append((rows, on_device.reshape(len(rows), shape[0], shape[1], -1).permute(0, 3, 1, 2).float()))
    return uploaded


class Timed:
    """Wraps a detector method: wall and this thread's CPU seconds per call."""

    def __init__(self, detector: vision.Detector, name: str):
        self.detector, self.name, self.original = detector, name, getattr(detector, name)
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.wall.append(time.perf_counter() - wall)
            self.cpu.append(time.thread_time() - cpu)

    def __enter__(self) -> "Timed":
        setattr(self.detector, self.name, self)
        return self

    def __exit__(self, *exc) -> None:
        delattr(self.detector, self.name)  # the instance attribute goes; the class's method shows again

    def summary(self, skip: int) -> dict:
        return {"wall": ms(self.wall[skip:] or self.wall), "cpu": ms(self.cpu[skip:] or self.cpu), "calls": len(self.wall)}


def engine_calls(detector: vision.Detector, pictures: list[np.ndarray], calls: int) -> dict:
    feeds, _ = detector.preprocess(pictures)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        detector.device_ops.to_host(next(iter(detector.infer(feeds).values())))
        times.append(time.perf_counter() - start)
    return {"first_ms": [round(t * 1e3, 2) for t in times[:5]], "steady": ms(times[10:])}


def on_new_thread(work: Callable[[], dict]) -> dict:
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(work()))
    thread.start()
    thread.join()
    return box


def pipeline(detector: vision.Detector, sources: Callable[[int], list], frames: int) -> dict:
    with open(os.devnull, "w") as devnull:
        sink = JsonLines(devnull)
        vision.run_pipeline(detector, sources(24), sink.write)
        with Timed(detector, "infer") as infer, Timed(detector, "preprocess") as pre:
            summary = vision.run_pipeline(detector, sources(frames), sink.write)
    skip = 8  # a new thread's first calls record CUDA graphs again
    return {"fps": round(summary.fps, 1), "batches": summary.batches, "infer": infer.summary(skip),
            "preprocess": pre.summary(skip), "stages": summary.to_dict()["stages"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".gpu_detect" / "models" / "ssd_mobilenet_v2_synth_raw.onnx")
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mode", default="reduce-overhead")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "detect_probe.json")
    args = parser.parse_args()
    n = args.sources
    started = time.perf_counter()
    options = {"device": args.device, "batches": [1, n], **({"mode": args.mode} if args.device != "cpu" else {"compile": "eager"})}
    image = onnx.load(str(args.model), load_external_data=False).graph.input[0]
    fixed_one = image.type.tensor_type.shape.dim[0].dim_value == 1  # then the batch axis is made dynamic
    engine = es.build(args.model, backend="torch", precision="fp16" if args.device != "cpu" else "fp32",
                      backend_options=options,
                      import_options=es.ImportOptions(dynamic_axes={image.name: [0]}) if fixed_one else None)
    print(f"built {args.model.name} in {time.perf_counter() - started:.1f} s; engine batch {engine.max_batch or 'dynamic'}"
          + (" (made dynamic)" if fixed_one else ""), flush=True)
    detector = vision.Detector(engine, vision.DetectorSettings(conf=0.25, on_device=True))
    pictures = [SCENE.render(i)[0] for i in range(8)]
    report: dict = {"model": args.model.name, "engine_batch": engine.max_batch, "made_dynamic": fixed_one, "sources": n, "frames": args.frames, "device": args.device,
                    "switch_interval_s": sys.getswitchinterval()}
    report["engine_main_thread"] = {"batch1": engine_calls(detector, pictures[:1], 60),
                                    f"batch{n}": engine_calls(detector, pictures[:n], 60)}
    report["engine_new_thread"] = {f"batch{n}": on_new_thread(lambda: engine_calls(detector, pictures[:n], 60))}

    def prerendered(count: int) -> Callable[[int], list]:
        return lambda frames: [CameraLike(f"cam{i}", pictures[i:] + pictures[:i], frames) for i in range(count)]

    ops = detector.device_ops
    variants: dict[str, Callable[[], None]] = {
        "as_shipped": lambda: None,
        "old_sync_upload": lambda: setattr(ops, "_upload", lambda frames: old_upload(ops, frames)),
        "switch_0.2ms": lambda: sys.setswitchinterval(0.0002),
    }
    default_switch = sys.getswitchinterval()
    report["pipelines"] = {}
    for variant, apply in variants.items():
        for capture in ("synthetic", "prerendered"):
            apply()
            try:
                row = {}
                for count in (1, n):
                    make = synthetic_sources(count) if capture == "synthetic" else prerendered(count)
                    row[f"{count}_sources"] = pipeline(detector, make, args.frames)
                row["ratio"] = round(row[f"{n}_sources"]["fps"] / row["1_sources"]["fps"], 2)
            finally:
                ops.__dict__.pop("_upload", None)
                sys.setswitchinterval(default_switch)
            report["pipelines"][f"{variant}/{capture}"] = row
            one, many = row["1_sources"], row[f"{n}_sources"]
            print(f"{variant + '/' + capture:32} 1 src {one['fps']:7.1f} FPS  {n} src {many['fps']:7.1f} FPS ({row['ratio']}x)"
                  f"  infer wall/cpu p50 {many['infer']['wall']['p50_ms']:.2f}/{many['infer']['cpu']['p50_ms']:.2f} ms"
                  f"  pre {many['preprocess']['wall']['p50_ms']:.2f}/{many['preprocess']['cpu']['p50_ms']:.2f} ms", flush=True)
    print(json.dumps({k: report[k] for k in ("engine_main_thread", "engine_new_thread")}, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
