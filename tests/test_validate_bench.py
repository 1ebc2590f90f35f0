"""Validation metrics and reports, benchmark statistics, JSON and plots."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import make_mlp

import enginesmith as es
from enginesmith.bench import LatencyStats
from enginesmith.cli.app import main
from enginesmith.validate import compare, tolerance_for


def test_compare_metrics_by_hand():
    ref = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]], np.float32)
    got = ref + np.array([[0.0, 0.0, 0.3], [0.0, -0.1, 0.0]], np.float32)
    m = compare("out", ref, got, tolerance_for("fp32"))
    assert m.max_abs == pytest.approx(0.3, rel=1e-6)
    assert m.mean_abs == pytest.approx(0.4 / 6, rel=1e-6)
    assert m.rel_l2 == pytest.approx(np.sqrt(0.09 + 0.01) / np.sqrt(15), rel=1e-5)
    r, g = ref.ravel().astype(np.float64), got.ravel().astype(np.float64)
    assert m.cosine == pytest.approx(r @ g / np.linalg.norm(r) / np.linalg.norm(g), rel=1e-9)
    assert m.argmax_agreement == 1.0
    assert not m.passed and any("relative L2" in f for f in m.failures)
    loose = compare("out", ref, got, tolerance_for("int8"))
    assert loose.passed


def test_compare_flags_nan_shape_and_integer_mismatch():
    ref = np.ones((2, 3), np.float32)
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert "NaN" in compare("o", ref, nan, tolerance_for("int8")).failures[0]
    assert not compare("o", ref, np.ones((3, 2), np.float32), tolerance_for("fp32")).passed
    ints = compare("ids", np.array([1, 2, 3]), np.array([1, 2, 4]), tolerance_for("fp32"))
    assert not ints.passed and "33.33%" in ints.failures[0]


def test_argmax_agreement_counts_changed_decisions():
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], np.float32)
    got = ref.copy()
    got[2] = [0.4, 0.6]
    m = compare("probs", ref, got, tolerance_for("int8"))
    assert m.argmax_agreement == 0.75
    assert any("argmax agreement" in f for f in m.failures)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


def test_saturated_probability_map_is_judged_on_the_probability_scale():
    # A text detector's sigmoid map on random inputs: logits near -15, so every value is ~3e-7 and a
    # logit difference of 0.02 from reordered fp32 kernels is a 2% "relative" error of nothing.
    rng = np.random.default_rng(0)
    logits = -15.0 + rng.standard_normal((2, 1, 32, 32))
    ref, got = _sigmoid(logits), _sigmoid(logits + 0.02 * rng.standard_normal(logits.shape))
    m = compare("sigmoid_0.tmp_0", ref, got, tolerance_for("fp32"))
    assert m.passed, m.failures
    assert m.max_abs < 1e-6 and m.rel_l2 < 1e-4
    # Every row of the map is below the floor: no top-1 to agree on.
    assert m.argmax_agreement is None
    # A real error on the same map still fails: one pixel that turns into a detection.
    wrong = got.copy()
    wrong[0, 0, 5, 7] = 0.4
    bad = compare("sigmoid_0.tmp_0", ref, wrong, tolerance_for("fp32"))
    assert not bad.passed and any("relative L2" in f for f in bad.failures)


def test_probability_map_with_detections_keeps_the_fp32_limits():
    # Above the floor the usual relative metrics apply: a 1e-3 relative error fails fp32.
    rng = np.random.default_rng(1)
    ref = _sigmoid(rng.standard_normal((2, 1, 32, 32)) * 3)
    got = ref * (1 + 1e-3 * rng.standard_normal(ref.shape)).astype(np.float32)
    m = compare("prob", ref, got, tolerance_for("fp32"))
    assert not m.passed and any("relative L2" in f for f in m.failures)


def test_argmax_agreement_leaves_out_rows_whose_top_scores_tie():
    # Rows saturated at 1.0 have no top-1; the decided row that flips is counted.
    ref = np.array([[1.0, 1.0, 0.2], [0.9, 0.1, 0.0], [0.2, 0.7, 0.1]], np.float32)
    got = np.array([[0.99, 1.0, 0.2], [0.1, 0.9, 0.0], [0.2, 0.7, 0.1]], np.float32)
    m = compare("probs", ref, got, tolerance_for("int8"))
    assert m.argmax_agreement == 0.5


def test_validate_against_a_different_model_fails(tmp_path, mlp_engine_path):
    other = tmp_path / "other.onnx"
    onnx.save(make_mlp(seed=123), other)
    report = es.validate(mlp_engine_path, other)
    assert not report.passed
    assert report.outputs[0].rel_l2 > 1e-2
    # The CLI exits 1 on a failed validation and writes the JSON report.
    out = tmp_path / "report.json"
    assert main(["validate", str(mlp_engine_path), "--against", str(other), "--json", str(out)]) == 1
    assert json.loads(out.read_text())["passed"] is False


def test_validate_with_data_file_and_stored_report(tmp_path, mlp_engine_path):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32))
    report = es.validate(mlp_engine_path, data=data, batch=4)
    assert report.passed and report.samples == 10
    assert report.inputs == "data 'data.npz'"
    stored = es.info(mlp_engine_path)
    assert stored["reports"]["validation"]["samples"] == 10
    assert stored["checks"]["validation"]["passed"] is True
    es.load(mlp_engine_path)  # the rewritten bundle still verifies


def test_validate_single_npy_for_single_input(tmp_path, mlp_engine_path):
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32))
    assert es.validate(mlp_engine_path, data=data, store=False).passed


def test_latency_stats_from_known_samples():
    stats = LatencyStats.from_samples("t", 4, [0.001 * i for i in range(1, 101)])
    assert stats.min_ms == pytest.approx(1.0) and stats.max_ms == pytest.approx(100.0)
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.throughput == pytest.approx(4 * 1000 / 50.5)


def test_bench_engine_against_source_writes_json_and_plot(tmp_path, mlp_path, mlp_engine_path):
    report = es.bench(mlp_engine_path, batches=[1, 3], vs=mlp_path, runs=20, warmup=2)
    labels = {(r.label, r.batch) for r in report.results}
    assert labels == {("engine", 1), ("engine", 3), ("mlp.onnx", 1), ("mlp.onnx", 3)}
    for r in report.results:
        assert r.runs == 20 and r.min_ms <= r.p50_ms <= r.p99_ms <= r.max_ms
    ratios = report.ratios()
    assert [(r["label"], r["batch"]) for r in ratios] == [("engine", 1), ("engine", 3)]
    by_key = {(r.label, r.batch): r for r in report.results}
    assert ratios[0]["p50_ratio"] == pytest.approx(by_key[("engine", 1)].p50_ms / by_key[("mlp.onnx", 1)].p50_ms)
    js = json.loads(report.write_json(tmp_path / "b.json").read_text())
    assert js["baseline"] == "mlp.onnx" and len(js["results"]) == 4 and js["machine"]["physical_cores"] >= 1
    png = report.plot(tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_by_duration(mlp_engine_path):
    report = es.bench(mlp_engine_path, batches=[2], runs=None, duration_s=0.2, warmup=1)
    assert report.results[0].runs >= 5 and report.baseline is None


def test_a_reference_that_ignores_its_inputs_is_flagged(tmp_path, capsys):
    from onnx import TensorProto, helper, numpy_helper

    # y = 0 * x + c: every input gives the same output, as an untrained model with a dead layer might.
    zero = numpy_helper.from_array(np.zeros((6, 4), np.float32), "W")
    const = numpy_helper.from_array(np.full((4,), 0.25, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["probs"], name="dead")], "dead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 4])], [zero, const])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "dead.onnx"
    onnx.save(model, path)
    engine = es.build(path, output=tmp_path / "dead.engine")
    report = es.validate(tmp_path / "dead.engine")
    assert report.passed and report.warnings and "'probs' is the same for every input" in report.warnings[0]
    assert "warning" in engine.manifest.checks["build_verification"]["summary"]
    assert main(["validate", str(tmp_path / "dead.engine")]) == 0
    assert "warning:" in capsys.readouterr().out


def test_a_model_whose_outputs_depend_on_inputs_has_no_warning(mlp_engine_path):
    assert es.validate(mlp_engine_path).warnings == []
