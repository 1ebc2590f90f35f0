"""The low-load latency pieces of serve.py that need no server: a minimal HTTP client, a socket echo
of the same byte counts (the transport's floor), tritonclient's own encode/decode cost, and the
MobileNetV2-sized I/O probe model."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np


def _free_port() -> int:  # serve.py's servers take their ports here too
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ECHO_SERVER = """
import socket, sys
request_bytes, answer = int(sys.argv[2]), b"x" * int(sys.argv[3])
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
connection, _ = listener.accept()
connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buffer = memoryview(bytearray(request_bytes))
while True:
    got = 0
    while got < request_bytes:
        n = connection.recv_into(buffer[got:])
        if not n:
            sys.exit(0)
        got += n
    connection.sendall(answer)
"""


class RawHTTP:
    """The least a client can do: one prebuilt binary request sent with one sendmsg on a kept-alive
    socket (TCP_NODELAY), the answer read into a preallocated buffer. Served through it, the time
    above in-process is the server's and the wire's; tritonclient's extra cost is the difference."""

    def __init__(self, port: int, name: str, x: np.ndarray):
        header = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "parameters": {"binary_data_output": True}}).encode()
        self.head = (f"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(header) + x.nbytes}"
                     f"\r\nInference-Header-Content-Length: {len(header)}\r\n\r\n").encode() + header
        self.payload = x.tobytes()
        self.socket = socket.create_connection(("127.0.0.1", port))
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray(1 << 22)
        self.last_answer: tuple[dict[str, str], bytes, int] = ({}, b"", 0)  # headers, body, header bytes

    def __call__(self) -> None:
        self.socket.sendmsg([self.head, self.payload])
        view, got = memoryview(self.buffer), 0
        while (end := self.buffer.find(b"\r\n\r\n", 0, got)) < 0:
            got += self.socket.recv_into(view[got:])
        status, *lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        headers = {key.strip().lower(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
        length = int(headers["content-length"])
        while got < end + 4 + length:
            got += self.socket.recv_into(view[got:])
        if not status.startswith("HTTP/1.1 200"):
            raise RuntimeError(f"the server answered {status}")
        self.last_answer = (headers, bytes(self.buffer[end + 4:end + 4 + length]), end + 4)

    def request_bytes(self) -> int:
        return len(self.head) + len(self.payload)

    def close(self) -> None:
        self.socket.close()


class EchoFloor:
    """A process that reads a request of N bytes and answers M bytes over 127.0.0.1, doing nothing
    else: the transport's own round trip for the served request's sizes, on this machine now."""

    def __init__(self, request_bytes: int, answer_bytes: int):
        port = _free_port()
        self.process = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port), str(request_bytes), str(answer_bytes)])
        deadline = time.monotonic() + 30
        while True:
            try:
                self.socket = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = os.urandom(request_bytes)
        self.answer_bytes = answer_bytes
        self.buffer = memoryview(bytearray(answer_bytes))

    def __call__(self) -> None:
        self.socket.sendall(self.request)
        got = 0
        while got < self.answer_bytes:
            got += self.socket.recv_into(self.buffer[got:])

    def close(self) -> None:
        self.socket.close()
        self.process.wait(10)


def _p50_ms(call, runs: int) -> float:
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def client_costs(http_input, grpc_input, output: str, http_answer: tuple[dict, bytes, int], grpc_answer: bytes,
                 runs: int = 200) -> dict:
    """What tritonclient itself spends per request, without any I/O: building the request body
    (HTTP: JSON header + binary data joined; gRPC: the protobuf serialized) and reading the answer
    back to a numpy array (from the bytes a real answer had)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.grpc import service_pb2
    from tritonclient.grpc._utils import _get_inference_request

    headers, body, _ = http_answer
    header_length = int(headers["inference-header-content-length"])

    def grpc_encode() -> None:
        _get_inference_request("m", [grpc_input], "", "", None, 0, False, False, 0, None, None).SerializeToString()

    return {
        "http_encode": _p50_ms(lambda: httpclient.InferenceServerClient.generate_request_body([http_input]), runs),
        "http_decode": _p50_ms(lambda: httpclient.InferenceServerClient.parse_response_body(
            body, header_length=header_length).as_numpy(output), runs),
        "grpc_encode": _p50_ms(grpc_encode, runs),
        "grpc_decode": _p50_ms(lambda: grpcclient.InferResult(
            service_pb2.ModelInferResponse.FromString(grpc_answer)).as_numpy(output), runs),
    }


def image_io_probe(image_size: int, classes: int = 1000):
    """MobileNetV2-like's tensors (1x3xSxS in, 1x1000 out) around next to no compute (a mean per channel
    and a 3x1000 MatMul): served through it, everything but the engine costs what it costs the real model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, classes)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["logits"])],
        "image_io_probe",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [weight, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model
