"""Compatibility reports: ONNX Runtime asked directly, TensorRT from NVIDIA's published operator tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
from graph_models import _model, concat_model, conv_bn_model, custom_op_model
from onnx import TensorProto, helper, numpy_helper

from enginesmith.backends import BuildOptions, get_backend
from enginesmith.errors import BackendUnavailableError, UnsupportedModelError
from enginesmith.graph.compat import (
    IncompatibleModelError,
    check_buildable,
    compatibility_report,
    parse_target,
    tensorrt_table,
)

TARGETS = ["onnxruntime", "tensorrt:8.6", "tensorrt:10"]


def node(report, name):
    return next(n for n in report.nodes if n.node == name)


@pytest.mark.parametrize("target", TARGETS)
def test_unknown_op_is_unsupported_everywhere(target):
    report = compatibility_report(custom_op_model(), target)
    fancy = node(report, "fancy")
    assert fancy.status == "unsupported" and fancy.op == "com.example:FancyActivation"
    assert fancy.fix and fancy.fixed_by is None
    assert node(report, "relu").status == "supported"
    assert not report.buildable and report.counts == {"supported": 1, "conditional": 0, "unsupported": 1}
    assert "NOT buildable" in report.summary() and "'fancy'" in report.summary()
    json.dumps(report.to_dict())


def test_onnx_runtime_reason_is_its_own_error():
    fancy = node(compatibility_report(custom_op_model(), "onnxruntime"), "fancy")
    assert "is not a registered function/op" in fancy.reason


@pytest.mark.parametrize("target", TARGETS)
def test_supported_model_lists_the_fixes_build_applies(target):
    report = compatibility_report(conv_bn_model(), target)
    assert report.buildable and report.counts["unsupported"] == 0
    assert node(report, "bn1").fixed_by == "fold_batchnorm" and "conv1" in node(report, "bn1").fix
    assert node(report, "drop1").fixed_by == "remove_training_nodes"
    assert node(report, "conv1").fixed_by is None


def test_check_buildable_raises_with_the_report():
    with pytest.raises(IncompatibleModelError) as info:
        check_buildable(custom_op_model(), "onnxruntime")
    assert isinstance(info.value, UnsupportedModelError)
    assert "'fancy' (com.example:FancyActivation)" in str(info.value) and "enginesmith inspect" in str(info.value)
    assert info.value.report.blocking[0].node == "fancy"
    assert check_buildable(conv_bn_model(), "onnxruntime").buildable


def test_onnx_runtime_op_support_is_per_node():
    support = get_backend("onnxruntime").op_support(custom_op_model(), BuildOptions())
    assert support["relu"][0] == "supported" and support["fancy"][0] == "unsupported"


def test_tensorrt_tables_cite_their_source():
    for version, commit in (("8.6", "6ba67d34"), ("10", "96e78110")):
        table = tensorrt_table(version)
        src = table["source"]
        assert src["repository"] == "https://github.com/onnx/onnx-tensorrt" and src["file"] == "docs/operators.md"
        assert src["commit"].startswith(commit) and src["ref"].startswith("release/")
        ops = table["operators"]
        assert ops["Conv"]["supported"] and ops["BatchNormalization"]["supported"] and not ops["Bernoulli"]["supported"]
        assert len(ops) > 150
    assert tensorrt_table("8.6")["opset"]["max"] == 17 and tensorrt_table("10")["opset"] == {"min": 9, "max": 20}
    assert tensorrt_table("10.3")["tensorrt_version"] == "10"
    with pytest.raises(BackendUnavailableError, match="no TensorRT operator table for version '7.1'"):
        tensorrt_table("7.1")


def _slice_model(axes_from: str):
    inits = [numpy_helper.from_array(np.array([0], np.int64), "starts"),
             numpy_helper.from_array(np.array([2], np.int64), "ends")]
    nodes = []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])]
    if axes_from == "constant":
        nodes += [helper.make_node("Constant", [], ["a0"], name="a0", value=numpy_helper.from_array(np.array([0], np.int64))),
                  helper.make_node("Add", ["a0", "one"], ["axes"], name="axes_add")]
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    else:
        inputs.append(helper.make_tensor_value_info("axes", TensorProto.INT64, [1]))
    nodes.append(helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="slice"))
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


@pytest.mark.parametrize("version", ["8.6", "10"])
def test_tensorrt_restrictions_are_checked(version):
    target = f"tensorrt:{version}"
    runtime = compatibility_report(_slice_model("input"), target)
    assert node(runtime, "slice").status == "unsupported" and "build-time constant" in node(runtime, "slice").reason
    assert not runtime.buildable
    folded = compatibility_report(_slice_model("constant"), target)
    entry = node(folded, "slice")
    assert entry.status == "conditional" and entry.fixed_by == "fold_constants" and folded.buildable
    assert "initializer" in entry.fix

    pool = _model([helper.make_node("MaxPool", ["x"], ["y", "idx"], name="pool", kernel_shape=[2, 2])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                   helper.make_tensor_value_info("idx", TensorProto.INT64, None)])
    assert node(compatibility_report(pool, target), "pool").status == "unsupported"

    resize = _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", mode="cubic")],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                    [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    entry = node(compatibility_report(resize, target), "resize")
    assert entry.status == "unsupported" and "'cubic'" in entry.reason


def test_tensorrt_types_opsets_and_table_entries():
    gather = _model([helper.make_node("Gather", ["x", "i"], ["y"], name="gather")],
                    [helper.make_tensor_value_info("x", TensorProto.INT64, [5]),
                     helper.make_tensor_value_info("i", TensorProto.INT64, [2])],
                    [helper.make_tensor_value_info("y", TensorProto.INT64, [2])])
    old = node(compatibility_report(gather, "tensorrt:8.6"), "gather")
    assert old.status == "conditional" and "cast down to int32" in old.reason
    assert node(compatibility_report(gather, "tensorrt:10"), "gather").status == "supported"

    matmul = _model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                    [helper.make_tensor_value_info("a", TensorProto.INT32, [2, 2]),
                     helper.make_tensor_value_info("b", TensorProto.INT32, [2, 2])],
                    [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 2])])
    entry = node(compatibility_report(matmul, "tensorrt:10"), "mm")
    assert entry.status == "unsupported" and "int32 input" in entry.reason

    unique = _model([helper.make_node("Unique", ["x"], ["y"], name="uniq")],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    assert "listed as not supported" in node(compatibility_report(unique, "tensorrt:10"), "uniq").reason

    gelu = _model([helper.make_node("Gelu", ["x"], ["y"], name="gelu")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])], opset=20)
    report86 = compatibility_report(gelu, "tensorrt:8.6")
    assert "not in the ONNX-TensorRT 8.6 operator table" in node(report86, "gelu").reason
    assert report86.model[0].fixed_by == "convert_opset" and "opset 20" in report86.model[0].reason
    assert node(compatibility_report(gelu, "tensorrt:10"), "gelu").status == "supported"


def test_targets():
    assert parse_target("TensorRT:8.6") == ("tensorrt", "8.6") and parse_target("ort") == ("onnxruntime", None)
    assert compatibility_report(concat_model(), "tensorrt").target_version == "10"
    torch_report = compatibility_report(concat_model(), "torch")  # the PyTorch backend asks onnx2torch per node
    assert torch_report.target == "torch" and torch_report.buildable and len(torch_report.nodes) == 6
    with pytest.raises(BackendUnavailableError, match="unknown target 'tflite'"):
        compatibility_report(concat_model(), "tflite")


class _FakeBackend:
    """Just enough of a Backend for the registry (availability, version, op_support)."""

    display_name = "Fake"

    def __init__(self, name, version, support=None):
        self.name, self._version, self._support = name, version, support

    def available(self):
        from enginesmith.backends import Availability

        return Availability(True)

    def version(self):
        return self._version

    def op_support(self, model, options):
        if self._support is None:
            raise NotImplementedError("Fake cannot report per-node operator support")
        return self._support(model)


@pytest.fixture
def fake_backends(monkeypatch):
    import enginesmith.backends as registry

    def add(backend):
        monkeypatch.setitem(registry.BACKENDS, backend.name, "unused:Unused")
        monkeypatch.setitem(registry._instances, backend.name, backend)

    return add


def test_any_backend_with_op_support_is_a_target(fake_backends):
    fake_backends(_FakeBackend("torch", "2.13", lambda m: {"relu": ("supported", "ok"),
                                                           "fancy": ("unsupported", "no converter")}))
    report = compatibility_report(custom_op_model(), "torch")
    assert report.target == "torch" and node(report, "fancy").reason == "no converter" and not report.buildable


def test_tensorrt_backend_without_op_support_falls_back_to_its_versions_table(fake_backends):
    fake_backends(_FakeBackend("tensorrt", "8.6.1.6"))
    assert compatibility_report(concat_model(), "tensorrt").target_version == "8.6"
    # A backend that cannot report does not block a build.
    fake_backends(_FakeBackend("other", "1.0"))
    assert check_buildable(custom_op_model(), "other").notes


@pytest.mark.parametrize("target", TARGETS)
def test_sample_models_are_buildable(target):
    samples = pytest.importorskip("enginesmith.samples")
    small = compatibility_report(samples.small_cnn(), target)
    assert small.buildable and small.counts["unsupported"] == 0
    assert node(small, "dropout").fixed_by == "remove_training_nodes"
    assert node(small, "conv1.bn").fixed_by == "fold_batchnorm"
    assert compatibility_report(samples.two_input_two_output(), target).buildable
