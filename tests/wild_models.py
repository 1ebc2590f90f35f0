"""Small ONNX models that behave like models from the wild: they run only on some input shapes or values."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def strided_concat(stride: int = 2, channels: int = 3, seed: int = 0) -> onnx.ModelProto:
    """x[-1, C, ?, ?] -> Concat(x, Resize(Conv stride s)(x)): runs only when H and W are multiples of ``stride``.

    The unnamed spatial dims are written as '?', as some exporters do, and the batch as '-1'.
    """
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((channels, channels, stride, stride)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, stride, stride], np.float32), "scales")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["down"], name="down_conv", kernel_shape=[stride, stride],
                         strides=[stride, stride]),
        helper.make_node("Resize", ["down", "", "scales"], ["up"], name="upsample", mode="nearest"),
        helper.make_node("Concat", ["x", "up"], ["cat"], name="skip_concat", axis=1),
        # An exporter leftover the remove_training_nodes pass removes, so there is a pass to check.
        helper.make_node("Identity", ["cat"], ["y"], name="leftover_identity"),
    ]
    graph = helper.make_graph(
        nodes, "strided_concat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["-1", channels, "?", "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["-1", 2 * channels, "?", "?"])],
        [weight, scales],
    )
    return _finish(graph)


def rate_branch(opaque: bool = False) -> onnx.ModelProto:
    """x[batch, 16], sr: int64 scalar -> If(sr == 16000): x * 2, else a Reshape to [-1, 7] that fails.

    Like a voice-activity model whose LSTM branch is chosen by the sample rate. With ``opaque`` the
    condition is ``sr * sr == 16000**2``, which enginesmith cannot read a value from.
    """
    rate = numpy_helper.from_array(np.array(16000**2 if opaque else 16000, np.int64), "rate")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    bad_shape = numpy_helper.from_array(np.array([-1, 7], np.int64), "bad_shape")
    then_branch = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y_then"], name="scale")], "then", [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [None, None])])
    else_branch = helper.make_graph(
        [helper.make_node("Reshape", ["x", "bad_shape"], ["y_else"], name="reshape_8k")], "else", [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [None, None])])
    compared = "sr"
    nodes = []
    if opaque:
        nodes.append(helper.make_node("Mul", ["sr", "sr"], ["sr2"], name="square"))
        compared = "sr2"
    nodes += [
        helper.make_node("Equal", [compared, "rate"], ["is_16k"], name="is_16k"),
        helper.make_node("If", ["is_16k"], ["y"], name="rate_if", then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes, "rate_branch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
        [rate, two, bad_shape],
    )
    return _finish(graph)


def framed_rate_branch() -> onnx.ModelProto:
    """audio[batch, ?], sr: int64 scalar -> If(sr == 16000): audio as frames of 512, else a Reshape that fails.

    Runs only on 16 kHz audio whose length is a multiple of 512, like a VAD model taking one window.
    """
    rate = numpy_helper.from_array(np.array(16000, np.int64), "rate")
    frames = numpy_helper.from_array(np.array([-1, 512], np.int64), "frames")
    bad_shape = numpy_helper.from_array(np.array([-1, 7], np.int64), "bad_shape")
    then_branch = helper.make_graph(
        [helper.make_node("Reshape", ["audio", "frames"], ["y_then"], name="frame_16k")], "then", [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [None, None])])
    else_branch = helper.make_graph(
        [helper.make_node("Reshape", ["audio", "bad_shape"], ["y_else"], name="frame_other")], "else", [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [None, None])])
    graph = helper.make_graph(
        [helper.make_node("Equal", ["sr", "rate"], ["is_16k"], name="is_16k"),
         helper.make_node("If", ["is_16k"], ["y"], name="rate_if", then_branch=then_branch, else_branch=else_branch)],
        "framed_rate_branch",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "?"]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
        [rate, frames, bad_shape],
    )
    return _finish(graph)


def recurrent_state_vad(named: bool = True, hidden: int = 4, pad: int = 32, seed: int = 0) -> onnx.ModelProto:
    """audio[B, T], state[2, B, hidden], sr -> If(sr == 16000): an LSTM step whose initial_h is a layer
    of ``state`` picked inside a nested If, on the mean of the reflect-padded audio (T must exceed ``pad``).

    Like Silero VAD: the state's batch is axis 1, and with ``named`` off every dynamic dim is unnamed,
    so nothing but the LSTM says that axis 1 of ``state`` is the batch.
    """
    rng = np.random.default_rng(seed)
    consts = [
        numpy_helper.from_array(np.array(16000, np.int64), "rate"),
        numpy_helper.from_array(np.array([0, pad, 0, pad], np.int64), "pads"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array(0, np.int64), "layer0"),
        numpy_helper.from_array(np.array(1, np.int64), "layer1"),
        numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, 1)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "R"),
    ]

    def branch(name: str, nodes: list, output: str) -> onnx.GraphProto:
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, [None, None])])

    pick = helper.make_node("If", ["is_16k"], ["h_layer"], name="pick_layer",
                            then_branch=branch("first", [helper.make_node("Gather", ["state", "layer0"], ["h_first"])], "h_first"),
                            else_branch=branch("second", [helper.make_node("Gather", ["state", "layer1"], ["h_second"])], "h_second"))
    step = [
        helper.make_node("Pad", ["audio", "pads"], ["padded"], name="stft_pad", mode="reflect"),
        helper.make_node("ReduceMean", ["padded"], ["level"], axes=[1], keepdims=1),
        helper.make_node("Unsqueeze", ["level", "axis0"], ["x_seq"]),
        pick,
        helper.make_node("Unsqueeze", ["h_layer", "axis0"], ["h0"]),
        helper.make_node("LSTM", ["x_seq", "W", "R", "", "", "h0"], ["", "h_n"], name="rnn", hidden_size=hidden),
        helper.make_node("Squeeze", ["h_n", "axis0"], ["y_then"]),
    ]
    fallback = [helper.make_node("Gather", ["state", "layer0"], ["y_else"])]
    batch, time = ("batch", "sequence") if named else ("?", "?")
    graph = helper.make_graph(
        [helper.make_node("Equal", ["sr", "rate"], ["is_16k"], name="is_16k"),
         helper.make_node("If", ["is_16k"], ["y"], name="rate_if",
                          then_branch=branch("then", step, "y_then"), else_branch=branch("else", fallback, "y_else"))],
        "recurrent_state_vad",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [batch, time]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, batch if named else "?", hidden]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
        consts,
    )
    return _finish(graph)


def text_line_recognizer(seed: int = 0) -> onnx.ModelProto:
    """x[?, 3, ?, ?] -> Conv over the full 48-pixel height -> Squeeze(height) -> [N, W, 8] per-column scores.

    Like an OCR recognizer (PP-OCR's SVTR, a CRNN): the height must pool down to exactly 1, so no
    square size runs and only a text-line crop (height 48) does.
    """
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((8, 3, 48, 1)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([2], np.int64), "height_axis")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["columns"], name="height_conv", kernel_shape=[48, 1], strides=[48, 1]),
        helper.make_node("Squeeze", ["columns", "height_axis"], ["sequence"], name="drop_height"),
        helper.make_node("Transpose", ["sequence"], ["y"], name="to_time_major", perm=[0, 2, 1]),
    ]
    graph = helper.make_graph(
        nodes, "text_line_recognizer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", 3, "?", "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["?", "?", 8])],
        [weight, axes],
    )
    return _finish(graph)
