"""The shipped synthetic-scene detectors and how their mAP is measured: one place for the tests and the benchmark.

Each detector is a source file under models/ (frozen graph, SavedModel or ONNX) with what ``eval``
needs to read it; :func:`detectors_for` gives an engine and its source (run by its own framework, the
reference runner ``validate`` and ``eval --against`` use) as detectors scored on the same images, through
the same preprocessing and post-processing, so the difference is the engine's alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

MODELS = Path(__file__).parent / "models"
VAL_SEED = 2  # train_*.py train on seed 0; synth_data's default val split is seed 1; tests and benchmarks use 2+
CALIB_SEED = 3
EVAL_CONF, EVAL_IOU = 0.001, 0.6  # enginesmith eval's defaults: mAP wants every candidate


@dataclass(frozen=True)
class ShippedDetector:
    key: str
    path: str  # under models/
    head: str  # the layout enginesmith should pick by itself
    framework: str

    @property
    def source(self) -> Path:
        return MODELS / self.path


DETECTORS = (
    ShippedDetector("ssd_frozen_graph", "ssd_mobilenet_v2_synth.pb", "ssd", "tensorflow"),
    ShippedDetector("ssd_raw_frozen_graph", "ssd_mobilenet_v2_synth_raw.pb", "ssd-raw", "tensorflow"),
    ShippedDetector("ssd_savedmodel", "ssd_mobilenet_v2_synth_savedmodel", "ssd", "tensorflow"),
    ShippedDetector("yolov8_onnx", "yolov8_synth.onnx", "yolov8", "pytorch"),
)


def file_digests(root: Path = MODELS) -> dict[str, str]:
    """sha256 of every shipped model file, keyed by its path under models/ (SavedModel files included)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix not in (".json", ".log", ".md") and p.name != "SHA256SUMS"}


def read_sums(root: Path = MODELS) -> dict[str, str]:
    sums = {}
    for line in (root / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.lstrip("*")] = digest
    return sums


def write_val_set(folder: Path, count: int, seed: int = VAL_SEED) -> tuple[Path, Path]:
    """(annotations JSON, image folder) of ``count`` scenes the detectors never trained on."""
    import synth_data

    annotations = synth_data.write_split(folder, count, seed)
    return annotations, folder / "images"


def write_calib_images(folder: Path, count: int = 32) -> Path:
    """A folder of ``count`` scenes for int8 calibration, apart from the training and validation ones."""
    import synth_data

    synth_data.write_split(folder, count, CALIB_SEED)
    return folder / "images"


def detectors_for(engine, source: Path | None):
    """(engine detector, source detector or None) with eval's settings; the source runs by its own framework."""
    from enginesmith import vision
    from enginesmith.importers import ImportOptions, reference_runner

    settings = vision.DetectorSettings(conf=EVAL_CONF, iou=EVAL_IOU)
    on_engine = vision.Detector(engine, settings)
    on_source = vision.Detector(engine, settings, infer=reference_runner(source, ImportOptions())) if source else None
    return on_engine, on_source
