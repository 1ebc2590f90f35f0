"""Sample ONNX models built in code, with seeded random weights, for tests, the demo and benchmarks.

Every builder returns an ``onnx.ModelProto`` (opset 17, IR version 9, float32) that passes
``onnx.checker.check_model(model, full_check=True)``. Weights come from ``numpy.random.default_rng(seed)``:
convolutions are He-normal, BatchNormalization nodes are kept as real BN nodes with realistic running
statistics (graph passes fold them later), and every node has a readable name such as
``stage2.block1.conv1`` (its output tensor carries the same name).

    from enginesmith import samples
    model = samples.resnet50_like(image_size=224)
    samples.save(model, "models/resnet50.onnx")
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["small_cnn", "two_input_two_output", "mobilenet_v2_like", "resnet50_like", "tiny_mlp", "save", "BUILDERS"]

OPSET = 17
IR_VERSION = 9


class _Graph:
    """A tiny graph builder: initializers, uniquely named nodes and the usual layer blocks."""

    def __init__(self, name: str, seed: int, dynamic_batch: bool) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.batch: int | str = "batch" if dynamic_batch else 1
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._used: set[str] = set()
        self._consts: dict[tuple, str] = {}

    # -- names, tensors, nodes ---------------------------------------------------------------
    def unique(self, base: str) -> str:
        name, n = base, 1
        while name in self._used:
            n += 1
            name = f"{base}_{n}"
        self._used.add(name)
        return name

    def input(self, name: str, *dims: int) -> str:
        self._used.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [self.batch, *dims]))
        return name

    def output(self, tensor: str, *dims: int) -> None:
        self.outputs.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, [self.batch, *dims]))

    def init(self, name: str, array: np.ndarray) -> str:
        name = self.unique(name)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def const(self, name: str, value, dtype=np.float32) -> str:
        """A scalar initializer, shared by every node that uses the same value."""
        key = (name, dtype, value)
        if key not in self._consts:
            self._consts[key] = self.init(name, np.array(value, dtype=dtype))
        return self._consts[key]

    def node(self, op: str, inputs: list[str], name: str, output: str | None = None, **attrs) -> str:
        """Add a node named ``name`` (made unique); its single output has the same name unless given."""
        name = self.unique(name)
        out = output or name
        if output:
            self._used.add(output)
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    # -- random weights ----------------------------------------------------------------------
    def normal(self, shape, std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    # -- layers ------------------------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, k: int, name: str, stride: int = 1, group: int = 1,
             bias: bool = False, gain: float = 1.0) -> str:
        fan_in = cin // group * k * k
        w = self.init(f"{name}.weight", self.normal((cout, cin // group, k, k), gain * np.sqrt(2.0 / fan_in)))
        inputs = [x, w]
        if bias:
            inputs.append(self.init(f"{name}.bias", self.normal((cout,), 0.05)))
        p = k // 2
        return self.node("Conv", inputs, name, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[p, p, p, p], group=group, dilations=[1, 1])

    def bn(self, x: str, c: int, name: str) -> str:
        rng = self.rng
        params = [
            self.init(f"{name}.scale", (1.0 + 0.1 * rng.standard_normal(c)).astype(np.float32)),
            self.init(f"{name}.bias", (0.05 * rng.standard_normal(c)).astype(np.float32)),
            self.init(f"{name}.running_mean", (0.05 * rng.standard_normal(c)).astype(np.float32)),
            self.init(f"{name}.running_var", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        ]
        return self.node("BatchNormalization", [x, *params], name, epsilon=1e-5, momentum=0.9)

    def act(self, x: str, kind: str | None, name: str) -> str:
        if kind is None:
            return x
        if kind == "relu":
            return self.node("Relu", [x], f"{name}.relu")
        if kind == "relu6":
            return self.node("Clip", [x, self.const("relu6.min", 0.0), self.const("relu6.max", 6.0)], f"{name}.relu6")
        raise ValueError(f"unknown activation {kind!r}")

    def conv_bn_act(self, x: str, cin: int, cout: int, k: int, name: str, stride: int = 1, group: int = 1,
                    act: str | None = "relu", gain: float = 1.0) -> str:
        """Conv (no bias) ``name`` -> BatchNormalization ``name.bn`` -> activation ``name.relu``/``name.relu6``."""
        y = self.conv(x, cin, cout, k, name, stride=stride, group=group, gain=gain)
        return self.act(self.bn(y, cout, f"{name}.bn"), act, name)

    def gemm(self, x: str, cin: int, cout: int, name: str, output: str | None = None) -> str:
        """A PyTorch-style Linear: Gemm with weight [cout, cin] and transB=1."""
        w = self.init(f"{name}.weight", self.normal((cout, cin), np.sqrt(1.0 / cin)))
        b = self.init(f"{name}.bias", self.normal((cout,), 0.05))
        return self.node("Gemm", [x, w, b], name, output=output, transB=1)

    def pool_flatten(self, x: str, name: str) -> str:
        """GlobalAveragePool ``name`` -> Flatten ``name.flatten`` ([N, C, H, W] -> [N, C])."""
        return self.node("Flatten", [self.node("GlobalAveragePool", [x], name)], f"{name}.flatten", axis=1)

    # -- the model ---------------------------------------------------------------------------
    def model(self, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits, doc_string=doc)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="enginesmith.samples", doc_string=doc)
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


def small_cnn(num_classes: int = 10, image_size: int = 8, channels: int = 1, dynamic_batch: bool = True,
              seed: int = 0) -> onnx.ModelProto:
    """image[batch, channels, S, S] -> Conv/BN/Relu -> MaxPool -> Conv/BN/Relu -> GAP -> Dropout -> Gemm -> Softmax -> probs."""
    g = _Graph("small_cnn", seed, dynamic_batch)
    x = g.input("image", channels, image_size, image_size)
    x = g.conv_bn_act(x, channels, 8, 3, "conv1")
    x = g.node("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    x = g.conv_bn_act(x, 8, 16, 3, "conv2")
    x = g.pool_flatten(x, "gap")
    # Inference-time Dropout (training_mode False): an identity that graph passes remove.
    x = g.node("Dropout", [x, g.const("dropout.ratio", 0.25), g.const("dropout.training_mode", False, np.bool_)],
               "dropout")
    x = g.gemm(x, 16, num_classes, "fc")
    g.node("Softmax", [x], "softmax", output="probs", axis=-1)
    g.output("probs", num_classes)
    return g.model(small_cnn.__doc__)


def two_input_two_output(dynamic_batch: bool = True, seed: int = 0) -> onnx.ModelProto:
    """left, right[batch, 1, 30, 40] -> depthwise-separable conv each -> Concat -> score[batch, 1], features[batch, 4]."""
    g = _Graph("two_input_two_output", seed, dynamic_batch)
    branches = []
    for side in ("left", "right"):
        x = g.input(side, 1, 30, 40)
        x = g.node("Relu", [g.conv(x, 1, 8, 3, f"{side}.stem", bias=True)], f"{side}.stem.relu")
        x = g.conv(x, 8, 8, 3, f"{side}.depthwise", group=8, bias=True)  # depthwise: group = channels
        x = g.conv(x, 8, 16, 1, f"{side}.pointwise", bias=True)
        branches.append(g.node("Relu", [x], f"{side}.relu"))
    x = g.node("Concat", branches, "concat", axis=1)  # [batch, 32, 30, 40]

    score = g.gemm(g.pool_flatten(x, "score.gap"), 32, 1, "score.fc")
    g.node("Sigmoid", [score], "score.sigmoid", output="score")

    f = g.node("Relu", [g.conv(x, 32, 32, 3, "features.conv", stride=2, bias=True)], "features.relu")
    f = g.pool_flatten(f, "features.gap")
    g.gemm(f, 32, 4, "features.fc", output="features")
    g.output("score", 1)
    g.output("features", 4)
    return g.model(two_input_two_output.__doc__)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNet channel rounding: the nearest multiple of ``divisor``, never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


_MOBILENET_V2 = [  # expansion t, channels c, repeats n, first stride s
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]


def mobilenet_v2_like(image_size: int = 224, num_classes: int = 1000, width: float = 1.0,
                      dynamic_batch: bool = True, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2: image[batch, 3, S, S] -> stem -> 17 inverted residuals -> 1x1 conv -> GAP -> Gemm -> logits."""
    g = _Graph("mobilenet_v2_like", seed, dynamic_batch)
    x = g.input("image", 3, image_size, image_size)
    cin = _make_divisible(32 * width)
    x = g.conv_bn_act(x, 3, cin, 3, "stem.conv", stride=2, act="relu6")
    for stage, (t, c, n, s) in enumerate(_MOBILENET_V2, start=1):
        cout = _make_divisible(c * width)
        for i in range(n):
            name, stride = f"stage{stage}.block{i + 1}", s if i == 0 else 1
            hidden = cin * t
            y = x
            if t != 1:
                y = g.conv_bn_act(y, cin, hidden, 1, f"{name}.expand", act="relu6")
            y = g.conv_bn_act(y, hidden, hidden, 3, f"{name}.depthwise", stride=stride, group=hidden, act="relu6")
            residual = stride == 1 and cin == cout
            # Linear bottleneck; the projection of a residual block is scaled down so depth does not blow up.
            y = g.conv_bn_act(y, hidden, cout, 1, f"{name}.project", act=None, gain=0.5 if residual else 1.0)
            x = g.node("Add", [x, y], f"{name}.add") if residual else y
            cin = cout
    last = _make_divisible(1280 * max(1.0, width))
    x = g.conv_bn_act(x, cin, last, 1, "head.conv", act="relu6")
    g.gemm(g.pool_flatten(x, "head.gap"), last, num_classes, "classifier", output="logits")
    g.output("logits", num_classes)
    return g.model(mobilenet_v2_like.__doc__)


def resnet50_like(image_size: int = 224, num_classes: int = 1000, dynamic_batch: bool = True,
                  seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 v1.5: image[batch, 3, S, S] -> 7x7 stem + MaxPool -> 16 bottlenecks [3, 4, 6, 3] -> GAP -> Gemm -> logits."""
    g = _Graph("resnet50_like", seed, dynamic_batch)
    x = g.input("image", 3, image_size, image_size)
    x = g.conv_bn_act(x, 3, 64, 7, "stem.conv", stride=2)
    x = g.node("MaxPool", [x], "stem.maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        cout = width * 4
        for i in range(blocks):
            name, stride = f"stage{stage}.block{i + 1}", 2 if i == 0 and stage > 1 else 1
            y = g.conv_bn_act(x, cin, width, 1, f"{name}.conv1")
            y = g.conv_bn_act(y, width, width, 3, f"{name}.conv2", stride=stride)  # v1.5: stride in the 3x3
            # The last BN-ed conv of the branch is scaled down so the residual sum stays well-conditioned.
            y = g.conv_bn_act(y, width, cout, 1, f"{name}.conv3", act=None, gain=0.25)
            shortcut = x
            if stride != 1 or cin != cout:
                shortcut = g.conv_bn_act(x, cin, cout, 1, f"{name}.downsample", stride=stride, act=None)
            x = g.node("Relu", [g.node("Add", [shortcut, y], f"{name}.add")], f"{name}.relu")
            cin = cout
    g.gemm(g.pool_flatten(x, "head.gap"), cin, num_classes, "fc", output="logits")
    g.output("logits", num_classes)
    return g.model(resnet50_like.__doc__)


def tiny_mlp(in_features: int = 16, hidden: int = 32, out_features: int = 4, dynamic_batch: bool = True,
             seed: int = 0) -> onnx.ModelProto:
    """x[batch, in_features] -> MatMul/Add -> Relu -> MatMul/Add -> y[batch, out_features]."""
    g = _Graph("tiny_mlp", seed, dynamic_batch)
    x = g.input("x", in_features)
    for i, (cin, cout) in enumerate(((in_features, hidden), (hidden, out_features)), start=1):
        w = g.init(f"fc{i}.weight", g.normal((cin, cout), np.sqrt(2.0 / cin)))
        b = g.init(f"fc{i}.bias", g.normal((cout,), 0.05))
        x = g.node("Add", [g.node("MatMul", [x, w], f"fc{i}.matmul"), b], f"fc{i}.add",
                   output="y" if i == 2 else None)
        if i == 1:
            x = g.node("Relu", [x], "fc1.relu")
    g.output("y", out_features)
    return g.model(tiny_mlp.__doc__)


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` to ``path`` (parent folders are created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "small_cnn": small_cnn,
    "two_input_two_output": two_input_two_output,
    "mobilenet_v2_like": mobilenet_v2_like,
    "resnet50_like": resnet50_like,
    "tiny_mlp": tiny_mlp,
}
