"""The dynamic batcher and the protocol codecs on their own, without sockets."""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest

from enginesmith.serve.batcher import (
    BatcherStoppedError,
    BatchingOptions,
    DynamicBatcher,
    QueueFullError,
    QueueTimeoutError,
)
from enginesmith.serve.protocol import ProtocolError, decode_http_request, encode_http_response, InferResponse


class RecordingRunner:
    """Doubles its input; raises on a NaN; remembers the batch sizes it was called with; can be held."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, feeds):
        self.release.wait(10)
        x = feeds["x"]
        self.calls.append(x.shape[0])
        if np.isnan(x).any():
            raise RuntimeError("NaN in the input")
        return {"y": x * 2, "rows": x[:, :1].copy()}


def _rows(n: int, value: float, width: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.full((n, width), value, np.float32)}


def _held_batcher(runner: RecordingRunner, **options) -> tuple[DynamicBatcher, object]:
    """A batcher whose single worker is busy on a first request until runner.release is set."""
    runner.release.clear()
    batcher = DynamicBatcher(runner, BatchingOptions(**options))
    first = batcher.submit(_rows(1, -1.0))
    deadline = time.monotonic() + 5
    while (batcher.pending != 1 or batcher._queue) and time.monotonic() < deadline:  # noqa: SLF001 - test sync
        time.sleep(0.005)
    return batcher, first


def test_queued_requests_merge_up_to_max_batch_and_split_back():
    runner = RecordingRunner()
    batcher, first = _held_batcher(runner, max_batch=6)
    futures = [batcher.submit(_rows(n, float(i))) for i, n in enumerate([1, 2, 3, 2, 1])]
    runner.release.set()
    for i, (n, future) in enumerate(zip([1, 2, 3, 2, 1], futures)):
        out = future.result(10)
        np.testing.assert_array_equal(out["y"], np.full((n, 3), 2.0 * i, np.float32))
        assert out["rows"].shape == (n, 1)
    first.result(10)
    batcher.stop()
    # the held first call, then 1+2+3 = 6 (max_batch), then 2+1
    assert runner.calls == [1, 6, 3]


def test_batches_are_padded_up_to_the_engines_compiled_sizes_and_the_padding_dropped():
    runner = RecordingRunner()
    executions: list[int] = []
    runner.release.clear()
    batcher = DynamicBatcher(runner, BatchingOptions(max_batch=8, preferred_batches=(1, 4, 8)),
                             on_execution=lambda record: executions.append(record.items))
    first = batcher.submit(_rows(1, -1.0))
    while batcher._queue or batcher.pending != 1:  # noqa: SLF001 - test sync: the worker holds the first
        time.sleep(0.005)
    futures = [batcher.submit(_rows(n, float(i))) for i, n in enumerate([1, 2, 2])]  # 5 rows: padded to 8
    runner.release.set()
    for i, (n, future) in enumerate(zip([1, 2, 2], futures)):
        out = future.result(10)
        np.testing.assert_array_equal(out["y"], np.full((n, 3), 2.0 * i, np.float32))
    first.result(10)
    # a lone request of 3 rows (fast path) is padded to 4; its answer keeps its own 3 rows
    np.testing.assert_array_equal(batcher.run_if_idle(_rows(3, 5.0))["y"], np.full((3, 3), 10.0, np.float32))
    batcher.stop()
    assert runner.calls == [1, 8, 4]
    assert executions == [1, 5, 3]  # the metrics count the requests' items, not the padding


def test_padding_is_not_used_when_an_output_has_no_batch_axis():
    calls: list[int] = []

    def runner(feeds):
        calls.append(feeds["x"].shape[0])
        return {"total": np.asarray(feeds["x"].sum(), np.float32)}  # 0-d: the padding would change it

    batcher = DynamicBatcher(runner, BatchingOptions(preferred_batches=(4,)))
    out = batcher.run_if_idle(_rows(3, 1.0))
    batcher.stop()
    assert calls == [4, 3] and float(out["total"]) == 9.0


def test_serving_an_engine_compiled_for_fixed_batches_uses_them():
    from types import SimpleNamespace

    from enginesmith.serve.server import ServeOptions, batching_for

    compiled = SimpleNamespace(compiled_batches=(1, 8, 64), max_batch=None)
    assert batching_for(compiled, ServeOptions()).preferred_batches == (1, 8, 64)
    assert batching_for(compiled, ServeOptions()).max_batch == 64  # no batch the engine was not compiled for
    assert batching_for(compiled, ServeOptions(max_batch=100)).max_batch == 100  # unless asked
    chunked = SimpleNamespace(compiled_batches=(1, 8, 64), max_batch=16)  # calls of at most 16: 64 never runs
    assert batching_for(chunked, ServeOptions()).preferred_batches == (1, 8)
    any_size = SimpleNamespace(compiled_batches=(), max_batch=None)
    assert batching_for(any_size, ServeOptions()).preferred_batches == ()


def test_a_ray_front_end_reads_the_compiled_batches_from_the_manifest():
    """The front end of serve --ray has the manifest only; it must agree with the loaded engine's session."""
    from types import SimpleNamespace

    from enginesmith.serve.ray_backend import RemoteEngine

    def remote(build: dict) -> RemoteEngine:
        engine = RemoteEngine.__new__(RemoteEngine)
        engine.manifest = SimpleNamespace(checks={"build": build})
        return engine

    cuda = {"compile": "inductor", "device": "cuda:0", "dynamic": False, "batches": [8, 1]}
    assert remote(cuda).compiled_batches == (1, 8)
    assert remote({**cuda, "device": "cpu", "dynamic": True}).compiled_batches == ()
    assert remote({**cuda, "compile": "eager"}).compiled_batches == ()
    assert remote({}).compiled_batches == ()  # ONNX Runtime, OpenVINO, TensorRT: any size alike


def test_requests_of_other_shapes_are_not_merged():
    runner = RecordingRunner()
    batcher, first = _held_batcher(runner, max_batch=32)
    narrow = [batcher.submit(_rows(1, 1.0, width=3)) for _ in range(3)]
    wide = [batcher.submit(_rows(1, 1.0, width=5)) for _ in range(2)]
    runner.release.set()
    assert all(f.result(10)["y"].shape == (1, 3) for f in narrow)
    assert all(f.result(10)["y"].shape == (1, 5) for f in wide)
    first.result(10)
    batcher.stop()
    assert sorted(runner.calls) == [1, 2, 3]


def test_a_failing_merged_batch_is_rerun_request_by_request():
    runner = RecordingRunner()
    batcher, first = _held_batcher(runner, max_batch=32)
    good = [batcher.submit(_rows(2, float(i))) for i in range(3)]
    bad = batcher.submit(_rows(1, float("nan")))
    runner.release.set()
    with pytest.raises(RuntimeError, match="NaN"):
        bad.result(10)
    for i, future in enumerate(good):
        np.testing.assert_array_equal(future.result(10)["y"], np.full((2, 3), 2.0 * i, np.float32))
    first.result(10)
    batcher.stop()
    assert runner.calls == [1, 7, 2, 2, 2, 1]  # the merged call failed, then each alone


def test_full_queue_refuses_at_once_and_stop_fails_the_queued():
    runner = RecordingRunner()
    batcher, first = _held_batcher(runner, max_queue=2)
    queued = [batcher.submit(_rows(1, 0.0)) for _ in range(2)]
    with pytest.raises(QueueFullError, match="holds 2 requests"):
        batcher.submit(_rows(1, 0.0))
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    time.sleep(0.1)
    runner.release.set()
    stopper.join(10)
    for future in queued:
        with pytest.raises(BatcherStoppedError):
            future.result(10)
    first.result(10)  # the running call finished
    with pytest.raises(BatcherStoppedError):
        batcher.submit(_rows(1, 0.0))


def test_expired_and_cancelled_requests_are_not_run():
    runner = RecordingRunner()
    batcher, first = _held_batcher(runner, max_batch=1)
    expired = batcher.submit(_rows(1, 5.0), timeout_s=0.01)
    cancelled = batcher.submit(_rows(1, 6.0))
    assert cancelled.cancel()
    time.sleep(0.05)
    runner.release.set()
    with pytest.raises(QueueTimeoutError, match="longer than its timeout"):
        expired.result(10)
    first.result(10)
    batcher.stop()
    assert runner.calls == [1]


def test_batching_options_are_checked():
    with pytest.raises(ValueError, match="max_batch"):
        BatchingOptions(max_batch=0)
    with pytest.raises(ValueError, match="max_queue_delay_us"):
        BatchingOptions(max_queue_delay_us=-1)
    with pytest.raises(ValueError, match="preferred_batches"):
        BatchingOptions(preferred_batches=(8, 1))


def test_bytes_tensors_round_trip_in_tritonclients_layout():
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    words = np.array([b"alpha", b"", "caf\u00e9".encode()], dtype=object)
    raw = serialize_byte_tensor(words).item()  # a 0-d object array holding the bytes
    header = {"inputs": [{"name": "s", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}]}
    import json

    text = json.dumps(header).encode()
    request = decode_http_request(text + raw, str(len(text)))
    assert list(request.inputs["s"]) == list(words)
    body, length = encode_http_response(InferResponse("m", "1", {"s": request.inputs["s"]}, {"s": "BYTES"}, {"s": True}))
    assert list(deserialize_bytes_tensor(body[length:])) == list(words)
    short = raw[:-1]
    bad = json.dumps({"inputs": [{"name": "s", "shape": [3], "datatype": "BYTES",
                                  "parameters": {"binary_data_size": len(short)}}]}).encode()
    with pytest.raises(ProtocolError, match="fewer are left"):
        decode_http_request(bad + short, str(len(bad)))
    assert struct.unpack_from("<I", raw)[0] == 5


@pytest.mark.parametrize("data, message", [
    ([1.5, 2], "INT32 data cannot hold the JSON value 1.5"),
    ([True, 1], "INT32 data cannot hold the JSON value true"),
    ([1, 2**40], "outside the range of INT32"),
    ([1], "needs 2 values, the data has 1"),
])
def test_json_values_are_checked_against_the_datatype(data, message):
    import json

    body = json.dumps({"inputs": [{"name": "i", "shape": [2], "datatype": "INT32", "data": data}]}).encode()
    with pytest.raises(ProtocolError, match=message) as caught:
        decode_http_request(body, None)
    assert caught.value.status == 400


def test_instances_run_engine_calls_at_the_same_time():
    """Two workers: two calls overlap (each waits until both have started), which one worker could not do."""
    both_started = threading.Barrier(2, timeout=5)

    def runner(feeds):
        both_started.wait()
        return {"y": feeds["x"] * 2}

    batcher = DynamicBatcher(runner, BatchingOptions(max_batch=1, instances=2))
    futures = [batcher.submit(_rows(1, float(i))) for i in range(2)]
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(future.result(10)["y"], np.full((1, 3), 2.0 * i, np.float32))
    batcher.stop()
    alone = threading.Barrier(2, timeout=0.5)
    single = DynamicBatcher(lambda feeds: (alone.wait(), {"y": feeds["x"]})[1], BatchingOptions(max_batch=1, instances=1))
    stuck = [single.submit(_rows(1, 0.0)) for _ in range(2)]
    with pytest.raises(threading.BrokenBarrierError):
        stuck[0].result(10)  # alone, the first call never sees a second one start
    single.stop()


def test_run_if_idle_runs_a_lone_request_on_the_calling_thread():
    threads: list[str] = []
    executions: list[int] = []
    queued: list[int] = []

    def runner(feeds):
        threads.append(threading.current_thread().name)
        return {"y": feeds["x"] * 2}

    batcher = DynamicBatcher(runner, BatchingOptions(max_queue_delay_us=5_000_000),
                             on_execution=lambda record: executions.append(record.items), on_dequeue=queued.append)
    started = time.monotonic()
    out = batcher.run_if_idle(_rows(2, 3.0))
    assert time.monotonic() - started < 1.0  # the 5 s gathering window is not waited for
    np.testing.assert_array_equal(out["y"], np.full((2, 3), 6.0, np.float32))
    assert threads == [threading.current_thread().name]  # no hand-off to a worker
    assert executions == [2] and queued == [0] and batcher.pending == 0
    batcher.stop()
    with pytest.raises(BatcherStoppedError):
        batcher.run_if_idle(_rows(1, 0.0))


def test_run_if_idle_declines_while_a_request_runs_or_waits_and_keeps_errors():
    runner = RecordingRunner()
    batcher, first = _held_batcher(runner, max_batch=8)
    assert batcher.run_if_idle(_rows(1, 1.0)) is None  # one running: the caller must queue
    queued = batcher.submit(_rows(1, 2.0))
    runner.release.set()
    first.result(10)
    np.testing.assert_array_equal(queued.result(10)["y"], np.full((1, 3), 4.0, np.float32))
    deadline = time.monotonic() + 5
    while batcher.pending and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(RuntimeError, match="NaN"):  # the engine's error reaches the caller
        batcher.run_if_idle(_rows(1, float("nan")))
    assert batcher.pending == 0
    batcher.stop()
    assert runner.calls == [1, 1, 1]


def test_binary_inputs_are_aligned_views_of_the_body_or_aligned_copies():
    import json

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for pad in range(4):  # JSON headers of every length modulo 4
        header = json.dumps({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}], "id": "a" * pad}).encode()
        body = np.frombuffer(header + x.tobytes(), np.uint8)
        got = decode_http_request(memoryview(body), str(len(header)))
        np.testing.assert_array_equal(got.inputs["x"], x)
        assert got.inputs["x"].flags.aligned
        shares = np.shares_memory(got.inputs["x"], body)
        assert shares == (len(header) % 4 == 0 and body.ctypes.data % 4 == 0)  # a view exactly when aligned


def test_binary_outputs_are_written_with_the_header_in_one_body():
    y = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::-1]  # not contiguous: laid out in the body
    body, length = encode_http_response(InferResponse("m", "1", {"y": y, "b": y > 2}, {"y": "FP32", "b": "BOOL"},
                                                      {"y": True, "b": True}))
    import json

    header = json.loads(body[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes == [24, 6]
    np.testing.assert_array_equal(np.frombuffer(body[length:length + 24], np.float32).reshape(2, 3), y)
    np.testing.assert_array_equal(np.frombuffer(body[length + 24:], np.bool_).reshape(2, 3), y > 2)


def test_a_request_is_no_longer_running_once_its_answer_is_out():
    """A client that sends again as soon as it has its answer must find the batcher idle (the fast path)."""
    batcher = DynamicBatcher(lambda feeds: {"y": feeds["x"]}, BatchingOptions())
    seen: list[int] = []
    future = batcher.submit(_rows(1, 1.0))
    future.add_done_callback(lambda _: seen.append(batcher.pending))  # runs as the worker resolves it
    future.result(10)
    batcher.stop()
    assert seen == [0]


def test_body_buffers_are_reused_within_their_limits_and_views_aligned():
    from enginesmith.serve.bodies import ALIGNMENT, POOLED_FROM, BodyBuffers, aligned_view

    buffers = BodyBuffers(budget=5 * POOLED_FROM, largest=4 * POOLED_FROM)
    first = buffers.take(2 * POOLED_FROM)
    assert first.nbytes == 2 * POOLED_FROM
    buffers.give_back(first)
    assert buffers.take(POOLED_FROM + 1) is first  # the idle one that fits
    assert buffers.take(POOLED_FROM + 1) is not first  # taken: a new one
    for size in (POOLED_FROM // 2, 8 * POOLED_FROM):  # too small to keep, larger than the limit
        buffers.give_back(np.empty(size, np.uint8))
    assert buffers._idle == []  # noqa: SLF001 - what the pool holds
    kept = [np.empty(n * POOLED_FROM, np.uint8) for n in (1, 2, 3)]
    for storage in kept:
        buffers.give_back(storage)
    buffers.give_back(np.empty(POOLED_FROM, np.uint8))
    assert [b.nbytes for b in buffers._idle] == [2 * POOLED_FROM, 3 * POOLED_FROM]  # noqa: SLF001 - the largest within the budget
    # Not the first idle buffer, in either direction (list.remove compared arrays elementwise: requests of two
    # body sizes, e.g. two clients' JSON headers, answered 500 "operands could not be broadcast together")
    buffers = BodyBuffers(budget=6 * POOLED_FROM, largest=4 * POOLED_FROM)
    large, small = np.empty(3 * POOLED_FROM, np.uint8), np.empty(2 * POOLED_FROM, np.uint8)
    buffers.give_back(large)
    buffers.give_back(small)
    assert buffers.take(POOLED_FROM) is small
    assert [id(b) for b in buffers._idle] == [id(large)]  # noqa: SLF001
    buffers.give_back(small)
    newer = np.empty(5 * POOLED_FROM // 2, np.uint8)
    buffers.give_back(newer)  # over the budget: the smallest idle one, second in line, makes room
    assert [id(b) for b in buffers._idle] == [id(large), id(newer)]  # noqa: SLF001
    storage = np.empty(1000 + ALIGNMENT, np.uint8)
    for at in (0, 1, 37, 63, 1000):
        view = aligned_view(storage, 1000, at)
        assert view.nbytes == 1000 and (view.ctypes.data + at) % ALIGNMENT == 0
