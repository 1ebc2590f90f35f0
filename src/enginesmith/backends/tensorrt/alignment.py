"""Device addresses TensorRT accepts: the 256-byte alignment check, and staging copies for the rest.

TensorRT requires every device address given to ``set_tensor_address`` to be 256-byte
aligned (``IExecutionContext::setTensorAddress`` in NvInferRuntime.h, 8.6 to 11.x) and
returns False otherwise. ``cudaMalloc`` returns at least that alignment, so enginesmith's
own buffers always qualify; a view into a caller's tensor may not: torch's ``x[1:]`` of a
float32 tensor starts 4 bytes in, and DLPack hands over its data pointer plus
``byte_offset`` (:mod:`._dlpack`) exactly as it is. Such tensors are copied device to
device through a pooled aligned buffer instead of being refused: inputs before the
engine runs, outputs after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cuda import BufferPool, DeviceArray, Stream

TENSORRT_ALIGNMENT = 256  # bytes (see the module docstring)


def misalignment(ptr: int, alignment: int = TENSORRT_ALIGNMENT) -> int:
    """How many bytes ``ptr`` lies past the last ``alignment`` boundary (0: aligned)."""
    return int(ptr) % alignment


def aligned_input(
    array: DeviceArray, pool: BufferPool, name: str, stream: Stream, alignment: int = TENSORRT_ALIGNMENT
) -> DeviceArray:
    """``array`` itself when aligned, else a pooled aligned copy of it (device to device, enqueued on ``stream``)."""
    if not misalignment(array.ptr, alignment):
        return array
    staged = pool.device(name, array.shape, array.dtype)
    staged.copy_from(array, stream)
    return staged


@dataclass
class OutputTarget:
    """Where an engine writes an output (``write``) and the array the caller gets (``result``).

    They are the same array unless the caller's buffer is misaligned: then the engine writes
    a pooled aligned buffer and :meth:`finish` copies it into the caller's.
    """

    result: DeviceArray
    write: DeviceArray

    @property
    def staged(self) -> bool:
        return self.write is not self.result

    def finish(self, stream: Stream) -> None:
        """Enqueue the copy into the caller's buffer (after the engine's work on ``stream``)."""
        if self.staged:
            self.result.copy_from(self.write, stream)


def aligned_output(
    array: DeviceArray, pool: BufferPool, name: str, alignment: int = TENSORRT_ALIGNMENT
) -> OutputTarget:
    """An :class:`OutputTarget` for the caller's output buffer ``array``."""
    if not misalignment(array.ptr, alignment):
        return OutputTarget(array, array)
    return OutputTarget(array, pool.device(name, array.shape, array.dtype))


def rejected_address(name: str, ptr: int, alignment: int = TENSORRT_ALIGNMENT) -> str:
    """Why ``set_tensor_address(name, ptr)`` returned False, as far as can be told from here."""
    offset = misalignment(ptr, alignment)
    if offset:
        why = f"it lies {offset} bytes past a {alignment}-byte boundary and TensorRT needs {alignment}-byte alignment"
    elif not ptr:
        why = "it is NULL"
    else:
        why = "the engine has no input or output of that name, or the memory is not on the engine's GPU"
    return f"TensorRT rejected device address 0x{int(ptr):x} for tensor '{name}' (set_tensor_address returned False): {why}"
