"""The runtime session of a PyTorch engine: numpy or device tensors in, outputs out."""

from __future__ import annotations

import threading
import warnings
from typing import Any, Mapping

import numpy as np

from ...errors import InputError
from ...signature import Signature
from ..base import Session
from .common import _torch
from .compile import _set_fp32_math


def torch_dtype_of(array: np.ndarray):
    """The torch dtype of a numpy array of any rank, 0-d scalars included (a Clip bound fed as an input)."""
    return _torch().from_numpy(array.reshape(-1)[:0]).dtype


class TorchSession(Session):
    """Runs the compiled program; numpy in/out through pinned staging buffers on CUDA.

    ``run_torch`` keeps inputs and outputs on the device (torch tensors, or anything with
    ``__dlpack__`` as input). Calls are serialized by a lock: CUDA graph replays share
    static buffers.
    """

    def __init__(self, compiled, eager, meta: dict[str, Any], signature: Signature, load_seconds: float = 0.0,
                 cache_info: str = ""):
        torch = _torch()
        self._torch = torch
        self._compiled = compiled
        self._eager = eager
        self.meta = meta
        self._signature = signature
        self._device = torch.device(meta["device"])
        self._cuda = self._device.type == "cuda"
        self._batches = set(meta.get("batches") or [])
        self._lock = threading.Lock()
        self._staging: dict[tuple, Any] = {}
        self._warned: set[int] = set()
        # Per input: the size of each dim the exported program fixed (None where symbolic).
        self._served: dict[str, list] = dict(meta.get("served_shapes") or {})
        self._ranges: dict[str, list] = dict(meta.get("served_ranges") or {})  # absent in engines built before
        self.load_seconds = load_seconds
        self.cache_info = cache_info
        self.load_steps: dict[str, float] = {}
        self.load_breakdown: dict[str, float] = {}
        self._ops = None

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def compiled_batches(self) -> tuple[int, ...]:
        """The batch sizes Inductor compiled on CUDA (others run the exported program uncompiled, see ``_pick``)."""
        if not self._cuda or self.meta["dynamic"] or self.meta["compile"] != "inductor":
            return ()
        return tuple(sorted(self._batches))

    def _pick(self, batch: int):
        if not self._cuda or self.meta["dynamic"] or batch in self._batches or self.meta["compile"] != "inductor":
            return self._compiled
        if batch not in self._warned:
            self._warned.add(batch)
            warnings.warn(
                f"batch {batch} was not compiled into this engine (compiled: {sorted(self._batches)}); it runs the "
                "exported program uncompiled. Rebuild with backend_options batches=[...] to compile it.",
                RuntimeWarning,
                stacklevel=3,
            )
        return self._eager

    def _check_served(self, tensors: list) -> None:
        """Refuse a size the program fixed with an InputError (not a guard failure from deep inside torch)."""
        for spec, tensor in zip(self._signature.inputs, tensors):
            served = self._served.get(spec.name)
            if not served:
                continue
            shape = tuple(tensor.shape)
            if len(shape) != len(served) or any(want is not None and want != got for want, got in zip(served, shape)):
                text = "[" + ", ".join("?" if d is None else str(d) for d in served) + "]"
                raise InputError(
                    f"input '{spec.name}' has shape {list(shape)}, but this engine serves {spec.name}: {text} (the model "
                    "cannot keep those dims symbolic, so they were fixed when it was built); rebuild it with "
                    f"--input {spec.name}:{'x'.join(str(d) for d in shape)} or --data at the size you need"
                )
            for axis, (size, bounds) in enumerate(zip(shape, self._ranges.get(spec.name) or [])):
                if bounds and ((bounds[0] is not None and size < bounds[0]) or (bounds[1] is not None and size > bounds[1])):
                    low, high = bounds[0], "any" if bounds[1] is None else bounds[1]
                    raise InputError(
                        f"input '{spec.name}' has size {size} on axis {axis}, but this engine serves sizes {low} to "
                        f"{high} there (it was traced at other sizes, and the model may take another path at this "
                        f"one); rebuild it with --input {spec.name}:{'x'.join(str(d) for d in shape)} or --data at "
                        "the size you need")

    def _call(self, tensors: list):
        torch = self._torch
        self._check_served(tensors)
        batch = int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1
        fn = self._pick(batch)
        if self._cuda and self.meta["precision"] == "fp32":
            _set_fp32_math(torch, bool(self.meta.get("tf32")))
        with torch.no_grad():
            outputs = fn(*tensors)
        return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]

    def _staged(self, key: tuple, shape, dtype):
        buffer = self._staging.get(key)
        if buffer is None or tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype:
            if len(self._staging) > 32:
                self._staging.clear()
            buffer = self._torch.empty(tuple(shape), dtype=dtype, pin_memory=True)
            self._staging[key] = buffer
        return buffer

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with self._lock:
            tensors = []
            for spec in self._signature.inputs:
                array = np.asarray(feeds[spec.name], order="C")  # keeps 0-d scalars 0-d (ascontiguousarray makes them 1-d)
                if self._cuda:
                    host = self._staged(("in", spec.name), array.shape, torch_dtype_of(array))
                    np.copyto(host.numpy(), array, casting="no")
                    tensors.append(host.to(self._device, non_blocking=True))
                else:
                    tensors.append(torch.from_numpy(array))
            outputs = self._call(tensors)
            result: dict[str, np.ndarray] = {}
            if self._cuda:
                hosts = []
                for name, out in zip(self._signature.output_names, outputs):
                    host = self._staged(("out", name), out.shape, out.dtype)
                    host.copy_(out, non_blocking=True)
                    hosts.append((name, host))
                torch.cuda.current_stream(self._device).synchronize()
                for name, host in hosts:
                    result[name] = host.numpy().copy()
            else:
                for name, out in zip(self._signature.output_names, outputs):
                    result[name] = out.detach().numpy().copy()
            return result

    def run_torch(self, feeds: Mapping[str, Any], clone: bool = True) -> dict[str, Any]:
        """Run on tensors (moved to the engine's device if elsewhere); outputs stay on the device.

        With CUDA graphs the outputs live in static buffers the next call overwrites;
        ``clone=False`` skips the copy for callers that consume outputs before calling again.
        """
        with self._lock:
            outputs = self._call(self._device_tensors(feeds))
            return {name: (out.clone() if clone else out) for name, out in zip(self._signature.output_names, outputs)}

    # Engine.infer_device: tensors on the engine's device in and out, no host copies.
    supports_device_io = True

    def run_device(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Torch tensors (or any DLPack producer) in, torch tensors out; ``outputs`` given are filled in place."""
        if not outputs:
            return self.run_torch(feeds)
        torch = self._torch
        with self._lock:
            results = self._call(self._device_tensors(feeds))
            filled = {}
            # Copied while the lock is held: CUDA-graph outputs are static buffers the next call reuses.
            for name, value in zip(self._signature.output_names, results):
                target = outputs.get(name)
                if target is None:
                    filled[name] = value.clone()
                    continue
                target = target if isinstance(target, torch.Tensor) else torch.from_dlpack(target)
                target.copy_(value)
                filled[name] = target
            return filled

    def device_ops(self):
        from .device_ops import TorchDeviceOps

        if self._ops is None:
            self._ops = TorchDeviceOps(self._device)
        return self._ops

    def _device_tensors(self, feeds: Mapping[str, Any]) -> list:
        torch = self._torch
        tensors = []
        for spec in self._signature.inputs:
            value = feeds[spec.name]
            if not isinstance(value, torch.Tensor):
                value = torch.from_dlpack(value) if hasattr(value, "__dlpack__") else torch.as_tensor(value)
            if value.device != self._device:
                value = value.to(self._device, non_blocking=True)
            tensors.append(value)
        return tensors

    def close(self) -> None:
        self._compiled = self._eager = None
        self._staging.clear()
