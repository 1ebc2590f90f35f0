"""The demo end to end (short: few epochs and runs), and the missing-framework message."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("sklearn")

import enginesmith as es  # noqa: E402
from enginesmith.cli.app import main  # noqa: E402
from enginesmith.errors import MissingDependencyError  # noqa: E402


def test_demo_trains_builds_validates_and_benchmarks(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--epochs", "12", "--runs", "5"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "PASS" in printed and "tf.function" in printed and "keras predict" in printed
    result = json.loads((out / "demo.json").read_text())
    # The engine decides like Keras on the test split (12 epochs are enough to be far above chance).
    assert abs(result["keras_test_accuracy"] - result["engine_test_accuracy"]) <= 0.01
    assert result["keras_test_accuracy"] > 0.5
    labels = {r["label"] for r in result["benchmark"]["results"]}
    assert {"engine", "keras predict", "tf.function"} <= labels
    assert (out / "demo.png").stat().st_size > 1000 and (out / "digits.keras").exists()
    engine = es.load(out / "digits.engine")
    assert engine.signature.input_names == ["image"] and engine.signature.output_names == ["probs"]
    assert engine.manifest.checks["build_verification"]["passed"]


def test_missing_framework_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "model.keras"
    path.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # never read: the framework import fails first
    for name in [m for m in sys.modules if m == "keras" or m.startswith("keras.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "keras", None)  # 'import keras' now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'enginesmith\[tensorflow\]'"):
        es.build(path)
    assert main(["build", str(path)]) == 2
