"""Small ONNX models for the serving tests, and helpers to build engines and talk to a server."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import enginesmith as es
from conftest import _finish, make_mlp

# protocol datatype -> ONNX element type, for the every-datatype model
DATATYPE_ONNX = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
}


def make_every_dtype() -> onnx.ModelProto:
    """One input per datatype, in_<T>[batch, 2] -> out_<T>[batch, 4] = Concat(in, in): values kept exactly."""
    inputs, outputs, nodes = [], [], []
    for datatype, element in DATATYPE_ONNX.items():
        name = datatype.lower()
        inputs.append(helper.make_tensor_value_info(f"in_{name}", element, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", element, ["batch", 4]))
        nodes.append(helper.make_node("Concat", [f"in_{name}", f"in_{name}"], [f"out_{name}"], name=f"concat_{name}", axis=1))
    return _finish(helper.make_graph(nodes, "every_dtype", inputs, outputs))


def make_gather() -> onnx.ModelProto:
    """x[batch, 4] float, idx[batch, 1] int64 -> GatherElements(x, idx, axis=1): an index >= 4 makes ONNX Runtime raise."""
    graph = helper.make_graph(
        [helper.make_node("GatherElements", ["x", "idx"], ["picked"], name="pick", axis=1)],
        "gather",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("picked", TensorProto.FLOAT, ["batch", 1])],
    )
    return _finish(graph)


def make_slow(width: int = 512, layers: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x[batch, width] through ``layers`` square MatMuls: a model that keeps a CPU busy for milliseconds."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        current = f"h{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"], name="out"))
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)
    return _finish(graph)


def build_engine(model: onnx.ModelProto, folder: Path, name: str) -> Path:
    source = folder / f"{name}.onnx"
    onnx.save(model, source)
    path = folder / f"{name}.engine"
    es.build(source, verify=False, graph_passes=False, check_compatibility=False).save(path)
    return path


def mlp_model() -> onnx.ModelProto:
    return make_mlp()


def post(url: str, path: str, body: bytes, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    """A raw POST: status, headers, body."""
    host = url.removeprefix("http://")
    connection = http.client.HTTPConnection(host, timeout=timeout)
    try:
        connection.request("POST", path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def get(url: str, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def json_request(inputs: dict[str, np.ndarray], datatype: str = "FP32") -> bytes:
    return json.dumps({"inputs": [{"name": n, "shape": list(v.shape), "datatype": datatype, "data": v.ravel().tolist()}
                                  for n, v in inputs.items()]}).encode()


def metric(text: str, name: str, model: str) -> float:
    """One sample of the Prometheus text for a model."""
    prefix = f'{name}{{model="{model}",version="1"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    raise AssertionError(f"{name} for {model} not in the metrics page")
