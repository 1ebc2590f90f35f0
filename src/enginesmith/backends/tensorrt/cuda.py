"""A small typed layer over the CUDA runtime of cuda-python: memory, streams, copies, graphs, device facts.

TensorRT takes raw device pointers and a stream handle; this module owns them.
It needs no TensorRT, so it is tested for real on a GPU machine on its own
(``scripts/gpu_cuda_layer.sh``).

cuda-python returns ``(error, *values)`` from every call instead of raising;
:func:`check` turns a failure into a :class:`CudaError` that names the CUDA
error (``cudaErrorMemoryAllocation: out of memory``) and the call.

Objects free their CUDA resources in ``close()`` or, failing that, when garbage
collected. None of them is thread-safe: the TensorRT runtime gives each
execution context its own stream and :class:`BufferPool`.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ...errors import EnginesmithError, MissingDependencyError
from . import _dlpack

CUDA_EXTRA_HINT = "pip install 'enginesmith[cuda]' (cuda-python)"
_cudart: ModuleType | None = None


def cudart() -> ModuleType:
    """The CUDA runtime bindings of cuda-python, whichever layout the installed version has."""
    global _cudart
    if _cudart is None:
        try:
            from cuda.bindings import runtime  # cuda-python >= 12.6, 13.x
        except ImportError:
            try:
                from cuda import cudart as runtime  # cuda-python 11.x - 12.5
            except ImportError:
                raise MissingDependencyError(f"cuda-python is not installed: {CUDA_EXTRA_HINT}") from None
        _cudart = runtime
    return _cudart


class CudaError(EnginesmithError):
    """A CUDA runtime call failed; ``name`` is the CUDA error name (e.g. ``cudaErrorMemoryAllocation``)."""

    def __init__(self, call: str, name: str, description: str):
        super().__init__(f"CUDA call {call} failed: {name} ({description})")
        self.call = call
        self.name = name


def check(result: tuple[Any, ...], call: str) -> Any:
    """The values of a cuda-python call's ``(error, *values)`` result; raises :class:`CudaError` on failure."""
    error, values = result[0], result[1:]
    if int(error) != 0:
        rt = cudart()
        name = _text(rt.cudaGetErrorName(error)[1]) or f"cudaError {int(error)}"
        description = _text(rt.cudaGetErrorString(error)[1])
        raise CudaError(call, name, description)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _text(value: Any) -> str:
    return value.decode(errors="replace").rstrip("\x00") if isinstance(value, bytes) else str(value)


def _version_text(version: int) -> str:
    """CUDA encodes versions as 1000 * major + 10 * minor (12040 -> '12.4')."""
    return f"{version // 1000}.{(version % 1000) // 10}" if version else "none"


# --------------------------------------------------------------------------- devices


def device_count() -> int:
    """CUDA devices usable here; 0 when there is no driver or no GPU (never raises for that)."""
    try:
        result = cudart().cudaGetDeviceCount()
    except MissingDependencyError:
        return 0
    return int(result[1]) if int(result[0]) == 0 else 0


def no_device_reason() -> str:
    """Why :func:`device_count` is 0, in words (the CUDA error name)."""
    error, count = cudart().cudaGetDeviceCount()
    if int(error) != 0:
        return f"{_text(cudart().cudaGetErrorName(error)[1])}: {_text(cudart().cudaGetErrorString(error)[1])}"
    return "no CUDA device found" if not count else ""


@dataclass(frozen=True)
class DeviceFacts:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int
    multiprocessors: int
    # True on Jetson and other GPUs that share the host's memory.
    integrated: bool
    driver_version: str
    runtime_version: str

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


def device_facts(index: int = 0) -> DeviceFacts:
    rt = cudart()
    props = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    return DeviceFacts(
        index=index,
        name=_text(props.name),
        compute_capability=(int(props.major), int(props.minor)),
        total_memory=int(props.totalGlobalMem),
        multiprocessors=int(props.multiProcessorCount),
        integrated=bool(props.integrated),
        driver_version=_version_text(check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion")),
        runtime_version=_version_text(check(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")),
    )


def set_device(index: int) -> None:
    """Make ``index`` current for this thread (CUDA keeps the current device per thread).

    ``cudaSetDevice`` also binds the device's primary context to the thread, which is the
    context TensorRT and every buffer here use.
    """
    check(cudart().cudaSetDevice(index), "cudaSetDevice")


def current_device() -> int:
    """The device current for this thread."""
    return int(check(cudart().cudaGetDevice(), "cudaGetDevice"))


@contextmanager
def on_device(index: int) -> Iterator[None]:
    """Make ``index`` current for the block, then give the thread its previous device back.

    For code that runs on threads it does not own (TensorRT calls a calibrator's
    ``get_batch`` from its own threads): allocations and copies inside land on ``index``,
    and the caller's thread is left as it was found.
    """
    previous = current_device()
    if previous == index:
        yield
        return
    set_device(index)
    try:
        yield
    finally:
        set_device(previous)


def memory_info() -> tuple[int, int]:
    """(free, total) bytes of the current device."""
    return tuple(check(cudart().cudaMemGetInfo(), "cudaMemGetInfo"))  # type: ignore[return-value]


# --------------------------------------------------------------------------- streams and events


class Stream:
    """A non-blocking CUDA stream: it does not serialize with the legacy default stream."""

    def __init__(self) -> None:
        rt = cudart()
        self._stream = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    @property
    def handle(self) -> int:
        """The raw ``cudaStream_t`` (what TensorRT's ``execute_async_v3`` takes)."""
        return int(self._stream)

    @property
    def cuda_stream(self) -> Any:
        return self._stream

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def wait_for(self, other_stream: int) -> None:
        """Make later work on this stream wait for everything enqueued so far on ``other_stream`` (a raw handle)."""
        event = Event()
        try:
            event.record(other_stream)
            check(cudart().cudaStreamWaitEvent(self._stream, event.cuda_event, 0), "cudaStreamWaitEvent")
        finally:
            event.close()

    def close(self) -> None:
        stream, self._stream = getattr(self, "_stream", None), None
        if stream is not None:
            check(cudart().cudaStreamDestroy(stream), "cudaStreamDestroy")

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        _quietly(self.close)


class Event:
    """A CUDA event without timing (cheaper), used to order work across streams."""

    def __init__(self) -> None:
        rt = cudart()
        self._event = check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")

    @property
    def cuda_event(self) -> Any:
        return self._event

    def record(self, stream: int) -> None:
        check(cudart().cudaEventRecord(self._event, _stream_arg(stream)), "cudaEventRecord")

    def close(self) -> None:
        event, self._event = getattr(self, "_event", None), None
        if event is not None:
            check(cudart().cudaEventDestroy(event), "cudaEventDestroy")

    def __del__(self) -> None:
        _quietly(self.close)


def _stream_arg(stream: "Stream | int") -> Any:
    if isinstance(stream, Stream):
        return stream.cuda_stream
    return cudart().cudaStream_t(int(stream))


def _quietly(close: Callable[[], None]) -> None:
    """Run a finalizer from ``__del__``: at interpreter exit the CUDA runtime may already be gone."""
    try:
        close()
    except Exception:  # noqa: BLE001 - nothing can be reported from a finalizer
        pass


# --------------------------------------------------------------------------- memory


class DeviceBuffer:
    """``nbytes`` of device memory from ``cudaMalloc`` on the current device."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.device = check(cudart().cudaGetDevice(), "cudaGetDevice")
        # cudaMalloc(0) returns NULL; one byte keeps every buffer a distinct, valid address.
        self.ptr = int(check(cudart().cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes} bytes)"))

    def free(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if ptr:
            check(cudart().cudaFree(ptr), "cudaFree")

    def __del__(self) -> None:
        _quietly(self.free)


class PinnedBuffer:
    """Page-locked host memory from ``cudaMallocHost``: copies from it run asynchronously and at full speed."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart().cudaMallocHost(max(self.nbytes, 1)), f"cudaMallocHost({self.nbytes} bytes)"))

    def array(self, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        """A numpy view of the buffer; the view keeps the buffer alive."""
        dtype = np.dtype(dtype)
        needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if needed > self.nbytes:
            raise ValueError(f"a {dtype}{list(shape)} view needs {needed} bytes; the pinned buffer has {self.nbytes}")
        raw = np.asarray(_HostMemory(self, needed))
        return raw.view(dtype).reshape(shape)

    def free(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if ptr:
            check(cudart().cudaFreeHost(ptr), "cudaFreeHost")

    def __del__(self) -> None:
        _quietly(self.free)


class _HostMemory:
    """What numpy wraps for a pinned view: it holds the buffer so the view can never outlive it."""

    def __init__(self, owner: PinnedBuffer, nbytes: int):
        self._owner = owner
        self.__array_interface__ = {"data": (owner.ptr, False), "shape": (nbytes,), "typestr": "|u1", "version": 3}


class DeviceArray:
    """A typed, C-contiguous view of device memory, exchangeable with torch/cupy without copies.

    It exposes ``__cuda_array_interface__`` (v3) and ``__dlpack__``/``__dlpack_device__``.
    ``stream`` is the raw handle of the stream its last writes were enqueued on (None when the
    data is ready): consumers are made to wait for that stream, not for the whole device.
    """

    def __init__(
        self, ptr: int, shape: tuple[int, ...], dtype: np.dtype | str, device: int, owner: Any, stream: int | None = None
    ):
        self.ptr = int(ptr)
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.device = int(device)
        self.stream = stream
        self._owner = owner  # keeps the memory (a DeviceBuffer, or the producer's tensor) alive

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: np.dtype | str) -> "DeviceArray":
        dtype = np.dtype(dtype)
        buffer = DeviceBuffer(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        return cls(buffer.ptr, shape, dtype, buffer.device, buffer)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def owner(self) -> Any:
        return self._owner

    # ----------------------------------------------------------------- producer side

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.ptr, False),
            "version": 3,
            "strides": None,
            # Per the interface, the consumer waits on this stream before reading; None means ready.
            "stream": self.stream,
        }

    def __dlpack_device__(self) -> tuple[int, int]:
        return (_dlpack.DL_CUDA, self.device)

    def __dlpack__(
        self,
        *,
        stream: int | None = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any:
        if copy:
            raise BufferError("DeviceArray exports without copies only (copy=True is not supported)")
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError(f"DeviceArray lives on {self.__dlpack_device__()}, not {tuple(dl_device)}")
        self._order_before(stream)
        versioned = max_version is not None and max_version[0] >= 1
        return _dlpack.export_capsule(self.ptr, self.shape, self.dtype, self.__dlpack_device__(), self, versioned)

    def _order_before(self, consumer_stream: int | None) -> None:
        """Make the consumer's stream wait for our pending writes (DLPack's ``stream`` argument)."""
        if self.stream is None or consumer_stream == -1:  # -1: the consumer asked for no synchronization
            return
        if consumer_stream is None:  # the spec's "legacy default stream" for CUDA
            consumer_stream = 1
        event = Event()
        try:
            event.record(self.stream)
            check(
                cudart().cudaStreamWaitEvent(_stream_arg(consumer_stream), event.cuda_event, 0), "cudaStreamWaitEvent"
            )
        finally:
            event.close()

    # ----------------------------------------------------------------- consumer side

    @classmethod
    def from_dlpack(cls, obj: Any, stream: Stream) -> "DeviceArray":
        """View a producer's CUDA tensor (torch, cupy, jax...) without copying; ``stream`` is where we will use it."""
        if obj.__dlpack_device__()[0] not in (_dlpack.DL_CUDA, _dlpack.DL_CUDA_MANAGED):
            raise ValueError(
                f"the tensor is not in CUDA device memory (DLPack device {tuple(obj.__dlpack_device__())}); "
                "pass a CUDA tensor, or a numpy array to the host-memory path"
            )
        # The producer makes ``stream`` wait for its pending writes (DLPack's stream contract).
        imported = _dlpack.import_capsule(obj.__dlpack__(stream=stream.handle))
        return cls(imported.ptr, imported.shape, imported.dtype, imported.device_id, imported)

    @classmethod
    def from_cuda_array_interface(cls, obj: Any, stream: Stream) -> "DeviceArray":
        """View an object exposing ``__cuda_array_interface__`` without copying; waits on its stream if it names one."""
        cai = obj.__cuda_array_interface__
        shape = tuple(int(d) for d in cai["shape"])
        dtype = np.dtype(cai["typestr"])
        strides = cai.get("strides")
        if strides is not None and not _dlpack._is_contiguous(shape, [s // dtype.itemsize for s in strides]):
            raise ValueError(f"the array of shape {shape} is not C-contiguous; make it contiguous first")
        if cai.get("mask") is not None:
            raise ValueError("masked CUDA arrays are not supported")
        if cai.get("stream") is not None:
            stream.wait_for(cai["stream"])
        ptr = int(cai["data"][0])
        device = _pointer_device(ptr) if ptr else check(cudart().cudaGetDevice(), "cudaGetDevice")
        return cls(ptr, shape, dtype, device, obj)

    # ----------------------------------------------------------------- copies

    def copy_from_host(self, host: np.ndarray, stream: Stream) -> None:
        """Enqueue host -> device; ``host`` must stay unchanged until the stream reaches the copy."""
        self._check_host(host)
        memcpy_async(self.ptr, host.ctypes.data, self.nbytes, "htod", stream)
        self.stream = stream.handle

    def copy_to_host(self, host: np.ndarray, stream: Stream) -> None:
        """Enqueue device -> host; read ``host`` only after the stream is synchronized."""
        self._check_host(host)
        memcpy_async(host.ctypes.data, self.ptr, self.nbytes, "dtoh", stream)

    def copy_from(self, other: "DeviceArray", stream: Stream) -> None:
        if other.nbytes != self.nbytes:
            raise ValueError(f"cannot copy {other.nbytes} bytes into a {self.nbytes}-byte device array")
        memcpy_async(self.ptr, other.ptr, self.nbytes, "dtod", stream)
        self.stream = stream.handle

    def to_numpy(self, stream: Stream | None = None) -> np.ndarray:
        """A host copy (synchronous): convenient for tests and debugging, not for hot loops."""
        out = np.empty(self.shape, self.dtype)
        rt = cudart()
        if self.stream is not None:
            check(rt.cudaStreamSynchronize(_stream_arg(self.stream)), "cudaStreamSynchronize")
        check(rt.cudaMemcpy(out.ctypes.data, self.ptr, self.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy")
        return out

    def _check_host(self, host: np.ndarray) -> None:
        if host.nbytes != self.nbytes or not host.flags.c_contiguous:
            raise ValueError(
                f"host array {host.dtype}{list(host.shape)} (contiguous: {host.flags.c_contiguous}) does not match "
                f"device array {self.dtype}{list(self.shape)}"
            )

    def __repr__(self) -> str:
        return f"DeviceArray({self.dtype}{list(self.shape)} at 0x{self.ptr:x} on cuda:{self.device})"


def as_device_array(obj: Any, stream: Stream) -> DeviceArray:
    """A :class:`DeviceArray` over any CUDA tensor, never copying; ``stream`` is where the caller will use it.

    DLPack comes first: its ``stream`` argument lets the producer (torch, cupy, jax) order its
    pending writes before our stream, which torch's ``__cuda_array_interface__`` (no stream key)
    cannot do.
    """
    if isinstance(obj, DeviceArray):
        if obj.stream is not None and obj.stream != stream.handle:
            stream.wait_for(obj.stream)
        return obj
    if hasattr(obj, "__dlpack__"):
        return DeviceArray.from_dlpack(obj, stream)
    if hasattr(obj, "__cuda_array_interface__"):
        return DeviceArray.from_cuda_array_interface(obj, stream)
    raise TypeError(
        f"{type(obj).__name__} is not a CUDA tensor: expected an object with __cuda_array_interface__ or __dlpack__ "
        "(torch.Tensor on cuda, cupy.ndarray, DeviceArray)"
    )


def _pointer_device(ptr: int) -> int:
    attributes = check(cudart().cudaPointerGetAttributes(ptr), "cudaPointerGetAttributes")
    return int(attributes.device)


_COPY_KINDS = {"htod": "cudaMemcpyHostToDevice", "dtoh": "cudaMemcpyDeviceToHost", "dtod": "cudaMemcpyDeviceToDevice"}


def memcpy_async(dst: int, src: int, nbytes: int, kind: str, stream: Stream) -> None:
    """``cudaMemcpyAsync``; ``kind`` is ``htod``, ``dtoh`` or ``dtod``. Host memory should be pinned to overlap."""
    rt = cudart()
    copy_kind = getattr(rt.cudaMemcpyKind, _COPY_KINDS[kind])
    check(rt.cudaMemcpyAsync(dst, src, nbytes, copy_kind, stream.cuda_stream), f"cudaMemcpyAsync({kind}, {nbytes} bytes)")


# --------------------------------------------------------------------------- buffer pool


class BufferPool:
    """Device arrays and pinned host arrays allocated once per (name, shape, dtype) and reused.

    A name keeps at most ``shapes_per_name`` shapes; the least recently used is freed
    beyond that, so a dynamic-shape engine fed ever-changing batch sizes does not grow
    without bound. Not thread-safe: one pool per execution context.
    """

    def __init__(self, shapes_per_name: int = 4):
        self.shapes_per_name = shapes_per_name
        self._device: dict[str, OrderedDict[tuple, DeviceArray]] = {}
        self._pinned: dict[str, OrderedDict[tuple, np.ndarray]] = {}
        self.allocations = 0  # how many buffers were ever allocated (reuse shows as no increase)

    def device(self, name: str, shape: tuple[int, ...], dtype: np.dtype | str) -> DeviceArray:
        return self._get(self._device, name, shape, dtype, DeviceArray.empty)

    def pinned(self, name: str, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        def allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            return PinnedBuffer(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize).array(shape, dtype)

        return self._get(self._pinned, name, shape, dtype, allocate)

    def _get(self, store: dict[str, OrderedDict], name: str, shape: tuple[int, ...], dtype: Any, allocate: Callable) -> Any:
        dtype = np.dtype(dtype)
        key = (tuple(int(d) for d in shape), dtype.str)
        entries = store.setdefault(name, OrderedDict())
        if key in entries:
            entries.move_to_end(key)
            return entries[key]
        while len(entries) >= self.shapes_per_name:
            entries.popitem(last=False)  # freed when no caller holds it any more
        entries[key] = allocate(key[0], dtype)
        self.allocations += 1
        return entries[key]

    def clear(self) -> None:
        self._device.clear()
        self._pinned.clear()


# --------------------------------------------------------------------------- CUDA graphs


class CudaGraph:
    """Work that a callable enqueues on a stream, captured once and replayed with one launch.

    Replays read and write the same addresses as the capture: change the data in those
    buffers, not the buffers. Capture uses thread-local mode so other threads may keep
    calling CUDA (allocations included) while one thread captures.
    """

    def __init__(self, graph_exec: Any, graph: Any):
        self._exec = graph_exec
        self._graph = graph

    @classmethod
    def capture(cls, stream: Stream, enqueue: Callable[[Stream], Any]) -> "CudaGraph":
        rt = cudart()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream.cuda_stream, mode), "cudaStreamBeginCapture")
        try:
            enqueue(stream)
        except BaseException:
            # End the capture so the stream is usable again; its (broken) graph is discarded.
            result = rt.cudaStreamEndCapture(stream.cuda_stream)
            if int(result[0]) == 0 and result[1] is not None:
                rt.cudaGraphDestroy(result[1])
            raise
        graph = check(rt.cudaStreamEndCapture(stream.cuda_stream), "cudaStreamEndCapture")
        try:
            graph_exec = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except CudaError:
            rt.cudaGraphDestroy(graph)
            raise
        return cls(graph_exec, graph)

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self._exec, stream.cuda_stream), "cudaGraphLaunch")

    def close(self) -> None:
        graph_exec, graph = getattr(self, "_exec", None), getattr(self, "_graph", None)
        self._exec = self._graph = None
        if graph_exec is not None:
            check(cudart().cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")
        if graph is not None:
            check(cudart().cudaGraphDestroy(graph), "cudaGraphDestroy")

    def __del__(self) -> None:
        _quietly(self.close)


def host_to_device(arrays: Mapping[str, np.ndarray], pool: BufferPool, stream: Stream) -> dict[str, DeviceArray]:
    """Stage host arrays through pooled pinned buffers into pooled device arrays (async on ``stream``)."""
    staged = {}
    for name, array in arrays.items():
        array = np.asarray(array, order="C")  # keeps 0-d scalars 0-d (ascontiguousarray makes them 1-d)
        pinned = pool.pinned(name, array.shape, array.dtype)
        np.copyto(pinned, array)
        device = pool.device(name, array.shape, array.dtype)
        device.copy_from_host(pinned, stream)
        staged[name] = device
    return staged


__all__ = [
    "BufferPool",
    "CudaError",
    "CudaGraph",
    "DeviceArray",
    "DeviceBuffer",
    "DeviceFacts",
    "Event",
    "PinnedBuffer",
    "Stream",
    "as_device_array",
    "check",
    "cudart",
    "current_device",
    "device_count",
    "device_facts",
    "host_to_device",
    "memcpy_async",
    "memory_info",
    "no_device_reason",
    "on_device",
    "set_device",
]
