"""Inspection: layer table, shapes from shape inference, parameters, FLOPs/MACs computed by hand."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graph_models import _model, concat_model, conv_bn_model, custom_op_model, gemm_bn_model, matmul_model
from onnx import TensorProto, helper, numpy_helper

from enginesmith.graph.inspect import human, inspect_model


def _layer(info, name):
    return next(layer for layer in info.layers if layer.name == name)


def test_conv_flops_and_macs_by_hand():
    info = inspect_model(conv_bn_model())
    conv1 = _layer(info, "conv1")
    # out [1, 8, 8, 8] (N counted as 1); weights [8, 3, 3, 3]: each output is 3*3*3 = 27 multiply-adds.
    assert conv1.macs == 8 * 8 * 8 * 27 == 13824
    assert conv1.flops == 2 * 13824 + 8 * 8 * 8  # plus one bias add per output
    assert conv1.params == 8 * 27 + 8
    conv2 = _layer(info, "conv2")  # no bias
    assert conv2.macs == 8 * 8 * 8 * (8 * 9) and conv2.flops == 2 * conv2.macs
    assert conv1.outputs[0].shape == ["N", 8, 8, 8]
    assert [t.name for t in conv1.inputs] == ["x"] and [t.name for t in conv1.weights] == ["w1", "b1"]
    bn = _layer(info, "bn1")
    assert bn.macs == 512 and bn.flops == 1024 and bn.params == 32
    assert _layer(info, "residual").flops == 512 and _layer(info, "drop1").flops == 0


def test_symbolic_dims_take_given_sizes():
    one = inspect_model(conv_bn_model())
    four = inspect_model(conv_bn_model(), dims={"N": 4})
    assert _layer(four, "conv1").macs == 4 * _layer(one, "conv1").macs
    assert one.totals["symbolic_dims_as_1"] == ["N"] and four.totals["symbolic_dims_as_1"] == []
    assert any("N as 1" in note for note in one.notes)


def test_gemm_matmul_and_totals():
    gemm = _layer(inspect_model(gemm_bn_model(trans_b=1)), "fc")
    assert gemm.macs == 5 * 6 and gemm.flops == 2 * 30 + 5
    gemm_n = _layer(inspect_model(gemm_bn_model(trans_b=0, with_c=False)), "fc")
    assert gemm_n.macs == 30 and gemm_n.flops == 60
    mm = inspect_model(matmul_model())
    assert mm.layers[0].macs == 15 and mm.totals["params"] == 15 and mm.totals["param_bytes"] == 60

    info = inspect_model(conv_bn_model())
    assert info.totals["nodes"] == 9
    assert info.totals["params"] == sum(int(np.prod(t.dims)) for t in conv_bn_model().graph.initializer)
    assert info.totals["macs"] == sum(layer.macs or 0 for layer in info.layers)
    assert info.op_histogram == {"Conv": 2, "BatchNormalization": 2, "Relu": 2, "Dropout": 1, "Identity": 1, "Add": 1}
    assert [t.name for t in info.inputs] == ["x"] and info.outputs[0].shape == ["N", 8, 8, 8]
    json.dumps(info.to_dict())
    assert "9 nodes" in info.summary()


def test_pooling_transpose_conv_and_unknown_ops():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "wt")  # [Cin, Cout/g, kh, kw]
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["p", "wt"], ["up"], name="deconv", strides=[2, 2], pads=[1, 1, 0, 0]),
        helper.make_node("GlobalAveragePool", ["up"], ["gap"], name="gap"),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                   [helper.make_tensor_value_info("gap", TensorProto.FLOAT, [1, 2, 1, 1])], [w])
    info = inspect_model(model)
    pool, deconv, gap = info.layers
    assert pool.outputs[0].shape == [1, 4, 4, 4] and pool.flops == 64 * 4 and pool.macs == 0
    assert deconv.macs == 1 * (4 * 4) * (4 * 2 * 3 * 3)  # every input position times the whole kernel
    assert gap.flops == int(np.prod(deconv.outputs[0].shape))

    custom = inspect_model(custom_op_model())
    assert custom.layers[1].flops is None and custom.layers[1].op == "com.example:FancyActivation"
    assert custom.totals["not_counted"] == {"com.example:FancyActivation": 1}
    assert custom.totals["flops"] == 4  # the Relu


def test_constants_count_as_parameters_and_concat_shapes():
    info = inspect_model(concat_model())
    assert _layer(info, "cat").outputs[0].shape == ["N", 4, 9]
    assert _layer(info, "k1").params == 9
    assert info.totals["params"] == 10


def test_human_units():
    assert human(92) == "92" and human(1234567) == "1.23M" and human(None) == "?" and human(2.5e12) == "2.5T"


def test_samples_if_present():
    samples = pytest.importorskip("enginesmith.samples")
    if not hasattr(samples, "resnet50_like"):
        pytest.skip("samples.resnet50_like not available")
    model = samples.resnet50_like(image_size=64)
    info = inspect_model(model if isinstance(model, onnx.ModelProto) else onnx.load_model_from_string(model))
    assert info.op_histogram.get("Conv", 0) > 10 and info.totals["flops"] > info.totals["macs"] > 0
