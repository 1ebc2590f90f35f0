"""Two minutes of benchmarks/detect_soak.py (the full run is an hour of frames): frames from the synthetic
source through the detection pipeline with a real engine, no error, every frame accounted for, and
resident memory flat after the warm-up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("cv2")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from detect_soak import MAX_GROWTH_PERCENT, soak  # noqa: E402


@pytest.mark.slow
def test_ninety_seconds_of_frames_without_an_error_a_lost_frame_or_memory_growth(tmp_path) -> None:
    record = soak(frames=1_000_000, seconds=90, warmup_seconds=20, sample_every=2, workdir=tmp_path)
    assert record["errors"] == 0, record["error"]
    assert record["frames_out"] > 1000  # at least ~10 FPS even on a loaded machine
    assert record["every_frame_accounted"] and record["dropped"] == 0 and record["out_of_order"] == 0
    assert record["all_boxes_found_share"] > 0.95
    assert len(record["rss_samples"]) > 20
    assert record["rss_growth_percent"] <= MAX_GROWTH_PERCENT, record["rss_samples"]


def test_a_long_run_keeps_a_bounded_window_of_stage_times_and_means_over_every_frame(tmp_path, monkeypatch) -> None:
    import numpy as np
    import onnx

    import enginesmith as es
    from enginesmith import vision
    from enginesmith.vision import pipeline
    from vision_models import make_colour_yolov8

    monkeypatch.setattr(pipeline, "STAGE_WINDOW", 20)
    onnx.save(make_colour_yolov8(64), tmp_path / "colour.onnx")
    detector = vision.Detector(es.build(tmp_path / "colour.onnx"))
    seen = []
    summary = vision.run_pipeline(detector, [vision.open_source("synthetic:frames=60,width=128,height=96")],
                                  lambda frame, result: seen.append(result.times.inference))
    assert summary.frames == len(seen) == 60
    assert len(summary.stage_seconds["inference"]) == 20  # not 60: memory stays flat however long the run
    assert list(summary.stage_seconds["inference"]) == seen[-20:]
    stats = summary.to_dict()["stages"]["inference"]
    assert stats["mean_ms"] == round(float(np.mean(seen)) * 1e3, 3)
    assert stats["p50_ms"] == round(float(np.percentile(np.asarray(seen[-20:]) * 1e3, 50)), 3)
