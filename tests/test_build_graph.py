"""build runs the compatibility report and the graph passes; validate --layerwise finds the diverging layer."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graph_models import conv_bn_model, custom_op_model, feeds_for, op_types, run

import enginesmith as es
from enginesmith.bundle import read_bundle
from enginesmith.cli.app import main
from enginesmith.errors import BuildError, UnsupportedModelError
from enginesmith.graph.compat import IncompatibleModelError
from enginesmith.importers import ImportOptions


pytestmark = pytest.mark.usefixtures("wide_console")


@pytest.fixture
def cb_path(tmp_path):
    path = tmp_path / "cb.onnx"
    onnx.save(conv_bn_model(), path)
    return path


def payload_ops(engine_path) -> list[str]:
    contents = read_bundle(engine_path, payload=True)
    return op_types(onnx.load_from_string(contents.payload))


def test_build_applies_checked_passes_and_records_them(cb_path, tmp_path):
    engine = es.build(cb_path, output=tmp_path / "cb.engine")
    passes = engine.manifest.checks["graph_passes"]
    assert {"fold_batchnorm", "remove_training_nodes"} <= set(passes["applied"])
    assert passes["nodes_before"] == 9 and passes["nodes_after"] < 9
    assert engine.manifest.checks["compatibility"]["counts"]["unsupported"] == 0
    assert any(line.startswith("graph passes: 9 ->") for line in engine.manifest.build_log)
    feeds = feeds_for(conv_bn_model(), batch=4)
    np.testing.assert_allclose(engine(**feeds)["y"], run(conv_bn_model(), feeds)["y"], rtol=1e-4, atol=1e-4)
    ops = payload_ops(tmp_path / "cb.engine")
    assert "BatchNormalization" not in ops and "Dropout" not in ops


def test_passes_can_be_turned_off_and_the_choice_survives_a_rebuild(cb_path, tmp_path):
    engine = es.build(cb_path, disabled_passes=["fold_batchnorm"], output=tmp_path / "cb.engine")
    ran = [r["name"] for r in engine.manifest.checks["graph_passes"]["results"]]
    assert "fold_batchnorm" not in ran and "remove_training_nodes" in ran
    rebuilt = es.build(tmp_path / "cb.engine")
    assert rebuilt.manifest.build_options["graph"] == {"passes": True, "disabled": ["fold_batchnorm"]}
    assert "fold_batchnorm" not in rebuilt.manifest.checks["graph_passes"]["applied"]
    none = es.build(cb_path, graph_passes=False)
    assert "graph_passes" not in none.manifest.checks and none.manifest.build_options["graph"]["passes"] is False


def test_fixed_shape_from_the_command_line_reaches_the_engine(cb_path, tmp_path, capsys):
    target = tmp_path / "fixed.engine"
    assert main(["build", str(cb_path), "-o", str(target), "--input", "x:2x3x8x8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "graph passes: 9 ->" in out
    engine = es.load(target)
    assert list(engine.signature.inputs[0].shape) == [2, 3, 8, 8] and engine.signature.fixed_batch() == 2
    feeds = feeds_for(conv_bn_model(), batch=2)
    np.testing.assert_allclose(engine(**feeds)["y"], run(conv_bn_model(), feeds)["y"], rtol=1e-4, atol=1e-4)


def test_contradicting_shape_stops_the_build(cb_path, tmp_path):
    with pytest.raises(es.EnginesmithError, match="dimension 1 is fixed to 3"):
        es.build(cb_path, import_options=ImportOptions(input_shapes={"x": (1, 4, 8, 8)}), output=tmp_path / "bad.engine")
    assert not (tmp_path / "bad.engine").exists()


def test_unbuildable_model_stops_before_the_backend_with_the_report(tmp_path, capsys):
    path = tmp_path / "custom.onnx"
    onnx.save(custom_op_model(), path)
    with pytest.raises(IncompatibleModelError) as caught:
        es.build(path)
    assert isinstance(caught.value, UnsupportedModelError)
    assert [n.node for n in caught.value.report.blocking] == ["fancy"]
    assert main(["build", str(path), "-o", str(tmp_path / "custom.engine")]) == 2
    captured = capsys.readouterr()
    assert "fancy" in captured.out and "unsupported" in captured.out  # the report table
    assert captured.err.startswith("error:") and "fancy" in captured.err and captured.err.count("\n") == 1
    assert not (tmp_path / "custom.engine").exists()
    # Without the report the backend itself still refuses, naming the node.
    with pytest.raises(UnsupportedModelError, match="FancyActivation"):
        es.build(path, check_compatibility=False)


def test_rebuild_with_new_import_options_keeps_the_recorded_ones(cb_path, tmp_path):
    es.build(cb_path, import_options=ImportOptions(input_shapes={"x": (2, 3, 8, 8)}), output=tmp_path / "cb.engine")
    rebuilt = es.build(tmp_path / "cb.engine", import_options=ImportOptions(trust_code=True))
    assert rebuilt.signature.fixed_batch() == 2
    assert rebuilt.manifest.build_options["import_options"]["input_shapes"] == {"x": [2, 3, 8, 8]}


def test_validate_layerwise_on_the_command_line(cb_path, tmp_path, capsys):
    engine_path = tmp_path / "cb.engine"
    es.build(cb_path, output=engine_path)
    report_path = tmp_path / "report.json"
    assert main(["validate", str(engine_path), "--layerwise", "--json", str(report_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "layer-wise" in out and "PASS" in out
    layers = json.loads((tmp_path / "report.layerwise.json").read_text())
    assert layers["passed"] and layers["layers"] and layers["first_divergent"] is None


def test_layerwise_names_the_first_layer_an_int8_engine_gets_wrong(cb_path, tmp_path):
    # Calibrated on inputs 100x smaller than the ones compared: the first quantized layer saturates.
    small = {"x": (feeds_for(conv_bn_model(), batch=16)["x"] * 0.01).astype(np.float32)}
    np.savez(tmp_path / "calib.npz", **small)
    engine_path = tmp_path / "int8.engine"
    es.build(cb_path, precision="int8", calibration_data=tmp_path / "calib.npz", verify=False, output=engine_path)
    np.savez(tmp_path / "data.npz", **feeds_for(conv_bn_model(), batch=4))
    report = es.layerwise(engine_path, data=tmp_path / "data.npz")
    assert not report.passed and report.first_divergent is not None
    assert report.first_divergent.index == min(layer.index for layer in report.layers if not layer.passed)


def test_unknown_pass_name_is_a_clear_error(cb_path, capsys):
    assert main(["build", str(cb_path), "--no-pass", "fold_everything"]) == 2
    assert "unknown graph pass 'fold_everything'" in capsys.readouterr().err


def test_backend_options_on_the_command_line(cb_path, tmp_path, capsys):
    assert main(["build", str(cb_path), "-o", str(tmp_path / "x.engine"), "--option", "nonsense"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
