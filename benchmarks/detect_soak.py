"""Soak: an hour of frames (108,000 at 30 FPS) through live detection, counting errors and watching memory.

The synthetic 640x480 source (moving coloured rectangles on noise, known boxes) feeds the pipeline the
command line's ``enginesmith detect`` runs (``vision.run_pipeline``, JSON Lines to /dev/null), with a small
real engine: the colour YOLOv8-layout detector of tests/vision_models.py, built by ``enginesmith.build``.
Frames are taken as fast as the pipeline goes (a file-like source: nothing may be dropped).

A thread samples the resident set size (psutil, else /proc/self/status) every --sample-every seconds.
The figures: errors (an exception from any stage ends the run and is counted), frames in and out and
whether every one is accounted for (results numbered 0..N-1 in order, none dropped or corrupt), FPS,
the share of frames whose known boxes were all found, and RSS after the warm-up against RSS at the end
(growth %; the target is <= 5 %).

    python benchmarks/detect_soak.py [--frames 108000] [--seconds S] [--warmup-seconds 60] \
        [--json benchmarks/results/detect_soak.json]

--seconds ends the run early (the source stops giving frames), for the two-minute CI version
(tests/test_vision_soak.py). Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx

import enginesmith as es
from enginesmith import vision
from enginesmith.bench import machine_facts
from enginesmith.files import write_atomic
from enginesmith.vision.records import Frame
from enginesmith.vision.sinks import JsonLines
from enginesmith.vision.sources import Synthetic

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from vision_models import make_colour_yolov8  # noqa: E402

MAX_GROWTH_PERCENT = 5.0


def rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        import psutil
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no psutil and no /proc/self/status: cannot read the resident set size") from None
    return psutil.Process().memory_info().rss


class TimedSynthetic(Synthetic):
    """The synthetic scene, ending early once ``seconds`` have passed (None: after all its frames)."""

    def __init__(self, name: str, scene: vision.SyntheticScene, seconds: float | None):
        super().__init__(name, scene)
        self.seconds = seconds

    def frames(self) -> Iterator[Frame]:
        deadline = None if self.seconds is None else time.perf_counter() + self.seconds
        for frame in super().frames():
            if deadline is not None and time.perf_counter() > deadline:
                return
            yield frame


@dataclass
class MemorySampler:
    """(seconds since start, frames done, RSS bytes) every ``every`` seconds, on its own thread."""

    every: float
    frames: list[int] = field(default_factory=lambda: [0])
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._began = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="rss sampler", daemon=True)

    def _sample(self) -> None:
        self.samples.append((round(time.perf_counter() - self._began, 2), self.frames[0], rss_bytes()))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> "MemorySampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def overlaps(box, other) -> bool:
    return min(box[2], other[2]) > max(box[0], other[0]) and min(box[3], other[3]) > max(box[1], other[1])


def all_found(truth: np.ndarray, detections, smallest: float = 80.0) -> bool:
    """Every detection lies on a rectangle of its class, and every rectangle at least ``smallest`` pixels
    each way (20 input pixels for the 160-pixel detector) has one: the colour detector's boxes are its grid
    cells', so overlap is the test (as in tests/test_vision_pipeline.py)."""
    on_truth = all(any(overlaps(d.box, t) and d.class_id == t[4] for t in truth) for d in detections)
    big = [t for t in truth if t[2] - t[0] >= smallest and t[3] - t[1] >= smallest]
    return on_truth and all(any(overlaps(d.box, t) and d.class_id == t[4] for d in detections) for t in big)


def soak(frames: int, seconds: float | None = None, warmup_seconds: float = 60.0, sample_every: float = 5.0,
         size: int = 160, workdir: Path | None = None, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Run the soak and return its record (see the module's docstring); ``checkpoint`` gets the progress
    so far once a minute (so a run stopped early still leaves its figures)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        model = Path(tmp) / "colour.onnx"
        onnx.save(make_colour_yolov8(size, ["red", "green", "blue"]), model)
        engine = es.build(model, output=Path(tmp) / "colour.engine")
        detector = vision.Detector(es.load(engine.path), vision.DetectorSettings(conf=0.5))
        # Rectangles at least 1/6 of the frame across, so the 160-pixel detector sees them whole.
        scene = vision.SyntheticScene(width=640, height=480, frames=frames, objects=3, seed=1)
        source = TimedSynthetic("synthetic", scene, seconds)
        # Counters only: the soak must not grow its own memory with the frames it counts.
        counts = {"out": 0, "found": 0, "out_of_order": 0}
        error = None
        began = time.perf_counter()
        last = [began]
        with open(os.devnull, "w") as devnull, MemorySampler(sample_every) as sampler:
            sink = JsonLines(devnull)

            def deliver(frame: Frame, result) -> None:
                sink.write(frame, result)
                counts["out_of_order"] += result.source_index != counts["out"] or result.frame != counts["out"]
                counts["out"] += 1
                counts["found"] += all_found(frame.truth, result.detections)
                sampler.frames[0] = counts["out"]
                if checkpoint is not None and time.perf_counter() - last[0] >= 60:
                    last[0] = time.perf_counter()
                    checkpoint({"frames_out": counts["out"], "seconds": round(last[0] - began, 1),
                                "rss_samples": [{"s": s[0], "frames": s[1], "rss_mb": round(s[2] / 2**20, 2)}
                                                for s in list(sampler.samples)]})

            try:
                summary = vision.run_pipeline(detector, [source], deliver)
            except Exception as exc:  # noqa: BLE001 - the soak counts errors instead of stopping at one
                error, summary = f"{type(exc).__name__}: {exc}", None
        elapsed = time.perf_counter() - began
    samples = sampler.samples
    after_warmup = next((s for s in samples if s[0] >= warmup_seconds), samples[-1])
    end = samples[-1]
    growth = 100.0 * (end[2] - after_warmup[2]) / after_warmup[2]
    late = [s[2] for s in samples if s[0] >= after_warmup[0]]
    totals = summary.to_dict() if summary else {}
    record = {
        "benchmark": "detect_soak",
        "frames_asked": frames,
        "seconds_limit": seconds,
        "frames_read": totals["sources"][0]["read"] if summary else None,
        "frames_out": counts["out"],
        # Ctrl-C (SIGINT) ends a run early and cleanly: frames still queued at that moment are read, not out.
        "interrupted": totals.get("interrupted"),
        "errors": int(error is not None),
        "error": error,
        "dropped": totals.get("dropped"),
        "corrupt": totals.get("corrupt"),
        "out_of_order": counts["out_of_order"],
        # Results numbered 0..N-1 in order, and as many as the source gave.
        "every_frame_accounted": bool(summary and counts["out_of_order"] == 0 and totals["dropped"] == 0
                                      and totals["sources"][0]["read"] == counts["out"] == totals["frames"]),
        "all_boxes_found_share": round(counts["found"] / max(1, counts["out"]), 4),
        "seconds": round(elapsed, 1),
        "fps": round(counts["out"] / elapsed, 1),
        "stages": totals.get("stages"),
        "rss_mb": {"after_warmup": round(after_warmup[2] / 2**20, 1), "end": round(end[2] / 2**20, 1),
                   "peak_after_warmup": round(max(late) / 2**20, 1), "warmup_seconds": after_warmup[0]},
        "rss_growth_percent": round(growth, 2),
        "rss_samples": [{"s": s[0], "frames": s[1], "rss_mb": round(s[2] / 2**20, 2)} for s in samples],
        "model": f"colour-yolov8 {size}x{size} (tests/vision_models.py), onnxruntime CPU",
    }
    record["met"] = {"zero_errors": record["errors"] == 0, "every_frame_accounted": record["every_frame_accounted"],
                     "rss_growth_within_5_percent": growth <= MAX_GROWTH_PERCENT}
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=108_000)
    parser.add_argument("--seconds", type=float, default=None, help="End the run early after this long.")
    parser.add_argument("--warmup-seconds", type=float, default=60.0)
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "detect_soak.json")
    args = parser.parse_args()
    def checkpoint(progress: dict) -> None:
        write_atomic(args.json, json.dumps({"benchmark": "detect_soak", "complete": False, "frames_asked": args.frames,
                                            "note": "progress so far; the run has not ended", **progress}, indent=1).encode())

    record = soak(args.frames, args.seconds, args.warmup_seconds, args.sample_every, checkpoint=checkpoint)
    record["complete"] = True
    record["machine"] = machine_facts()
    record["load_average_end"] = os.getloadavg()
    write_atomic(args.json, json.dumps(record, indent=2).encode())
    print(f"frames {record['frames_out']}/{record['frames_asked']}  errors {record['errors']}  "
          f"accounted {record['every_frame_accounted']}  fps {record['fps']}  boxes found {record['all_boxes_found_share']:.1%}  "
          f"RSS {record['rss_mb']['after_warmup']} -> {record['rss_mb']['end']} MB ({record['rss_growth_percent']:+.2f} %)")
    print(f"wrote {args.json}")
    sys.exit(0 if all(record["met"].values()) else 1)


if __name__ == "__main__":
    main()
