"""Every pass keeps outputs equal (checked here with ONNX Runtime directly) and actually changes the graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graph_models import (
    _model,
    concat_model,
    conv_bn_model,
    custom_op_model,
    dead_branch_model,
    feeds_for,
    gemm_bn_model,
    op_types,
    run,
)
from onnx import TensorProto, helper, numpy_helper

from enginesmith.graph import passes as P
from enginesmith.graph.passes import DEFAULT_PASSES, GraphPass, build_passes, optimize
from enginesmith.graph.surgery import GraphSurgeryError
from enginesmith.importers import ImportOptions

MODELS = {
    "conv_bn_residual": conv_bn_model,
    "gemm_bn_transB": lambda: gemm_bn_model(trans_b=1),
    "gemm_bn_no_c": lambda: gemm_bn_model(trans_b=0, with_c=False),
    "concat_last_axis": concat_model,
    "dead_branch": dead_branch_model,
}


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, batch: int = 3) -> None:
    for seed in (0, 1):
        feeds = feeds_for(before, batch=batch, seed=seed)
        a, b = run(before, feeds), run(after, feeds)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("pass_name", DEFAULT_PASSES)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_default_pass_keeps_outputs(pass_name, model_name):
    model = MODELS[model_name]()
    after = P.PASSES[pass_name].func(model)
    onnx.checker.check_model(after)
    assert_same_outputs(model, after)
    assert [o.name for o in after.graph.output] == [o.name for o in model.graph.output]


def test_batchnorm_folded_into_conv_and_gemm():
    model = conv_bn_model()
    folded = P.fold_batchnorm(model)
    assert "BatchNormalization" not in op_types(folded)
    assert len(folded.graph.node) == len(model.graph.node) - 2
    # The fused Conv writes the BatchNorm's output name, so downstream names stay.
    assert any(n.op_type == "Conv" and n.output[0] == "bn1" for n in folded.graph.node)
    assert {"s1", "m1", "v1", "w1"}.isdisjoint(t.name for t in folded.graph.initializer)
    for trans_b in (0, 1):
        for with_c in (True, False):
            gemm = gemm_bn_model(trans_b=trans_b, with_c=with_c)
            out = P.fold_batchnorm(gemm)
            assert op_types(out) == ["Gemm", "Sigmoid"]
            assert_same_outputs(gemm, out)


def test_batchnorm_not_folded_when_conv_output_is_shared():
    model = conv_bn_model()
    model.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, None))
    assert op_types(P.fold_batchnorm(model)).count("BatchNormalization") == 1


def test_training_nodes_removed_and_graph_output_name_kept():
    model = conv_bn_model()
    out = P.remove_training_nodes(model)
    assert "Dropout" not in op_types(out) and "Identity" not in op_types(out)
    concat = concat_model()
    out = P.remove_training_nodes(concat)
    assert "Identity" not in op_types(out) and [o.name for o in out.graph.output] == ["y"]
    assert_same_outputs(concat, out)


def test_dropout_with_used_mask_or_training_mode_is_kept():
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"], name="drop"),
             helper.make_node("Cast", ["mask"], ["m"], name="cast", to=TensorProto.FLOAT)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                    helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 4])])
    assert "Dropout" in op_types(P.remove_training_nodes(model))
    training = _model([helper.make_node("Dropout", ["x", "ratio", "train"], ["y"], name="drop")],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                      [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
                       numpy_helper.from_array(np.array(True), "train")])
    assert "Dropout" in op_types(P.remove_training_nodes(training))


def test_constant_folding_and_dead_nodes():
    folded = P.fold_constants(concat_model())
    assert "Constant" not in op_types(folded) and "Add" not in op_types(folded)
    cleaned = P.eliminate_dead_nodes(dead_branch_model())
    assert op_types(cleaned) == ["Relu"]


def test_optimize_defaults_summary_and_log():
    model = conv_bn_model()
    out, summary = optimize(model)
    assert op_types(out) == ["Conv", "Relu", "Conv", "Add", "Relu"]
    assert_same_outputs(model, out)
    assert summary.nodes_before == 9 and summary.nodes_after == 5
    statuses = {r.name: r.status for r in summary.results}
    assert statuses["fold_batchnorm"] == "applied" and statuses["remove_training_nodes"] == "applied"
    assert "fold_batchnorm" in summary.applied and summary.rolled_back == []
    assert summary.summary().startswith("graph passes: 9 -> 5 nodes")
    assert any("fold_batchnorm: 7 -> 5 nodes" in line for line in summary.lines())
    json.dumps(summary.to_dict())


def test_disabled_passes_are_skipped():
    # onnxslim folds BatchNorm too, so both are turned off.
    out, summary = optimize(conv_bn_model(), disabled=["fold_batchnorm", "simplify"])
    assert op_types(out).count("BatchNormalization") == 2
    skipped = next(r for r in summary.results if r.name == "fold_batchnorm")
    assert skipped.status == "skipped" and skipped.reason == "turned off"


@pytest.fixture
def extra_pass(monkeypatch):
    def add(name, func):
        monkeypatch.setitem(P.PASSES, name, GraphPass(name, func, "test pass"))
        return name

    return add


def test_pass_that_changes_outputs_is_rolled_back(extra_pass):
    def scale_weights(model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for t in out.graph.initializer:
            if t.name == "w1":
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.01, "w1"))
        return out

    model = conv_bn_model()
    out, summary = optimize(model, [extra_pass("bad_scale", scale_weights)])
    result = summary.results[0]
    assert result.status == "rolled_back" and "output 'y' differs" in result.reason
    assert out.SerializeToString() == model.SerializeToString()


def test_pass_that_crashes_or_breaks_the_model_is_rolled_back(extra_pass):
    def crash(model):
        raise ValueError("boom")

    def invalid(model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.node[0].input[0] = "nowhere"
        return out

    _, summary = optimize(conv_bn_model(), [extra_pass("crash", crash), extra_pass("invalid", invalid)])
    crash_result, invalid_result = summary.results
    assert crash_result.status == "rolled_back" and "ValueError: boom" in crash_result.reason
    assert invalid_result.status == "rolled_back" and "not a valid ONNX model" in invalid_result.reason


def test_unchecked_and_unknown_passes():
    _, summary = optimize(conv_bn_model(), ["fold_batchnorm"], check=False)
    assert summary.results[0].status == "unchecked" and not summary.checked
    with pytest.raises(GraphSurgeryError, match="unknown graph pass 'nope'"):
        optimize(conv_bn_model(), ["nope"])
    with pytest.raises(GraphSurgeryError, match="needs arguments"):
        optimize(conv_bn_model(), ["fix_shapes"])


def test_passes_on_a_model_onnx_runtime_cannot_run_are_rolled_back_with_reason():
    model = custom_op_model()
    model.graph.node.insert(0, helper.make_node("Identity", ["x"], ["x_id"], name="ident"))
    model.graph.node[1].input[0] = "x_id"
    out, summary = optimize(model, ["remove_training_nodes"])
    result = summary.results[0]
    assert result.status == "rolled_back" and "cannot be checked" in result.reason and "FancyActivation" in result.reason
    assert "Identity" in op_types(out)


def test_build_passes_follow_import_options():
    options = ImportOptions(input_shapes={"x": (1, 3, 8, 8)}, opset=18)
    specs = build_passes(options, disabled=["simplify"])
    # Opset conversion runs last: Identity and Dropout (which the converter may not handle) are gone by then.
    assert specs[0] == ("fix_shapes", {"shapes": {"x": (1, 3, 8, 8)}}) and specs[-1] == ("convert_opset", {"opset": 18})
    assert "simplify" not in specs and "fold_batchnorm" in specs
    out, summary = optimize(conv_bn_model(), specs)
    assert [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 8]
    assert out.opset_import[0].version == 18 and summary.rolled_back == []


def test_sample_models_keep_outputs_through_default_passes():
    samples = pytest.importorskip("enginesmith.samples")
    small = samples.small_cnn()
    out, summary = optimize(small)
    assert summary.rolled_back == []
    assert "Dropout" not in op_types(out) and "BatchNormalization" not in op_types(out)
    assert not {"dropout.ratio", "dropout.training_mode"} & {t.name for t in out.graph.initializer}
    assert_same_outputs(small, out)

    two = samples.two_input_two_output()
    out, summary = optimize(two)
    assert [o.name for o in out.graph.output] == ["score", "features"] and summary.rolled_back == []
    assert_same_outputs(two, out)

    mobilenet = samples.mobilenet_v2_like(image_size=32)
    out, summary = optimize(mobilenet)
    assert summary.rolled_back == [] and "BatchNormalization" not in op_types(out)
    assert summary.nodes_after < summary.nodes_before
    assert_same_outputs(mobilenet, out, batch=1)


def _branch_with_unnamed_tensor_attribute() -> onnx.ModelProto:
    """If(c): x + ConstantOfShape(Shape(x)) with an unnamed ``value`` tensor, else |x| (like Silero VAD v4's zero states)."""
    fill = numpy_helper.from_array(np.array([0.5], np.float32))
    then_branch = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("ConstantOfShape", ["s"], ["z"], value=fill),
         helper.make_node("Add", ["x", "z"], ["y_then"])],
        "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [None, None])])
    else_branch = helper.make_graph([helper.make_node("Abs", ["x"], ["y_else"])], "else", [],
                                    [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [None, None])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)], "branch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("name", ["fold_constants", "eliminate_dead_nodes", "simplify"])
def test_a_pass_leaves_the_model_it_is_given_untouched(name):
    # optimize() rolls a pass back by keeping the model before it: a pass that edits its input in
    # place (graph-surgeon rewrites If bodies' tensor attributes) would corrupt the rolled-back model.
    model = _branch_with_unnamed_tensor_attribute()
    before = model.SerializeToString()
    P.PASSES[name].func(model)
    assert model.SerializeToString() == before
