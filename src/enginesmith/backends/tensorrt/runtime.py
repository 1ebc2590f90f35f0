"""Running a serialized TensorRT engine: execution contexts, buffers, shapes, CUDA graphs.

One :class:`_Context` per concurrent call: a TensorRT execution context with its own
CUDA stream, :class:`~.cuda.BufferPool` and optimization profile (TensorRT requires
contexts in concurrent use to use different profiles, so the builder makes one copy
of the profile per context). A call takes a free context, sets input shapes only
when they change, copies inputs in through pinned buffers, enqueues, copies outputs
out and synchronizes once. With ``cuda_graphs`` the copy-enqueue-copy sequence of a
fixed shape is captured after its first run and replayed with one launch.

Tensor I/O differs by version (see ``_NamedTensors`` and ``_Bindings``):
TensorRT >= 8.5 (so 8.6, 10, 11) names tensors and runs ``execute_async_v3``;
older releases use binding indices (offset per profile) and ``execute_async_v2``.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ...errors import BundleError, EnginesmithError, InputError, PlatformMismatchError, UnsupportedModelError
from ...signature import Signature
from ..base import Session
from . import cuda
from ._trt import captured_errors, import_tensorrt, trt_logger
from .alignment import OutputTarget, aligned_input, aligned_output, rejected_address
from .options import TrtOptions, api_of, check_in_profile

_log = logging.getLogger("enginesmith.tensorrt")


class EnqueueError(EnginesmithError):
    """TensorRT refused to enqueue the engine (its log says why)."""


@dataclass(frozen=True)
class IoTensor:
    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 where dynamic
    # Per optimization profile: (min, max) shapes; empty for outputs and static inputs.
    ranges: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()


def numpy_dtype(trt: Any, trt_dtype: Any, name: str) -> np.dtype:
    try:
        return np.dtype(trt.nptype(trt_dtype))
    except TypeError:  # BF16, FP8, INT4: no numpy type
        raise UnsupportedModelError(
            f"engine tensor '{name}' has type {trt_dtype}, which numpy cannot hold; keep the model's inputs and "
            "outputs float32/float16/int (fp16 conversion keeps them, as enginesmith's builds do)"
        ) from None


def describe_engine(trt: Any, engine: Any, named_tensors: bool) -> list[IoTensor]:
    return _named_io(trt, engine) if named_tensors else _binding_io(trt, engine)


def _named_io(trt: Any, engine: Any) -> list[IoTensor]:
    """TensorRT >= 8.5: ``num_io_tensors``, ``get_tensor_*``, ``get_tensor_profile_shape`` -> [min, opt, max]."""
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        if is_input and engine.is_shape_inference_io(name):
            raise UnsupportedModelError(f"engine input '{name}' is a shape tensor, which enginesmith does not feed yet")
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        ranges: tuple = ()
        if is_input and -1 in shape:
            ranges = tuple(
                (tuple(low), tuple(high))
                for low, _, high in (engine.get_tensor_profile_shape(name, p) for p in range(engine.num_optimization_profiles))
            )
        tensors.append(IoTensor(name, is_input, numpy_dtype(trt, engine.get_tensor_dtype(name), name), shape, ranges))
    return tensors


def _binding_io(trt: Any, engine: Any) -> list[IoTensor]:
    """TensorRT < 8.5: bindings, repeated once per optimization profile; the first profile's names are the tensors'."""
    per_profile = engine.num_bindings // engine.num_optimization_profiles
    tensors = []
    for index in range(per_profile):
        name = engine.get_binding_name(index)
        is_input = engine.binding_is_input(index)
        shape = tuple(int(d) for d in engine.get_binding_shape(index))
        ranges: tuple = ()
        if is_input and -1 in shape:
            ranges = tuple(
                (tuple(low), tuple(high))
                for low, _, high in (engine.get_profile_shape(p, index) for p in range(engine.num_optimization_profiles))
            )
        tensors.append(IoTensor(name, is_input, numpy_dtype(trt, engine.get_binding_dtype(index), name), shape, ranges))
    return tensors


class _NamedTensors:
    """Tensor I/O of TensorRT >= 8.5: ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``.

    Names are the same in every profile: the context's active profile selects (no offsets).
    """

    def __init__(self, context: Any, engine: Any, profile: int):  # same signature as _Bindings
        self._context = context

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        return bool(self._context.set_input_shape(name, shape))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._context.get_tensor_shape(name))

    def set_address(self, name: str, ptr: int) -> bool:
        return bool(self._context.set_tensor_address(name, ptr))

    def execute(self, stream: cuda.Stream) -> bool:
        return bool(self._context.execute_async_v3(stream.handle))


class _Bindings:
    """Tensor I/O of TensorRT < 8.5: binding indices offset by profile, ``execute_async_v2`` (removed in 10)."""

    def __init__(self, context: Any, engine: Any, profile: int):
        self._context = context
        per_profile = engine.num_bindings // engine.num_optimization_profiles
        self._index = {engine.get_binding_name(i): profile * per_profile + i for i in range(per_profile)}
        self._pointers = [0] * engine.num_bindings

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        return bool(self._context.set_binding_shape(self._index[name], shape))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._context.get_binding_shape(self._index[name]))

    def set_address(self, name: str, ptr: int) -> bool:
        self._pointers[self._index[name]] = ptr  # execute_async_v2 checks the bindings itself
        return True

    def execute(self, stream: cuda.Stream) -> bool:
        return bool(self._context.execute_async_v2(self._pointers, stream.handle))


class _Context:
    """One execution context, its stream and buffers; used by one thread at a time."""

    def __init__(self, engine: Any, io: list[IoTensor], named: bool, profile: int, cuda_graphs: bool):
        self.stream = cuda.Stream()
        self.pool = cuda.BufferPool()
        with captured_errors() as errors:
            self.context = engine.create_execution_context()
        if self.context is None:
            raise UnsupportedModelError(
                f"TensorRT could not create an execution context ({' | '.join(errors) or 'no error logged'}); "
                "the GPU may be out of memory: lower backend option contexts or max_batch"
            )
        self.tensors = (_NamedTensors if named else _Bindings)(self.context, engine, profile)
        self.inputs = [t for t in io if t.is_input]
        self.outputs = [t for t in io if not t.is_input]
        self.profile = profile
        if engine.num_optimization_profiles > 1:
            self.context.set_optimization_profile_async(profile, self.stream.handle)
            self.stream.synchronize()
        self.use_graphs = cuda_graphs
        self._shapes: dict[str, tuple[int, ...]] = {}
        # The graph of the current input shapes: (shapes, buffer pointers it was captured with, graph).
        self._graph: tuple[tuple, tuple[int, ...], cuda.CudaGraph] | None = None

    # ----------------------------------------------------------------- shapes

    def set_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Check and set input shapes (only those that changed); returns every output's shape."""
        for tensor in self.inputs:
            shape = shapes[tensor.name]
            if tensor.ranges:
                low, high = tensor.ranges[self.profile]
                check_in_profile(tensor.name, shape, low, high)
            elif shape != tensor.shape:
                raise InputError(f"input '{tensor.name}' has shape {list(shape)}; the engine takes {list(tensor.shape)}")
            if self._shapes.get(tensor.name) != shape:
                if not self.tensors.set_input_shape(tensor.name, shape):
                    raise InputError(f"TensorRT rejected shape {list(shape)} for input '{tensor.name}'")
                self._shapes[tensor.name] = shape
                self._drop_graph()
        outputs = {t.name: self.tensors.shape(t.name) for t in self.outputs}
        unknown = [name for name, shape in outputs.items() if -1 in shape]
        if unknown:
            raise UnsupportedModelError(
                f"output(s) {', '.join(unknown)} have data-dependent shapes, which enginesmith's TensorRT runtime "
                "does not support yet; use --backend onnxruntime for this model"
            )
        return outputs

    # ----------------------------------------------------------------- host memory in and out

    def run_host(self, feeds: Mapping[str, np.ndarray], want: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
        arrays = {t.name: _to_engine_dtype(t, feeds[t.name]) for t in self.inputs}
        out_shapes = self.set_shapes({name: tuple(a.shape) for name, a in arrays.items()})
        # Pool keys say in/out: a graph input may also be one of its outputs.
        pinned_in = {name: self.pool.pinned(f"in:{name}", a.shape, a.dtype) for name, a in arrays.items()}
        device_in = {name: self.pool.device(f"in:{name}", a.shape, a.dtype) for name, a in arrays.items()}
        device_out = {t.name: self.pool.device(f"out:{t.name}", out_shapes[t.name], t.dtype) for t in self.outputs}
        pinned_out = {t.name: self.pool.pinned(f"out:{t.name}", out_shapes[t.name], t.dtype) for t in self.outputs}
        for name, array in arrays.items():
            np.copyto(pinned_in[name], array)

        def enqueue(stream: cuda.Stream) -> None:
            for name, device in device_in.items():
                device.copy_from_host(pinned_in[name], stream)
            self._execute({**device_in, **device_out}, stream)
            for name, device in device_out.items():
                device.copy_to_host(pinned_out[name], stream)

        # A graph replays these exact addresses: it is reused only while the pool hands out the same buffers.
        pointers = tuple(b.ptr for b in (*device_in.values(), *device_out.values()))
        pointers += tuple(a.ctypes.data for a in (*pinned_in.values(), *pinned_out.values()))
        self._run(enqueue, pointers)
        return {name: _to_signature_dtype(name, pinned_out[name], want) for name in pinned_out}

    def _run(self, enqueue: Callable[[cuda.Stream], None], pointers: tuple[int, ...]) -> None:
        """Enqueue and wait, through the shape's CUDA graph when there is one (one synchronize per call)."""
        graph = self._graph
        if graph is not None and graph[0] == tuple(self._shapes.items()) and graph[1] == pointers:
            graph[2].launch(self.stream)
            self.stream.synchronize()
            return
        enqueue(self.stream)
        self.stream.synchronize()
        if self.use_graphs:
            # TensorRT needs one plain enqueue after a shape change before a capture: the one above.
            self._capture(enqueue, pointers)

    def _capture(self, enqueue: Callable[[cuda.Stream], None], pointers: tuple[int, ...]) -> None:
        self._drop_graph()
        try:
            graph = cuda.CudaGraph.capture(self.stream, enqueue)
        except (cuda.CudaError, EnqueueError) as exc:
            # Some engines cannot be captured (DLA layers, host-side synchronization): run them plainly.
            self.use_graphs = False
            _log.warning("CUDA graph capture failed, running without: %s", exc)
            return
        self._graph = (tuple(self._shapes.items()), pointers, graph)

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self._graph[2].close()
            self._graph = None

    def _execute(self, buffers: Mapping[str, cuda.DeviceArray], stream: cuda.Stream) -> None:
        for name, buffer in buffers.items():
            if not self.tensors.set_address(name, buffer.ptr):
                raise EnqueueError(rejected_address(name, buffer.ptr))
        with captured_errors() as errors:
            ok = self.tensors.execute(stream)
        if not ok:
            raise EnqueueError(f"TensorRT could not enqueue the engine: {' | '.join(errors[-3:]) or 'no error logged'}")

    # ----------------------------------------------------------------- device memory in and out

    def run_device(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any] | None) -> dict[str, cuda.DeviceArray]:
        arrays = {t.name: _device_input(t, feeds[t.name], self.stream, self.pool) for t in self.inputs}
        out_shapes = self.set_shapes({name: a.shape for name, a in arrays.items()})
        targets = {
            t.name: _device_output(t, out_shapes[t.name], (outputs or {}).get(t.name), self.stream, self.pool)
            for t in self.outputs
        }
        self._execute({**arrays, **{name: target.write for name, target in targets.items()}}, self.stream)
        for target in targets.values():
            target.finish(self.stream)
        # The caller may reuse its input tensors as soon as we return: wait here, once.
        self.stream.synchronize()
        results = {name: target.result for name, target in targets.items()}
        for array in results.values():
            array.stream = None
        return results

    def close(self) -> None:
        self._drop_graph()
        self.pool.clear()
        self.context = None
        self.stream.close()


def _to_engine_dtype(tensor: IoTensor, array: np.ndarray) -> np.ndarray:
    """Cast to the engine's input type: TensorRT 8.6 takes int64 inputs as int32 (values must fit).

    ``np.asarray(order="C")``, not ``ascontiguousarray``, which turns a 0-d scalar (a sample rate) into shape (1,).
    """
    if array.dtype == tensor.dtype:
        return np.asarray(array, order="C")
    if array.dtype.kind in "iu" and tensor.dtype.kind in "iu":
        info = np.iinfo(tensor.dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InputError(f"input '{tensor.name}' has values outside {tensor.dtype}, the type the engine takes")
    return np.asarray(array, dtype=tensor.dtype, order="C")


def _to_signature_dtype(name: str, pinned: np.ndarray, want: Mapping[str, np.dtype]) -> np.ndarray:
    """A copy the caller owns (pinned buffers are reused), in the model's output type."""
    dtype = want.get(name, pinned.dtype)
    return pinned.astype(dtype, copy=True)


def _device_input(tensor: IoTensor, value: Any, stream: cuda.Stream, pool: cuda.BufferPool) -> cuda.DeviceArray:
    """The caller's CUDA tensor as TensorRT can take it: itself, or a pooled aligned copy of a misaligned view."""
    if isinstance(value, np.ndarray):
        raise InputError(f"input '{tensor.name}' is a numpy array: run_device takes CUDA tensors; use run() for host arrays")
    try:
        array = cuda.as_device_array(value, stream)
    except (TypeError, ValueError) as exc:
        raise InputError(f"input '{tensor.name}': {exc}") from None
    if array.dtype != tensor.dtype:
        raise InputError(
            f"input '{tensor.name}' is {array.dtype} on the device; the engine takes {tensor.dtype} "
            "(convert it on the device first: no casts are made here)"
        )
    return aligned_input(array, pool, f"aligned-in:{tensor.name}", stream)


def _device_output(
    tensor: IoTensor, shape: tuple[int, ...], given: Any, stream: cuda.Stream, pool: cuda.BufferPool
) -> OutputTarget:
    """Where the engine writes output ``tensor``: the caller's buffer, a pooled aligned stand-in, or fresh memory."""
    if given is None:
        fresh = cuda.DeviceArray.empty(shape, tensor.dtype)  # cudaMalloc: aligned
        return OutputTarget(fresh, fresh)
    try:
        array = cuda.as_device_array(given, stream)
    except (TypeError, ValueError) as exc:
        raise InputError(f"output buffer '{tensor.name}': {exc}") from None
    if array.shape != shape or array.dtype != tensor.dtype:
        raise InputError(
            f"output buffer '{tensor.name}' is {array.dtype}{list(array.shape)}; the engine writes {tensor.dtype}{list(shape)}"
        )
    return aligned_output(array, pool, f"aligned-out:{tensor.name}")


def load_failure(errors: list[str], version: str) -> BundleError:
    """Explain why ``deserialize_cuda_engine`` returned None, from what TensorRT logged."""
    text = " | ".join(errors[-3:]) or "TensorRT logged no error"
    if any("magic" in e.lower() for e in errors):
        return BundleError(f"the payload is not a TensorRT engine TensorRT {version} can read ({text})")
    return PlatformMismatchError(
        f"TensorRT {version} cannot load this engine ({text}): engines run only with the TensorRT version and GPU "
        "they were built for; rebuild it here with 'enginesmith build'"
    )


class TensorRTSession(Session):
    """A deserialized engine and a pool of execution contexts; ``run`` is safe to call from many threads."""

    supports_device_io = True

    def __init__(self, plan: bytes, options: TrtOptions, signature: Signature):
        trt = import_tensorrt()
        api = api_of(trt)
        self._gpu = options.gpu
        cuda.set_device(self._gpu)
        self._runtime = trt.Runtime(trt_logger())
        if options.dla_core is not None:
            self._runtime.DLA_core = options.dla_core  # must be set before deserializing a DLA engine
        if options.version_compatible:
            self._runtime.engine_host_code_allowed = True  # version-compatible plans embed their lean runtime
        with captured_errors() as errors:
            self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise load_failure(errors, trt.__version__)
        io = describe_engine(trt, self._engine, api.named_tensors)
        dynamic = any(t.ranges for t in io)
        count = options.contexts or 1
        if dynamic:
            count = min(count, self._engine.num_optimization_profiles)
        self._want = {t.name: np.dtype(t.dtype) for t in signature.outputs}
        self._all = [_Context(self._engine, io, api.named_tensors, i if dynamic else 0, options.cuda_graphs) for i in range(count)]
        self._free: queue.LifoQueue[_Context] = queue.LifoQueue()
        for context in self._all:
            self._free.put(context)

    @property
    def contexts(self) -> int:
        return len(self._all)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Numpy in, numpy out; blocks while every context is busy with another thread's call."""
        context = self._take()
        try:
            return context.run_host(feeds, self._want)
        finally:
            self._free.put(context)

    def run_device(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> dict[str, cuda.DeviceArray]:
        """CUDA tensors in (torch, cupy, DeviceArray), :class:`~.cuda.DeviceArray` out.

        Outputs are written into ``outputs`` (CUDA tensors of the right shape and type) when
        given, else into fresh device memory; results support ``torch.from_dlpack``. No casts
        happen on the device: inputs must already have the engine's types. Tensors are used
        in place, without copies, when their address is 256-byte aligned (TensorRT's rule);
        a misaligned view such as ``x[1:]`` is copied through a pooled aligned buffer.
        """
        context = self._take()
        try:
            return context.run_device(feeds, outputs)
        finally:
            self._free.put(context)

    def _take(self) -> _Context:
        cuda.set_device(self._gpu)  # the current device is per thread
        return self._free.get()

    def close(self) -> None:
        """Free contexts, then the engine, then the runtime (TensorRT's required order)."""
        for context in self._all:
            context.close()
        self._all = []
        self._free = queue.LifoQueue()
        self._engine = None
        self._runtime = None
