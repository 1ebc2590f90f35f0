"""benchmarks/detect.py's device mode, dry run on this CPU (the GPU run is scripts/gpu_detect.sh): a detector
given as ONNX is built for the torch backend and measured with pre- and post-processing on its device, at
batch 1 and with 4 sources batched, and the JSON says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

pytest.importorskip("cv2")
pytest.importorskip("torch")
if __import__("importlib").util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from detect import colour_yolov8_batch  # noqa: E402


@pytest.mark.slow
@pytest.mark.torch
def test_device_mode_dry_run_measures_a_given_detector_and_skips_one_that_does_not_build(tmp_path) -> None:
    onnx.save(colour_yolov8_batch(96, "batch"), tmp_path / "colour.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx model")
    out = tmp_path / "detect.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "detect.py"), "--dry-run", "--frames", "8",
                           "--model", str(tmp_path / "broken.onnx"), "--model", str(tmp_path / "colour.onnx"),
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    skipped_lines = [line for line in done.stdout.splitlines() if line.startswith("broken.onnx skipped: ")]
    assert len(skipped_lines) == 1
    report = json.loads(out.read_text())
    assert [entry["model"] for entry in report["skipped"]] == ["broken.onnx"]
    assert report["skipped"][0]["error"].startswith("SourceError: ") and "not a readable ONNX model" in skipped_lines[0]
    assert report["mode"] == "device" and report["device"] == "cpu" and len(report["results"]) == 1
    row = report["results"][0]
    assert row["backend"] == "torch" and row["device"] == "cpu" and row["head"] == "yolov8"
    assert row["latency_batch1"]["p50_ms"] > 0 and row["engine_only_batch1"]["p50_ms"] > 0
    assert row["pipeline_1_sources"]["fps"] > 0 and row["pipeline_4_sources"]["batches"] == 8  # 4 frames a call
    assert set(row["met"]) == {"latency_p50_within_3ms", "4_sources_at_least_3x", "4_camera_like_sources_at_least_3x"}
    assert row["pipeline_4_sources_camera_like"]["batches"] == 8 and row["batched_over_single_camera_like"] > 0
