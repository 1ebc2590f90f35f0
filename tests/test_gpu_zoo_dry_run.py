"""benchmarks/gpu_zoo.py's CPU dry run: the per-model step runs end to end on a toy YOLO-like model and its
JSON holds timings and accuracy for eager and both engine paths (the GPU run is scripts/gpu_zoo.sh)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_dry_run_of_one_model(tmp_path):
    out = tmp_path / "yolo_tiny.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_zoo.py"), "one", "--model", "yolo_tiny", "--device", "cpu", "--quick",
         "--skip-warm-load", "--runs", "2", "--warmup", "1", "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert "error" not in record, record.get("error")
    rows = {(row["variant"], row["batch"]): row for row in record["rows"]}
    for variant in ("eager fp32", "engine (from module)", "engine (from ONNX)"):
        for batch in (1, 4):
            row = rows[(variant, batch)]
            assert "error" not in row, row
            assert row["p50_ms"] > 0 and row["rel_l2"] < 1e-4
    assert record["builds"]["engine (from module)"]["details"]["source"] == "torch"
    assert record["builds"]["engine (from ONNX)"]["details"]["source"] == "onnx"
