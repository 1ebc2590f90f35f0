"""Surgery a user asks for, and the errors for bad requests (missing names, contradictory shapes, opsets)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graph_models import _model, conv_bn_model, feeds_for, matmul_model, run
from onnx import TensorProto, helper, numpy_helper

from enginesmith.errors import EnginesmithError
from enginesmith.graph._onnx import with_outputs
from enginesmith.graph.passes import optimize
from enginesmith.graph.surgery import (
    GraphSurgeryError,
    OpsetConversionError,
    ShapeMismatchError,
    TensorNotFoundError,
    add_outputs,
    convert_opset,
    cut_subgraph,
    fix_shapes,
    make_dynamic,
    rename_io,
)


def dims(value):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def test_errors_are_enginesmith_errors():
    for cls in (TensorNotFoundError, ShapeMismatchError, OpsetConversionError):
        assert issubclass(cls, GraphSurgeryError) and issubclass(cls, EnginesmithError)


def test_fix_shapes_propagates_to_outputs_and_runs():
    fixed = fix_shapes(conv_bn_model(), {"x": (2, 3, 8, 8)})
    assert dims(fixed.graph.input[0]) == [2, 3, 8, 8] and dims(fixed.graph.output[0]) == [2, 8, 8, 8]
    assert run(fixed, feeds_for(fixed))["y"].shape == (2, 8, 8, 8)


def test_fix_shapes_bad_requests():
    with pytest.raises(TensorNotFoundError, match=r"no input 'X'.*did you mean 'x'.*inputs are x"):
        fix_shapes(conv_bn_model(), {"X": (1, 3, 8, 8)})
    with pytest.raises(ShapeMismatchError, match="dimension 1 is fixed to 3 in the model, not 4"):
        fix_shapes(conv_bn_model(), {"x": (1, 4, 8, 8)})
    with pytest.raises(ShapeMismatchError, match="has 3 dimensions but the input has rank 4"):
        fix_shapes(conv_bn_model(), {"x": (1, 3, 8)})


def test_shapes_that_contradict_the_model():
    # x[N, K] @ W[5, 3]: K = 4 contradicts the weights (found by strict shape inference).
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                   [numpy_helper.from_array(np.ones((5, 3), np.float32), "W")])
    with pytest.raises(ShapeMismatchError, match="contradicts the model.*MatMul"):
        fix_shapes(model, {"x": (2, 4)})
    assert dims(fix_shapes(model, {"x": (2, 5)}).graph.output[0]) == [2, 3]
    # A Conv with 3-channel weights fed 4 channels (ONNX shape inference does not check this one).
    conv = conv_bn_model()
    conv.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"
    with pytest.raises(ShapeMismatchError, match="Conv 'conv1' gets 4 input channels but its weights expect 3"):
        fix_shapes(conv, {"x": (1, 4, 8, 8)})


def test_optimize_raises_for_bad_surgery_arguments():
    with pytest.raises(ShapeMismatchError):
        optimize(conv_bn_model(), [("fix_shapes", {"shapes": {"x": (1, 4, 8, 8)}})])
    with pytest.raises(TensorNotFoundError):
        optimize(conv_bn_model(), [("cut", {"inputs": ["nope"], "outputs": ["y"]})])


def test_make_dynamic_runs_at_other_sizes_and_is_checked():
    fixed = fix_shapes(conv_bn_model(), {"x": (1, 3, 8, 8)})
    dynamic = make_dynamic(fixed, {"x": [0]})
    assert dims(dynamic.graph.input[0]) == ["batch", 3, 8, 8]
    assert run(dynamic, {"x": np.zeros((5, 3, 8, 8), np.float32)})["y"].shape == (5, 8, 8, 8)
    with pytest.raises(ShapeMismatchError, match="axis 4 is out of range"):
        make_dynamic(fixed, {"x": [4]})
    # A Reshape with the batch baked in: the pass is rolled back because the model fails at another batch.
    baked = _model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 2])],
                   [numpy_helper.from_array(np.array([2, 3, 2], np.int64), "shape")])
    out, summary = optimize(baked, [("make_dynamic", {"axes": {"x": [0]}})])
    result = summary.results[0]
    assert result.status == "rolled_back" and "does not run when the dynamic axes" in result.reason
    assert dims(out.graph.input[0]) == [2, 6]


def test_a_build_whose_requested_pass_cannot_apply_names_the_option_to_drop(tmp_path):
    import enginesmith as es
    from enginesmith.errors import BuildError
    from enginesmith.importers import ImportOptions

    baked = _model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 2])],
                   [numpy_helper.from_array(np.array([2, 3, 2], np.int64), "shape")])
    onnx.save(baked, tmp_path / "baked.onnx")
    with pytest.raises(BuildError, match=r"could not apply make_dynamic .*does not run when the dynamic axes.*; "
                                         r"build without --dynamic \(dynamic_axes\) to keep the model as it is"):
        es.build(tmp_path / "baked.onnx", backend="onnxruntime", output=tmp_path / "baked.engine",
                 import_options=ImportOptions(dynamic_axes={"x": [0]}))
    assert not (tmp_path / "baked.engine").exists()


def test_rename_inputs_and_outputs():
    model = conv_bn_model()
    renamed = rename_io(model, {"x": "image", "y": "features"})
    assert [v.name for v in renamed.graph.input] == ["image"] and [o.name for o in renamed.graph.output] == ["features"]
    feeds = feeds_for(model)
    np.testing.assert_array_equal(run(renamed, {"image": feeds["x"]})["features"], run(model, feeds)["y"])
    _, summary = optimize(model, [("rename_io", {"mapping": {"x": "image"}})])
    assert summary.results[0].status == "applied"  # checked by position
    with pytest.raises(TensorNotFoundError, match="cannot rename 'z'.*inputs and outputs are x, y"):
        rename_io(model, {"z": "q"})
    with pytest.raises(GraphSurgeryError, match="already has a tensor named 'c1'"):
        rename_io(model, {"x": "c1"})


def test_cut_subgraph_matches_the_original_intermediates():
    model = conv_bn_model()
    cut = cut_subgraph(model, ["r1"], ["sum"])
    assert [v.name for v in cut.graph.input] == ["r1"] and [o.name for o in cut.graph.output] == ["sum"]
    assert "Conv" in {n.op_type for n in cut.graph.node} and "relu1" not in {n.name for n in cut.graph.node}
    feeds = feeds_for(model)
    full = run(with_outputs(model, ["r1", "sum"]), feeds)
    np.testing.assert_allclose(run(cut, {"r1": full["r1"]})["sum"], full["sum"], rtol=1e-5, atol=1e-6)
    # optimize checks a cut against the intermediates of the model before it.
    _, summary = optimize(model, [("cut", {"inputs": ["r1"], "outputs": ["sum"]})])
    assert summary.results[0].status == "applied" and summary.results[0].max_abs_diff < 1e-4


def test_cut_bad_requests():
    model = conv_bn_model()
    with pytest.raises(TensorNotFoundError, match=r"cannot cut at input 'bn_1'.*did you mean 'bn1'"):
        cut_subgraph(model, ["bn_1"], ["sum"])
    with pytest.raises(TensorNotFoundError, match="cannot cut at output 'nothing'"):
        cut_subgraph(model, ["r1"], ["nothing"])
    with pytest.raises(GraphSurgeryError, match="also depend on graph input"):
        cut_subgraph(model, ["c2"], ["sum"])  # sum also needs i1, computed from x
    with pytest.raises(GraphSurgeryError, match="is a weight"):
        cut_subgraph(model, ["w2"], ["c2"])
    with pytest.raises(GraphSurgeryError, match="do not feed the outputs"):
        cut_subgraph(model, ["c1", "c2"], ["bn1"])
    with pytest.raises(TensorNotFoundError, match="no node produces"):
        add_outputs(model, ["zzz"])


def test_opset_conversion_and_unreachable_opsets():
    model = matmul_model()
    up = convert_opset(model, 19)
    assert up.opset_import[0].version == 19
    feeds = feeds_for(model)
    np.testing.assert_array_equal(run(up, feeds)["y"], run(model, feeds)["y"])
    assert convert_opset(model, 17).SerializeToString() == model.SerializeToString()
    with pytest.raises(OpsetConversionError, match=r"opset 99 cannot be reached.*knows opsets 1 to \d+"):
        convert_opset(model, 99)
    with pytest.raises(OpsetConversionError, match="cannot convert the model from opset 17 to 1: .*MatMul"):
        convert_opset(model, 1)
    with pytest.raises(OpsetConversionError):
        optimize(model, [("convert_opset", {"opset": 0})])


def test_surgery_does_not_modify_its_argument():
    model = conv_bn_model()
    before = model.SerializeToString()
    fix_shapes(model, {"x": (1, 3, 8, 8)})
    rename_io(model, {"x": "image"})
    make_dynamic(model, {"x": [2]})
    cut_subgraph(model, ["r1"], ["sum"])
    assert model.SerializeToString() == before


def test_fix_shapes_keeps_the_declared_shape_of_an_output_inference_cannot_find():
    # If(c): x[None] (rank 3) else |x| (rank 2): ONNX inference leaves y without a shape, which is not
    # a valid model (Silero VAD's state output); y keeps its declared dims, with 'batch' and 'time' fixed.
    then_branch = helper.make_graph([helper.make_node("Unsqueeze", ["x", "axis0"], ["y_then"])], "then", [],
                                    [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Abs", ["x"], ["y_else"])], "else", [],
                                    [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)], "rank_branch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time"]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "batch", "time"])],
        [numpy_helper.from_array(np.array([0], np.int64), "axis0")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    fixed = fix_shapes(model, {"x": [1, 512]})
    onnx.checker.check_model(fixed)
    assert [d.dim_param or d.dim_value for d in fixed.graph.output[0].type.tensor_type.shape.dim] == ["n", 1, 512]
    x = np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)
    out = run(fixed, {"x": x, "c": np.array(True)})
    np.testing.assert_array_equal(out["y"], x[None])
