"""inspect and surgeon on the command line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graph_models import _model, conv_bn_model, custom_op_model, feeds_for, op_types, run
from onnx import TensorProto, helper

import enginesmith as es
from enginesmith.cli.app import main


pytestmark = pytest.mark.usefixtures("wide_console")


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def cb_path(tmp_path):
    path = tmp_path / "cb.onnx"
    onnx.save(conv_bn_model(), path)
    return path


def test_inspect_prints_tables_and_totals(cb_path, capsys):
    assert main(["inspect", str(cb_path)]) == 0
    out = flat(capsys.readouterr().out)
    for text in ("inputs and outputs", "layers (9)", "op histogram", "totals: 9 nodes", "conv1", "13.8K"):
        assert text in out


def test_inspect_json_with_target(cb_path, capsys):
    assert main(["inspect", str(cb_path), "--json", "-", "--target", "tensorrt:8.6"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["model"]["layers"]) == 9 and data["model"]["totals"]["macs"] > 0
    compat = data["compatibility"]
    assert compat["target_label"] == "tensorrt:8.6" and compat["buildable"] is True
    assert {n["node"]: n["fixed_by"] for n in compat["nodes"]}["bn1"] == "fold_batchnorm"


def test_inspect_unsupported_op_exits_1_with_report(tmp_path, capsys):
    path = tmp_path / "custom.onnx"
    onnx.save(custom_op_model(), path)
    for target in ("onnxruntime", "tensorrt:10"):
        assert main(["inspect", str(path), "--target", target]) == 1
        out = flat(capsys.readouterr().out)
        assert "unsupported" in out and "NOT buildable" in out and "fancy" in out


def test_inspect_summarizes_large_graphs(tmp_path, capsys):
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"relu{i}") for i in range(60)]
    model = _model(nodes, [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("t60", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "chain.onnx"
    onnx.save(model, path)
    assert main(["inspect", str(path)]) == 0
    out = flat(capsys.readouterr().out)
    assert "more layers" in out and "relu40" not in out
    assert main(["inspect", str(path), "--all"]) == 0
    out = flat(capsys.readouterr().out)
    assert "more layers" not in out and "relu40" in out


def test_inspect_an_engine_source_and_payload(tmp_path, capsys):
    source = tmp_path / "cb.onnx"
    onnx.save(conv_bn_model(batch=1), source)
    engine = tmp_path / "cb.engine"
    es.build(source).save(engine)
    assert main(["inspect", str(engine)]) == 0
    assert "source 'cb.onnx' embedded in cb.engine" in flat(capsys.readouterr().out)
    assert main(["inspect", str(engine), "--payload", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "payload" in data["source"] and "BatchNormalization" not in data["model"]["op_histogram"]


def test_inspect_fixes_shapes_first(cb_path, capsys):
    assert main(["inspect", str(cb_path), "--input", "x:4x3x8x8", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["inputs"][0]["shape"] == [4, 3, 8, 8]
    assert data["model"]["layers"][0]["macs"] == 4 * 13824


@pytest.mark.parametrize("args, message", [
    (["inspect", "missing.onnx"], "model not found"),
    (["inspect", "{cb}", "--input", "q:1x3x8x8"], "no input 'q'"),
    (["inspect", "{cb}", "--input", "x:1x4x8x8"], "dimension 1 is fixed to 3"),
    (["inspect", "{cb}", "--target", "tensorrt:7"], "no TensorRT operator table"),
    (["inspect", "{cb}", "--target", "tflite"], "unknown target 'tflite'"),
    (["surgeon", "{cb}", "--cut-inputs", "bn_1", "--cut-outputs", "sum"], "did you mean 'bn1'"),
    (["surgeon", "{cb}", "--opset", "99"], "opset 99 cannot be reached"),
    (["surgeon", "{cb}", "--passes", "fold_everything"], "unknown graph pass"),
    (["surgeon", "{cb}", "--rename", "nope=x2"], "cannot rename 'nope'"),
])
def test_bad_requests_are_one_line_errors(args, message, cb_path, capsys):
    assert main([a.replace("{cb}", str(cb_path)) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_surgeon_writes_a_checked_model(cb_path, tmp_path, capsys):
    target = tmp_path / "fixed.onnx"
    assert main(["surgeon", str(cb_path), "-o", str(target), "--input", "x:2x3x8x8", "--rename", "y=features"]) == 0
    out = flat(capsys.readouterr().out)
    assert "fold_batchnorm" in out and "graph passes: 9 -> 5 nodes" in out and "wrote" in out and target.exists()
    fixed = onnx.load(target)
    assert "BatchNormalization" not in op_types(fixed) and "Dropout" not in op_types(fixed)
    assert [o.name for o in fixed.graph.output] == ["features"]
    feeds = feeds_for(fixed)
    np.testing.assert_allclose(run(fixed, feeds)["features"], run(conv_bn_model(), feeds)["y"], rtol=1e-4, atol=1e-5)


def test_surgeon_json_default_output_and_pass_selection(cb_path, capsys):
    assert main(["surgeon", str(cb_path), "--passes", "remove_training_nodes", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["applied"] == ["remove_training_nodes"] and data["output"].endswith("cb.surgeon.onnx")
    assert op_types(onnx.load(data["output"])).count("BatchNormalization") == 2
    assert main(["surgeon", str(cb_path), "--no-pass", "simplify", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["status"] for r in data["results"]}["simplify"] == "skipped"


def test_surgeon_cut(cb_path, tmp_path, capsys):
    target = tmp_path / "cut.onnx"
    assert main(["surgeon", str(cb_path), "-o", str(target), "--cut-inputs", "r1", "--cut-outputs", "sum",
                 "--no-optimize"]) == 0
    cut = onnx.load(target)
    assert [v.name for v in cut.graph.input] == ["r1"] and [o.name for o in cut.graph.output] == ["sum"]


def test_surgeon_rolled_back_edit_exits_1_and_writes_nothing(tmp_path, capsys):
    from onnx import numpy_helper

    baked = _model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 2])],
                   [numpy_helper.from_array(np.array([2, 3, 2], np.int64), "shape")])
    path = tmp_path / "baked.onnx"
    onnx.save(baked, path)
    assert main(["surgeon", str(path), "--dynamic", "x:0", "--no-optimize"]) == 1
    captured = capsys.readouterr()
    out = flat(captured.out + captured.err)
    assert "rolled back" in out and "nothing written" in out
    assert not (tmp_path / "baked.surgeon.onnx").exists()



def _batch_one_flatten(transpose_first: bool) -> onnx.ModelProto:
    """x[1, 2, 4] -> Reshape([1, -1]) -> y[1, 8], optionally behind a Transpose that puts axis 1 first."""
    from onnx import numpy_helper

    nodes = [helper.make_node("Reshape", ["t" if transpose_first else "x", "target"], ["y"], name="flatten")]
    if transpose_first:
        nodes.insert(0, helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2], name="swap"))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                  [numpy_helper.from_array(np.array([1, -1], np.int64), "target")])


def test_surgeon_dynamic_batch_of_a_batch_one_export(tmp_path, capsys):
    path, target = tmp_path / "flat.onnx", tmp_path / "dynamic.onnx"
    onnx.save(_batch_one_flatten(transpose_first=False), path)
    assert main(["surgeon", str(path), "-o", str(target), "--dynamic", "x:0", "--no-optimize"]) == 0
    assert "batch carried through 1 Reshape target(s) [1, ...] -> [0, ...]: flatten" in flat(capsys.readouterr().out)
    x = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(onnx.load(target), {"x": x})["y"], x.reshape(3, 8))
    # Behind the Transpose the same Reshape would mix the items: refused, nothing written.
    onnx.save(_batch_one_flatten(transpose_first=True), path)
    target.unlink()
    assert main(["surgeon", str(path), "-o", str(target), "--dynamic", "x:0", "--no-optimize"]) == 1
    out = flat(capsys.readouterr().out)
    assert "rolled back" in out and "mixes batch items" in out and not target.exists()

def test_surgeon_lists_passes(capsys):
    assert main(["surgeon", "--list-passes", "whatever.onnx"]) == 0
    out = flat(capsys.readouterr().out)
    assert "fold_batchnorm" in out and "simplify" in out and "cut" in out


def test_print_layerwise_renders(capsys):
    from enginesmith.backends import BuildOptions
    from enginesmith.cli.graph_commands import print_layerwise
    from enginesmith.graph.layerwise import compare_layerwise

    model = conv_bn_model()
    print_layerwise(compare_layerwise(model, "onnxruntime", BuildOptions(), feeds_for(model)))
    out = flat(capsys.readouterr().out)
    assert "layer-wise" in out and "PASS" in out


def test_compat_table_of_a_large_graph_groups_what_passes_change(tmp_path, capsys):
    samples = pytest.importorskip("enginesmith.samples")
    path = samples.save(samples.mobilenet_v2_like(image_size=32), tmp_path / "mbv2.onnx")
    assert main(["inspect", str(path), "--target", "tensorrt:10"]) == 0
    out = flat(capsys.readouterr().out)
    assert "52 nodes" in out and "fold_batchnorm" in out and "--all shows every node" in out
    assert "152 supported, 0 with a condition, 0 unsupported of 152 nodes; buildable" in out
