"""The CLI end to end: build, run, info, validate, bench on a small ONNX model."""

from __future__ import annotations

import json

import numpy as np
import pytest

import enginesmith as es
from enginesmith.cli.app import main


def test_cli_engine_life_cycle(tmp_path, capsys, mlp_path):
    engine_path = tmp_path / "mlp.engine"
    assert main(["build", str(mlp_path), "-o", str(engine_path)]) == 0
    out = capsys.readouterr().out
    assert "built" in out and "x: float32[batch, 6]" in out and "verification: PASS" in out

    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = tmp_path / "outputs.npz"
    assert main(["run", str(engine_path), "--data", f"x={tmp_path / 'x.npy'}", "--out", str(result)]) == 0
    assert "probs" in capsys.readouterr().out
    with np.load(result) as saved:
        np.testing.assert_array_equal(saved["probs"], es.load(engine_path)(x=x)["probs"])

    assert main(["info", str(engine_path)]) == 0
    info_out = capsys.readouterr().out
    assert "runs on this machine" in info_out and "onnxruntime" in info_out
    assert main(["info", str(engine_path), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "onnxruntime"

    assert main(["validate", str(engine_path), "--against", str(mlp_path), "--json", str(tmp_path / "v.json")]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is True

    assert main(["bench", str(engine_path), "--batch", "1,2", "--runs", "10", "--vs", str(mlp_path),
                 "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]) == 0
    bench_out = capsys.readouterr().out
    assert "faster than mlp.onnx" in bench_out or "slower than mlp.onnx" in bench_out or "as fast as" in bench_out
    assert len(json.loads((tmp_path / "b.json").read_text())["results"]) == 4
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_cli_build_defaults_output_next_to_model_and_rebuilds_in_place(tmp_path, capsys, mlp_path):
    assert main(["build", str(mlp_path)]) == 0
    engine_path = mlp_path.with_suffix(".engine")
    assert engine_path.exists()
    before = es.load(engine_path).manifest.created_at
    assert main(["build", str(engine_path)]) == 0
    assert es.load(engine_path).manifest.source_name == "mlp.onnx"
    assert es.load(engine_path).manifest.created_at >= before


def test_cli_run_needs_inputs(mlp_engine_path, capsys):
    assert main(["run", str(mlp_engine_path)]) != 0


@pytest.mark.parametrize("args", [["bench", "X", "--batch", "0"], ["build", "m.onnx", "--input", "x:1xq"]])
def test_cli_bad_option_values(args, capsys):
    assert main(args) != 0
