"""enginesmith serve under bad input: each mistake gets its own clear error, none crashes the server or
touches other requests; a bounded load test mixing good and bad requests."""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("aiohttp", reason="serving needs the 'serve' extra")
httpclient = pytest.importorskip("tritonclient.http", reason="the serving tests use tritonclient[http]")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="the serving tests use tritonclient")

from tritonclient.utils import InferenceServerException  # noqa: E402

import enginesmith as es  # noqa: E402
from serve_models import build_engine, get, json_request, make_gather, make_slow, metric, mlp_model, post  # noqa: E402

PORTS = dict(http_port=0, grpc_port=0, metrics_port=0)
INFER = "/v2/models/mlp/infer"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_bad")
    return {
        "mlp": build_engine(mlp_model(), folder, "mlp"),
        "gather": build_engine(make_gather(), folder, "gather"),
        "slow": build_engine(make_slow(), folder, "slow"),
    }


@pytest.fixture(scope="module")
def server(engines):
    with es.serve([engines["mlp"], engines["gather"]], max_request_bytes=4096, max_queue_delay_us=2000, **PORTS) as handle:
        yield handle


@pytest.fixture(scope="module")
def reference(engines):
    engine = es.load(engines["mlp"])
    yield engine
    engine.close()


def _x(rows: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 6)).astype(np.float32)


def _error(status_headers_body) -> tuple[int, str]:
    status, _, body = status_headers_body
    return status, json.loads(body)["error"]


def _assert_still_serving(server, reference) -> None:
    status, _, body = post(server.url, INFER, json_request({"x": _x(3, 42)}))
    assert status == 200
    got = np.array(json.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(got, reference(x=_x(3, 42))["probs"], rtol=1e-6)


def _binary_body(header: dict, raw: bytes, header_length: int | None = None) -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    length = len(text) if header_length is None else header_length
    return text + raw, {"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"}


def test_malformed_json(server, reference):
    status, message = _error(post(server.url, INFER, b'{"inputs": [ {"name": "x",'))
    assert status == 400 and "not valid JSON" in message
    status, message = _error(post(server.url, INFER, b'[1, 2]'))
    assert status == 400 and "'inputs' list" in message
    status, message = _error(post(server.url, INFER, b'{"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP32", "data": ["a", 1, 2, 3, 4, 5]}]}'))
    assert status == 400 and 'JSON value "a"' in message
    _assert_still_serving(server, reference)


def test_unknown_model_or_version(server, reference):
    status, message = _error(post(server.url, "/v2/models/nope/infer", json_request({"x": _x()})))
    assert status == 404 and "unknown model 'nope'" in message and "'mlp'" in message
    status, message = _error(post(server.url, "/v2/models/mlp/versions/3/infer", json_request({"x": _x()})))
    assert status == 404 and "no version '3'" in message
    assert get(server.url, "/v2/models/nope")[0] == 404
    assert get(server.url, "/v2/no/such/route")[0] == 404
    grpc = grpcclient.InferenceServerClient(server.grpc_address)
    given = grpcclient.InferInput("x", [2, 6], "FP32")
    given.set_data_from_numpy(_x())
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as caught:
        grpc.infer("nope", [given])
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    _assert_still_serving(server, reference)


@pytest.mark.parametrize("inputs, datatype, expected", [
    ({"image": _x()}, "FP32", "unknown input 'image': model 'mlp' takes x (float32[batch, 6])"),
    ({"x": _x()}, "FP64", "input 'x' is FP64, but model 'mlp' takes FP32"),
    ({"x": np.zeros((2, 5), np.float32)}, "FP32", "(axis 1 is 5, the engine needs 6)"),
    ({"x": np.zeros((2, 3, 6), np.float32)}, "FP32", "must have rank 2"),
    ({}, "FP32", "missing input 'x'"),
    ({"x": _x(), "extra": _x()}, "FP32", "unknown input 'extra'"),
], ids=["wrong-name", "wrong-dtype", "wrong-dim", "wrong-rank", "missing", "extra"])
def test_inputs_that_do_not_match_the_signature(server, reference, inputs, datatype, expected):
    status, message = _error(post(server.url, INFER, json_request(inputs, datatype)))
    assert status == 400 and expected in message
    _assert_still_serving(server, reference)


def test_wrong_dtype_and_shape_over_grpc(server, reference):
    client = grpcclient.InferenceServerClient(server.grpc_address)
    given = grpcclient.InferInput("x", [2, 6], "INT32")
    given.set_data_from_numpy(np.zeros((2, 6), np.int32))
    with pytest.raises(InferenceServerException, match="is INT32, but model 'mlp' takes FP32") as caught:
        client.infer("mlp", [given])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    given = grpcclient.InferInput("x", [2, 7], "FP32")
    given.set_data_from_numpy(np.zeros((2, 7), np.float32))
    with pytest.raises(InferenceServerException, match="axis 1 is 7"):
        client.infer("mlp", [given])
    _assert_still_serving(server, reference)


def test_binary_sizes_that_disagree_with_the_header(server, reference):
    raw = _x().tobytes()
    tensor = {"name": "x", "shape": [2, 6], "datatype": "FP32"}
    # binary_data_size larger than the binary part
    body, headers = _binary_body({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw) + 8}}]}, raw)
    status, message = _error(post(server.url, INFER, body, headers))
    assert status == 400 and "binary_data_size says 56 bytes" in message
    # bytes left over that no input accounts for
    body, headers = _binary_body({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]}, raw + b"\0" * 4)
    status, message = _error(post(server.url, INFER, body, headers))
    assert status == 400 and "4 bytes of binary data" in message
    # a size that matches the body but not the shape
    body, headers = _binary_body({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw) - 4}}]}, raw[:-4])
    status, message = _error(post(server.url, INFER, body, headers))
    assert status == 400 and "is 48 bytes, the binary data is 44" in message
    # a header length past the end of the body, and one that is not a number
    body, headers = _binary_body({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]}, raw, 10_000)
    status, message = _error(post(server.url, INFER, body, headers))
    assert status == 400 and "Inference-Header-Content-Length is 10000" in message
    headers["Inference-Header-Content-Length"] = "ten"
    assert _error(post(server.url, INFER, body, headers))[0] == 400
    _assert_still_serving(server, reference)


def test_body_over_the_size_limit_is_413(server, reference):
    big = json_request({"x": _x(200)})
    assert len(big) > 4096
    status, message = _error(post(server.url, INFER, big))
    assert status == 413 and "--max-request-bytes" in message
    # without a Content-Length (chunked), aiohttp's own limit answers, still as JSON
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    connection.request("POST", INFER, body=iter([big[:3000], big[3000:]]), encode_chunked=True,
                       headers={"Transfer-Encoding": "chunked"})
    response = connection.getresponse()
    assert response.status == 413 and "--max-request-bytes" in json.loads(response.read())["error"]
    connection.close()
    # gRPC: the same limit on the message size
    client = grpcclient.InferenceServerClient(server.grpc_address)
    given = grpcclient.InferInput("x", [200, 6], "FP32")
    given.set_data_from_numpy(_x(200))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("mlp", [given])
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    _assert_still_serving(server, reference)


def test_clients_that_disconnect_mid_request(server, reference):
    host, port = server.url.removeprefix("http://").split(":")
    body = json_request({"x": _x()})
    # 1. gone halfway through the body
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:40])
    # 2. gone before the answer
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    # 3. gone halfway through the headers
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nContent-Len".encode())
    time.sleep(0.3)
    _assert_still_serving(server, reference)
    deadline = time.monotonic() + 5
    while metric(_metrics(server), "nv_inference_pending_request_count", "mlp") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(_metrics(server), "nv_inference_pending_request_count", "mlp") == 0


def _metrics(handle) -> str:
    import urllib.request

    with urllib.request.urlopen(handle.metrics_url, timeout=10) as response:
        return response.read().decode()


def test_engine_that_raises_fails_only_that_request(server):
    """An index out of range makes ONNX Runtime raise: that request gets 500; its batch-mates get answers."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)

    def send(index: int) -> tuple[int, dict]:
        request = {"inputs": [
            {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()},
            {"name": "idx", "shape": [2, 1], "datatype": "INT64", "data": [index % 4, 9 if index % 5 == 0 else 1]},
        ]}
        status, _, body = post(server.url, "/v2/models/gather/infer", json.dumps(request).encode())
        return status, json.loads(body)

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(send, range(20)))
    for index, (status, body) in enumerate(answers):
        if index % 5 == 0:
            assert status == 500 and "model 'gather' failed on this request" in body["error"]
        else:
            assert status == 200, body
            assert body["outputs"][0]["data"] == [float(index % 4), 5.0]
    text = _metrics(server)
    assert metric(text, "nv_inference_request_failure", "gather") >= 4


def test_full_queue_answers_503_with_retry_after(engines):
    """One slow engine call at a time, a queue of 2: a burst of 16 requests is partly refused at once. Each call
    takes well over the idle fast path's 20 ms (1024 rows through eight 512x512 layers), so after the first call
    requests always go through the queue instead of running one by one on the server's loop."""
    with es.serve([engines["slow"]], max_queue=2, max_batch=1, **PORTS) as handle:
        x = np.random.default_rng(0).standard_normal((1024, 512)).astype(np.float32)
        body = json.dumps({"inputs": [{"name": "x", "shape": [1024, 512], "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        headers = {"Inference-Header-Content-Length": str(len(body))}

        def send(_: int):
            return post(handle.url, "/v2/models/slow/infer", body + x.tobytes(), headers, timeout=60)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, range(16)))
        refused = [(h, json.loads(b)) for s, h, b in answers if s == 503]
        served = [s for s, _, _ in answers if s == 200]
        assert len(refused) + len(served) == 16
        assert refused and served
        assert all(h.get("Retry-After") == "1" and "busy" in b["error"] for h, b in refused)
        # gRPC gets UNAVAILABLE for the same reason
        client = grpcclient.InferenceServerClient(handle.grpc_address)
        errors = []

        def grpc_send(_: int):
            given = grpcclient.InferInput("x", [1024, 512], "FP32")
            given.set_data_from_numpy(x)
            try:
                client.infer("slow", [given])
            except InferenceServerException as exc:
                errors.append(exc)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(grpc_send, range(16)))
        assert errors and all(e.status() == "StatusCode.UNAVAILABLE" and "busy" in e.message() for e in errors)


def test_request_timeout_in_the_queue(engines):
    # each call takes well over the fast path's 20 ms (1024 rows through eight 512x512 layers), so after the
    # first call every request goes through the queue; of 16 sent at once the last ones wait far past 50 ms
    with es.serve([engines["slow"]], max_batch=1, timeout_ms=50, **PORTS) as handle:
        # Binary tensors, one body for all: JSON bodies take the server about as long to decode as the
        # engine takes to run them, so requests would reach the queue spaced out and none would wait long.
        x = np.zeros((1024, 512), np.float32)
        header = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        request, headers = header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}

        def send(_: int):
            status, _, body = post(handle.url, "/v2/models/slow/infer", request, headers=headers, timeout=60)
            return status, json.loads(body) if status != 200 else {}

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, range(16)))
        timed_out = [b for s, b in answers if s == 503]
        assert timed_out and all("longer than its timeout" in b["error"] for b in timed_out)
        assert any(s == 200 for s, _ in answers)

    # the request's own 'timeout' parameter (microseconds), without a server-wide one
    with es.serve([engines["slow"]], max_batch=1, **PORTS) as handle:
        # Binary bodies again, encoded before sending, so the requests reach the queue together (JSON bodies
        # are decoded on the server's loop one at a time: each could be answered, alone and on the idle
        # server's fast path, before the next arrives, and a request that never queues never times out).
        x = np.zeros((1024, 512), np.float32)

        def binary(parameters: dict) -> tuple[bytes, dict]:
            header = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                             "parameters": {"binary_data_size": x.nbytes}}],
                                 **({"parameters": parameters} if parameters else {})}).encode()
            return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}

        timed, untimed = binary({"timeout": 1}), binary({})

        def send_with_timeout(index: int):
            body, headers = timed if index else untimed
            status, _, answer = post(handle.url, "/v2/models/slow/infer", body, headers=headers, timeout=60)
            return status, json.loads(answer) if status != 200 else {}

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send_with_timeout, range(16)))
        assert answers[0][0] == 200  # no timeout: always answered
        assert any(s == 503 and "longer than its timeout" in b["error"] for s, b in answers[1:])


BAD_BODIES = [
    (b"{not json", 400),
    (json_request({"x": np.zeros((2, 5), np.float32)}), 400),
    (json_request({"x": np.zeros((2, 6), np.float32)}, "INT32"), 400),
    (json_request({"y": np.zeros((2, 6), np.float32)}), 400),
]


def test_bounded_load_every_request_gets_one_answer(engines, reference):
    """3,000 requests over 12 keep-alive connections, a quarter of them bad or for a missing model."""
    total, workers = 3000, 12
    rng = random.Random(0)
    plan = []
    for index in range(total):
        roll = rng.random()
        if roll < 0.2:
            plan.append(("bad", index % len(BAD_BODIES)))
        elif roll < 0.25:
            plan.append(("missing", 0))
        else:
            plan.append(("good", 1 + index % 4))
    answers: list[list[tuple[int, int, bytes]]] = [[] for _ in range(workers)]
    with es.serve([engines["mlp"]], max_queue_delay_us=500, max_queue=4096, **PORTS) as handle:
        host = handle.url.removeprefix("http://")

        def worker(slot: int) -> None:
            connection = http.client.HTTPConnection(host, timeout=60)
            for index in range(slot, total, workers):
                kind, arg = plan[index]
                if kind == "good":
                    body, path = json_request({"x": _x(arg, index)}), INFER
                elif kind == "missing":
                    body, path = json_request({"x": _x(1, index)}), "/v2/models/other/infer"
                else:
                    body, path = BAD_BODIES[arg][0], INFER
                connection.request("POST", path, body=body)
                response = connection.getresponse()
                answers[slot].append((index, response.status, response.read()))
            connection.close()

        threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(240)
        text = _metrics(handle)
    flat = sorted(a for per_worker in answers for a in per_worker)
    assert [index for index, _, _ in flat] == list(range(total))  # exactly one answer each
    good = 0
    for index, status, body in flat:
        kind, arg = plan[index]
        if kind == "good":
            assert status == 200, body
            got = np.array(json.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(arg, 4)
            np.testing.assert_allclose(got, reference(x=_x(arg, index))["probs"], rtol=1e-5, atol=1e-7)
            good += 1
        elif kind == "missing":
            assert status == 404
        else:
            assert status == BAD_BODIES[arg][1] and "error" in json.loads(body)
    assert metric(text, "nv_inference_request_success", "mlp") == good
    assert metric(text, "nv_inference_exec_count", "mlp") <= good
