"""The CUDA layer under the TensorRT backend (``enginesmith.backends.tensorrt.cuda``): no TensorRT needed.

The GPU tests run for real on a CUDA machine (``scripts/gpu_cuda_layer.sh`` runs this file
there) and are skipped elsewhere with the reason "no CUDA device". The DLPack layout tests
at the top need no GPU: they exchange CPU memory with torch through the same ctypes code.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from enginesmith.backends.tensorrt import _dlpack, cuda
from enginesmith.errors import MissingDependencyError


def _no_device_reason() -> str:
    try:
        return cuda.no_device_reason()
    except MissingDependencyError as exc:
        return str(exc)


HAS_DEVICE = cuda.device_count() > 0  # 0 also when cuda-python is missing
gpu = pytest.mark.skipif(not HAS_DEVICE, reason=f"no CUDA device ({'' if HAS_DEVICE else _no_device_reason()})")


def _random(shape, dtype=np.float32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(-1000, 1000, size=shape).astype(dtype)


# ============================================================================ no GPU needed


@pytest.mark.parametrize("versioned", [False, True])
def test_dlpack_export_layout_is_what_torch_reads(versioned):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    array = _random((3, 5))
    before = _dlpack.live_exports()
    capsule = _dlpack.export_capsule(array.ctypes.data, array.shape, array.dtype, (_dlpack.DL_CPU, 0), array, versioned)
    tensor = torch.from_dlpack(capsule)
    assert tensor.data_ptr() == array.ctypes.data  # no copy
    assert tensor.shape == (3, 5) and tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor.numpy(), array)
    del capsule
    gc.collect()
    assert _dlpack.live_exports() == before + 1  # torch still holds it
    del tensor
    gc.collect()
    assert _dlpack.live_exports() == before  # torch called the deleter


def test_unconsumed_capsule_releases_its_owner():
    array = _random((4,))
    before = _dlpack.live_exports()
    capsule = _dlpack.export_capsule(array.ctypes.data, array.shape, array.dtype, (_dlpack.DL_CPU, 0), array, False)
    assert _dlpack.live_exports() == before + 1
    del capsule
    gc.collect()
    assert _dlpack.live_exports() == before


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "int32", "int8", "uint8", "bool"])
def test_dlpack_import_reads_torch_tensors(dtype):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    tensor = torch.from_numpy(_random((2, 3), np.float32).astype(dtype))
    imported = _dlpack.import_capsule(tensor.__dlpack__())
    assert imported.ptr == tensor.data_ptr()
    assert imported.shape == (2, 3) and imported.dtype == np.dtype(dtype)
    assert imported.device_type == _dlpack.DL_CPU
    imported.release()


def test_dlpack_import_refuses_strided_tensors_and_spent_capsules():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    with pytest.raises(ValueError, match="not C-contiguous"):
        _dlpack.import_capsule(torch.zeros(3, 4).t().__dlpack__())
    capsule = torch.zeros(3).__dlpack__()
    _dlpack.import_capsule(capsule).release()
    with pytest.raises(TypeError, match="not an unconsumed DLPack capsule"):
        _dlpack.import_capsule(capsule)


@pytest.mark.skipif(HAS_DEVICE, reason="a CUDA device is present (this checks the no-device path)")
def test_no_device_is_reported_with_the_cuda_error_name():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    assert cuda.device_count() == 0
    assert cuda.no_device_reason().startswith("cudaError")
    with pytest.raises(cuda.CudaError, match=r"CUDA call cudaGetDeviceCount failed: cudaError\w+ \("):
        cuda.check(cuda.cudart().cudaGetDeviceCount(), "cudaGetDeviceCount")


# ============================================================================ on a GPU


@gpu
def test_device_facts():
    facts = cuda.device_facts(0)
    print(f"device: {facts.name} {facts.sm}, {facts.total_memory / 2**30:.1f} GiB, {facts.multiprocessors} SMs, "
          f"integrated={facts.integrated}, driver CUDA {facts.driver_version}, runtime CUDA {facts.runtime_version}")
    assert facts.name and facts.compute_capability[0] >= 3
    assert facts.total_memory > 0 and facts.multiprocessors > 0
    assert facts.driver_version != "none" and facts.runtime_version != "none"


@gpu
def test_errors_name_the_cuda_error():
    with pytest.raises(cuda.CudaError, match=r"cudaMalloc\(\d+ bytes\) failed: cudaErrorMemoryAllocation"):
        cuda.DeviceBuffer(1 << 60)


@gpu
def test_allocate_and_free():
    free_before, total = cuda.memory_info()
    buffers = [cuda.DeviceBuffer(64 << 20) for _ in range(4)]
    assert len({b.ptr for b in buffers}) == 4 and all(b.ptr for b in buffers)
    assert cuda.memory_info()[0] <= free_before - 200 * (1 << 20)
    for buffer in buffers:
        buffer.free()
        buffer.free()  # a second free is a no-op
        assert buffer.ptr == 0
    assert cuda.memory_info()[0] >= free_before - (16 << 20)
    assert total > 0


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "int8"])
def test_pinned_round_trip(dtype):
    data = _random((257, 33), dtype, seed=1)
    pinned_in = cuda.PinnedBuffer(data.nbytes).array(data.shape, data.dtype)
    pinned_out = cuda.PinnedBuffer(data.nbytes).array(data.shape, data.dtype)
    pinned_out.fill(7)  # poison: every element must be written
    np.copyto(pinned_in, data)
    device = cuda.DeviceArray.empty(data.shape, data.dtype)
    with cuda.Stream() as stream:
        device.copy_from_host(pinned_in, stream)
        device.copy_to_host(pinned_out, stream)
        stream.synchronize()
    np.testing.assert_array_equal(pinned_out, data)


@gpu
def test_async_copies_on_two_streams():
    streams = [cuda.Stream(), cuda.Stream()]
    data = [_random((1 << 20,), seed=s) for s in range(2)]
    pinned = [cuda.PinnedBuffer(d.nbytes).array(d.shape, d.dtype) for d in data]
    back = [cuda.PinnedBuffer(d.nbytes).array(d.shape, d.dtype) for d in data]
    device = [cuda.DeviceArray.empty(d.shape, d.dtype) for d in data]
    for i in range(2):
        np.copyto(pinned[i], data[i])
        back[i].fill(np.nan)
    for i in range(2):  # both enqueued before either is waited for
        device[i].copy_from_host(pinned[i], streams[i])
        device[i].copy_to_host(back[i], streams[i])
    for i in range(2):
        streams[i].synchronize()
        np.testing.assert_array_equal(back[i], data[i])
        streams[i].close()


@gpu
def test_buffer_pool_reuses_per_shape():
    pool = cuda.BufferPool(shapes_per_name=2)
    a = pool.device("x", (4, 6), np.float32)
    assert pool.device("x", (4, 6), np.float32).ptr == a.ptr
    assert pool.device("x", (4, 6), "float32") is a
    b = pool.device("x", (8, 6), np.float32)
    assert b.ptr != a.ptr
    assert pool.device("x", (4, 6), np.float16).ptr not in (a.ptr, b.ptr)  # another dtype: another buffer
    assert pool.allocations == 3
    assert pool.device("x", (4, 6), np.float32) is not a  # evicted (only 2 shapes per name), allocated again
    p1 = pool.pinned("x", (4, 6), np.float32)
    assert pool.pinned("x", (4, 6), np.float32).ctypes.data == p1.ctypes.data
    pool.clear()


@gpu
def test_dlpack_and_cuda_array_interface_with_torch_without_copies():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    stream = cuda.Stream()
    # torch -> DeviceArray, both protocols
    t = torch.arange(24, dtype=torch.float32, device="cuda").reshape(4, 6)
    via_dlpack = cuda.DeviceArray.from_dlpack(t, stream)
    via_cai = cuda.DeviceArray.from_cuda_array_interface(t, stream)
    assert via_dlpack.ptr == via_cai.ptr == t.data_ptr()
    assert via_dlpack.shape == (4, 6) and via_dlpack.dtype == np.float32
    np.testing.assert_array_equal(via_dlpack.to_numpy(), t.cpu().numpy())
    # DeviceArray -> torch, both protocols; a write through torch is seen through our pointer
    ours = cuda.DeviceArray.empty((3, 5), np.float16)
    ours.copy_from_host(np.ones((3, 5), np.float16), stream)  # leaves ours.stream set: consumers must wait
    from_dlpack = torch.from_dlpack(ours)
    from_cai = torch.as_tensor(ours, device="cuda")
    assert from_dlpack.data_ptr() == from_cai.data_ptr() == ours.ptr
    assert from_dlpack.dtype == torch.float16 and tuple(from_dlpack.shape) == (3, 5)
    from_dlpack.mul_(3)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(ours.to_numpy(), np.full((3, 5), 3, np.float16))
    with pytest.raises(ValueError, match="not in CUDA device memory"):
        cuda.DeviceArray.from_dlpack(torch.zeros(3), stream)
    stream.close()


@gpu
def test_exported_memory_lives_as_long_as_torch_needs_it():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    before = _dlpack.live_exports()
    ours = cuda.DeviceArray.empty((1 << 20,), np.float32)
    ptr = ours.ptr
    tensor = torch.from_dlpack(ours)
    del ours
    gc.collect()
    tensor.fill_(2.0)  # the buffer is still alive: torch holds it through the capsule's deleter
    assert tensor.data_ptr() == ptr and float(tensor.sum()) == 2.0 * (1 << 20)
    del tensor
    gc.collect()
    torch.cuda.synchronize()
    assert _dlpack.live_exports() == before


@gpu
def test_stream_ordering_when_torch_reads_our_pending_writes():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    data = _random((1 << 24,), seed=3)  # 64 MiB: the copy is still running when torch is handed the array
    pinned = cuda.PinnedBuffer(data.nbytes).array(data.shape, data.dtype)
    np.copyto(pinned, data)
    stream = cuda.Stream()
    ours = cuda.DeviceArray.empty(data.shape, data.dtype)
    ours.copy_from_host(pinned, stream)  # async, no synchronize: DLPack's stream argument must order it
    total = torch.from_dlpack(ours).double().sum().item()
    assert total == pytest.approx(float(data.astype(np.float64).sum()), rel=1e-9)
    stream.synchronize()
    stream.close()


@gpu
def test_sixteen_threads_each_with_its_own_stream():
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def work(seed: int) -> None:
        try:
            cuda.set_device(0)
            pool = cuda.BufferPool()
            with cuda.Stream() as stream:
                barrier.wait()
                for i in range(40):
                    data = _random((64 + seed, 1000 + i % 3), seed=seed * 1000 + i)
                    device = cuda.host_to_device({"x": data}, pool, stream)["x"]
                    back = pool.pinned("back", data.shape, data.dtype)
                    back.fill(np.nan)
                    device.copy_to_host(back, stream)
                    stream.synchronize()
                    np.testing.assert_array_equal(back, data)
                assert pool.allocations == 3 * 3  # three shapes, each: x pinned + x device + back pinned
        except BaseException as exc:  # noqa: BLE001 - collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, repr(errors[0])


@gpu
def test_cuda_graph_replays_copies_with_new_data():
    shape = (512, 256)
    pinned_in = cuda.PinnedBuffer(4 * 512 * 256).array(shape, np.float32)
    pinned_out = cuda.PinnedBuffer(4 * 512 * 256).array(shape, np.float32)
    first, second = cuda.DeviceArray.empty(shape, np.float32), cuda.DeviceArray.empty(shape, np.float32)

    def enqueue(stream: cuda.Stream) -> None:
        first.copy_from_host(pinned_in, stream)
        second.copy_from(first, stream)
        second.copy_to_host(pinned_out, stream)

    with cuda.Stream() as stream:
        graph = cuda.CudaGraph.capture(stream, enqueue)
        for seed in range(3):  # the same graph, new data in the same pinned buffer each time
            data = _random(shape, seed=seed)
            np.copyto(pinned_in, data)
            pinned_out.fill(np.nan)
            graph.launch(stream)
            stream.synchronize()
            np.testing.assert_array_equal(pinned_out, data)
        graph.close()
        # A failing capture ends cleanly and leaves the stream usable.
        with pytest.raises(RuntimeError, match="boom"):
            cuda.CudaGraph.capture(stream, lambda s: (_ for _ in ()).throw(RuntimeError("boom")))
        second.copy_to_host(pinned_out, stream)
        stream.synchronize()


# ============================================================================ alignment and threads (issue 20)
# TensorRT takes only 256-byte aligned device addresses; a view such as x[1:] is not. These tests
# run the staging copies and the calibration feeder on real CUDA memory, without TensorRT.


def test_dlpack_hands_over_a_views_misaligned_address():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from enginesmith.backends.tensorrt.alignment import misalignment

    base = torch.zeros(1 + 64, dtype=torch.float32)
    view = base[1:]  # contiguous, starts 4 bytes into the allocation
    imported = _dlpack.import_capsule(view.__dlpack__())
    assert imported.ptr == view.data_ptr() == base.data_ptr() + 4  # data pointer + byte_offset, as DLPack gives it
    assert misalignment(imported.ptr) == (misalignment(base.data_ptr()) + 4) % 256
    imported.release()


def _torch_cuda():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    return torch


@gpu
def test_misaligned_torch_input_is_staged_through_an_aligned_pooled_buffer():
    torch = _torch_cuda()
    from enginesmith.backends.tensorrt.alignment import aligned_input, misalignment

    pool, stream = cuda.BufferPool(), cuda.Stream()
    base = torch.arange(1 + 4 * 6, dtype=torch.float32, device="cuda")
    view = base[1:].view(4, 6)
    array = cuda.DeviceArray.from_dlpack(view, stream)
    assert array.ptr == view.data_ptr() == base.data_ptr() + 4 and misalignment(array.ptr) != 0
    staged = aligned_input(array, pool, "x", stream)
    assert staged is not array and misalignment(staged.ptr) == 0
    np.testing.assert_array_equal(staged.to_numpy(), view.cpu().numpy())  # to_numpy waits for the copy
    # The next call of the same shape reuses the pooled buffer; an aligned tensor is used in place.
    view.mul_(2)
    torch.cuda.synchronize()
    again = aligned_input(cuda.DeviceArray.from_dlpack(view, stream), pool, "x", stream)
    assert again.ptr == staged.ptr and pool.allocations == 1
    np.testing.assert_array_equal(again.to_numpy(), view.cpu().numpy())
    whole = torch.ones((4, 6), device="cuda")
    in_place = cuda.DeviceArray.from_dlpack(whole, stream)
    assert aligned_input(in_place, pool, "x", stream) is in_place and in_place.ptr == whole.data_ptr()
    stream.close()


@gpu
def test_misaligned_torch_output_gets_the_result_copied_in():
    torch = _torch_cuda()
    from enginesmith.backends.tensorrt.alignment import aligned_output, misalignment

    pool, stream = cuda.BufferPool(), cuda.Stream()
    base = torch.full((1 + 3 * 4,), -1.0, dtype=torch.float32, device="cuda")
    out = base[1:].view(3, 4)
    target = aligned_output(cuda.DeviceArray.from_dlpack(out, stream), pool, "y")
    assert target.staged and misalignment(target.write.ptr) == 0 and target.result.ptr == out.data_ptr()
    result = _random((3, 4), seed=5)
    target.write.copy_from_host(result, stream)  # what the engine would write
    target.finish(stream)
    stream.synchronize()
    np.testing.assert_array_equal(out.cpu().numpy(), result)
    assert float(base[0]) == -1.0  # the element before the view is untouched
    stream.close()


@gpu
def test_runtime_device_io_stages_misaligned_tensors():
    """The TensorRT runtime's own input/output preparation (no TensorRT call in it) on torch views."""
    torch = _torch_cuda()
    from enginesmith.backends.tensorrt.alignment import misalignment
    from enginesmith.backends.tensorrt.runtime import IoTensor, _device_input, _device_output
    from enginesmith.errors import InputError

    pool, stream = cuda.BufferPool(), cuda.Stream()
    x_spec = IoTensor("x", True, np.dtype(np.float32), (-1, 6), (((1, 6), (8, 6)),))
    y_spec = IoTensor("y", False, np.dtype(np.float32), (-1, 4))
    batch = torch.randn(3, 6, device="cuda")
    view = batch[1:]  # rows 1..2: 24 bytes in, misaligned
    array = _device_input(x_spec, view, stream, pool)
    assert misalignment(array.ptr) == 0 and array.ptr != view.data_ptr()
    np.testing.assert_array_equal(array.to_numpy(), view.cpu().numpy())
    fresh = _device_output(y_spec, (2, 4), None, stream, pool)
    assert not fresh.staged and misalignment(fresh.write.ptr) == 0
    holder = torch.zeros(1 + 8, device="cuda")
    staged = _device_output(y_spec, (2, 4), holder[1:].view(2, 4), stream, pool)
    assert staged.staged and misalignment(staged.write.ptr) == 0
    with pytest.raises(InputError, match="is int64 on the device; the engine takes float32"):
        _device_input(x_spec, torch.zeros((2, 6), dtype=torch.int64, device="cuda"), stream, pool)
    with pytest.raises(InputError, match=r"output buffer 'y' is float32\[3, 4\]; the engine writes float32\[2, 4\]"):
        _device_output(y_spec, (2, 4), torch.zeros((3, 4), device="cuda"), stream, pool)
    stream.close()


def _read_back(ptr: int, shape: tuple[int, ...], dtype: np.dtype, device: int) -> np.ndarray:
    return cuda.DeviceArray(ptr, shape, dtype, device, owner=None).to_numpy()


@gpu
def test_calibration_feeder_from_another_thread_feeds_the_network_types():
    """TensorRT calls get_batch on threads of its own: the feeder must work there, in the network's types."""
    from enginesmith.backends.tensorrt.calibration import CalibrationFeeder, calibration_dtype

    batches = [
        {"ids": np.arange(8, dtype=np.int64).reshape(2, 4) + 10 * i, "x": _random((2, 3), np.float64, seed=i)}
        for i in range(2)
    ]
    feeder = CalibrationFeeder(batches, {"ids": calibration_dtype("INT64"), "x": calibration_dtype("FLOAT")}, gpu=0)
    results: list = []

    def call() -> None:
        try:
            results.append(feeder.next_pointers(["x", "ids"]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            results.append(exc)

    for i in range(3):
        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
        pointers = results[-1]
        assert not isinstance(pointers, BaseException), repr(pointers)
        if i == 2:
            assert pointers is None  # the batches are spent
            break
        x_ptr, ids_ptr = pointers
        assert cuda._pointer_device(x_ptr) == 0 and cuda._pointer_device(ids_ptr) == 0
        np.testing.assert_array_equal(_read_back(ids_ptr, (2, 4), np.dtype(np.int64), 0), batches[i]["ids"])
        np.testing.assert_array_equal(_read_back(x_ptr, (2, 3), np.dtype(np.float32), 0), batches[i]["x"].astype(np.float32))
    feeder.close()


@pytest.mark.skipif(cuda.device_count() < 2, reason="needs two CUDA devices")
def test_calibration_feeder_allocates_on_the_engines_gpu_and_restores_the_thread():
    from enginesmith.backends.tensorrt.calibration import CalibrationFeeder

    engine_gpu = cuda.device_count() - 1
    feeder = CalibrationFeeder([{"x": _random((2, 3))}], {"x": np.dtype(np.float32)}, gpu=engine_gpu)
    seen: dict = {}

    def call() -> None:
        try:
            cuda.set_device(0)  # TensorRT's thread may have any device current
            seen["pointers"] = feeder.next_pointers(["x"])
            seen["device_after"] = cuda.current_device()
        except BaseException as exc:  # noqa: BLE001 - reported below
            seen["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert "error" not in seen, repr(seen.get("error"))
    assert cuda._pointer_device(seen["pointers"][0]) == engine_gpu
    assert seen["device_after"] == 0
    feeder.close()
