"""benchmarks/gpu_zoo_targets.py: issue 15's targets judged from gpu_zoo records (synthetic records here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def targets(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_zoo_targets", ROOT / "benchmarks" / "gpu_zoo_targets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RECORDS_IN_ORDER", ["old.json", "new.json"])
    monkeypatch.setattr(module, "SPEED_SOURCES", {"net": ("new.json", "engine (from module)")})
    return module


def timing(batch: int, variant: str, ms: float, rel_l2: float = 1e-3) -> dict:
    return {"batch": batch, "variant": variant, "p50_ms": ms, "items_per_s": round(batch * 1000 / ms, 1), "rel_l2": rel_l2}


def write(folder: Path, name: str, records: list[dict]) -> None:
    (folder / name).write_text(json.dumps(records))


def test_ratios_come_from_the_same_run_and_a_later_slow_warm_load_fails_its_target(targets, tmp_path):
    write(tmp_path, "old.json", [{"model": "net", "training": {"steps": 300}, "rows": [
        timing(1, "engine (from module)", 0.5, rel_l2=4e-4), timing(1, "engine (from ONNX)", 0.6, rel_l2=2e-4)],
        "builds": {"engine (from module)": {"cold_build_s": 30, "warm_load_s": 12.0}}}])
    # The engine and its baseline ran as two processes: two records of one model in one file.
    write(tmp_path, "new.json", [
        {"model": "net", "rows": [timing(1, "engine (from module)", 0.4, rel_l2=3e-2), timing(64, "engine (from module)", 4.0)],
         "builds": {"engine (from module)": {"cold_build_s": 30, "warm_load_s": 25.0}}},
        {"model": "net", "rows": [timing(1, "torch.compile max-autotune fp16", 0.6), timing(64, "torch.compile max-autotune fp16", 4.8)],
         "builds": {"torch.compile": {"compile_s": 300}}},
    ])
    result = targets.judge(tmp_path)
    net = result["models"]["net"]
    assert [p["ratio"] for p in net["speed"]["points"]] == [1.5, 1.2]
    assert net["speed"]["geomean"] == pytest.approx((1.5 * 1.2) ** 0.5, abs=1e-3)
    assert result["median_geomean"] == net["speed"]["geomean"]
    # Trained weights stand for accuracy even when a later record has random ones (3e-2 here).
    assert net["accuracy"]["trained"] and net["accuracy"]["worst_rel_l2"] == pytest.approx(4e-4)
    assert net["onnx"]["file"] == "old.json"
    assert net["warm_load"] == {"file": "new.json", "seconds": 25.0, "met": False}
    assert result["targets"]["engine >= 1.0x max-autotune at every batch"]
    assert result["targets"]["median model >= 1.3x"]
    assert result["targets"]["cold build <= max-autotune compile"]
    assert not result["targets"]["warm load <= 20 s"]
    assert not result["targets"]["ResNet-50 b1 <= 0.45 ms"]  # no ResNet-50 record at all: not met


def test_an_engine_slower_than_max_autotune_at_one_batch_fails(targets, tmp_path):
    write(tmp_path, "new.json", [{"model": "net", "rows": [
        timing(1, "engine (from module)", 0.4), timing(1, "torch.compile max-autotune fp16", 0.8),
        timing(64, "engine (from module)", 5.0), timing(64, "torch.compile max-autotune fp16", 4.9)],
        "builds": {"engine (from module)": {"cold_build_s": 400}, "torch.compile": {"compile_s": 300}}}])
    result = targets.judge(tmp_path)
    assert not result["targets"]["engine >= 1.0x max-autotune at every batch"]
    assert not result["targets"]["cold build <= max-autotune compile"]
    assert not result["targets"]["builds from the ONNX export"]
