"""DLPack capsules made and read with ctypes, so device buffers cross to torch or cupy without copies.

The layouts follow ``dlpack.h`` (v1.0): the legacy ``DLManagedTensor`` in a capsule named
``"dltensor"`` and the versioned ``DLManagedTensorVersioned`` in ``"dltensor_versioned"``.
A consumer renames the capsule to ``"used_..."`` and calls the tensor's deleter when it is
done; a capsule nobody consumed calls the deleter when it is garbage collected. The
deleter releases the Python object that owns the memory, so an exported buffer lives
exactly as long as the last consumer needs it. No numpy, torch or CUDA call happens here:
the same code serves CPU and CUDA memory, which lets the tests check the layouts on a
machine without a GPU.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

# DLDeviceType values (dlpack.h).
DL_CPU = 1
DL_CUDA = 2
DL_CUDA_HOST = 3
DL_CUDA_MANAGED = 13

# DLDataTypeCode values (dlpack.h); bool arrived in DLPack 0.8, older producers send uint8.
_DL_INT, _DL_UINT, _DL_FLOAT, _DL_BOOL = 0, 1, 2, 6
_CODES = {"i": _DL_INT, "u": _DL_UINT, "f": _DL_FLOAT, "b": _DL_BOOL}
_KINDS = {code: kind for kind, code in _CODES.items()}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]
_DLManagedTensorVersioned._fields_ = [
    ("version", _DLPackVersion),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _Deleter),
    ("flags", ctypes.c_uint64),
    ("dl_tensor", _DLTensor),
]

_pyapi = ctypes.pythonapi
_pyapi.PyCapsule_New.restype = ctypes.py_object
_pyapi.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
# The destructor gets a dying capsule: these take it as a bare address, never as a Python object.
_pyapi.PyCapsule_IsValid.restype = ctypes.c_int
_pyapi.PyCapsule_IsValid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_pyapi.PyCapsule_GetPointer.restype = ctypes.c_void_p
_pyapi.PyCapsule_GetPointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_pyapi.PyCapsule_SetName.restype = ctypes.c_int
_pyapi.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]

# A capsule keeps a pointer to its name, so names must outlive every capsule: module constants.
_NAME = ctypes.create_string_buffer(b"dltensor")
_NAME_VERSIONED = ctypes.create_string_buffer(b"dltensor_versioned")
_USED_NAME = ctypes.create_string_buffer(b"used_dltensor")
_USED_NAME_VERSIONED = ctypes.create_string_buffer(b"used_dltensor_versioned")

# Exported tensors still referenced by a capsule or a consumer: address of the managed struct ->
# (struct, shape array, owner). The deleter drops the entry, which releases the owner.
_live: dict[int, tuple[Any, Any, Any]] = {}
_live_lock = threading.Lock()


@_Deleter
def _deleter(address: int) -> None:
    with _live_lock:
        _live.pop(address, None)


def _capsule_destructor(name: Any, struct: type[ctypes.Structure]) -> Any:
    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def destructor(capsule: int) -> None:
        # A consumed capsule was renamed and its consumer calls the deleter; only an unconsumed one frees here.
        if _pyapi.PyCapsule_IsValid(capsule, name):
            address = _pyapi.PyCapsule_GetPointer(capsule, name)
            struct.from_address(address).deleter(address)

    return destructor


_DESTRUCTOR = _capsule_destructor(_NAME, _DLManagedTensor)
_DESTRUCTOR_VERSIONED = _capsule_destructor(_NAME_VERSIONED, _DLManagedTensorVersioned)


def dl_dtype(dtype: np.dtype) -> tuple[int, int]:
    """(DLPack type code, bits) of a numpy dtype; raises for dtypes DLPack cannot name."""
    dtype = np.dtype(dtype)
    if dtype.kind not in _CODES:
        raise TypeError(f"dtype {dtype} cannot be exchanged through DLPack")
    return _CODES[dtype.kind], dtype.itemsize * 8


def np_dtype(code: int, bits: int, lanes: int) -> np.dtype:
    if lanes != 1 or code not in _KINDS:
        raise TypeError(f"DLPack dtype (code {code}, bits {bits}, lanes {lanes}) has no numpy equivalent")
    return np.dtype(f"{_KINDS[code]}{bits // 8}") if code != _DL_BOOL else np.dtype(bool)


def export_capsule(
    ptr: int, shape: tuple[int, ...], dtype: np.dtype, device: tuple[int, int], owner: Any, versioned: bool
) -> Any:
    """A capsule describing C-contiguous memory at ``ptr``; ``owner`` stays alive until it is released."""
    code, bits = dl_dtype(dtype)
    shape_array = (ctypes.c_int64 * max(len(shape), 1))(*shape)
    tensor = _DLTensor(
        data=ptr,
        device=_DLDevice(*device),
        ndim=len(shape),
        dtype=_DLDataType(code, bits, 1),
        shape=ctypes.cast(shape_array, ctypes.POINTER(ctypes.c_int64)),
        strides=None,  # NULL means compact row-major
        byte_offset=0,
    )
    if versioned:
        managed: Any = _DLManagedTensorVersioned(
            version=_DLPackVersion(1, 0), manager_ctx=None, deleter=_deleter, flags=0, dl_tensor=tensor
        )
        name, destructor = _NAME_VERSIONED, _DESTRUCTOR_VERSIONED
    else:
        managed = _DLManagedTensor(dl_tensor=tensor, manager_ctx=None, deleter=_deleter)
        name, destructor = _NAME, _DESTRUCTOR
    address = ctypes.addressof(managed)
    with _live_lock:
        _live[address] = (managed, shape_array, owner)
    return _pyapi.PyCapsule_New(address, name, ctypes.cast(destructor, ctypes.c_void_p))


@dataclass
class ImportedTensor:
    """What a consumed capsule describes; ``release()`` hands the memory back to its producer."""

    # The first element: the producer's data pointer plus byte_offset. A view (torch's x[1:])
    # starts mid-allocation, so this need not be aligned; TensorRT callers check (alignment.py).
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    device_type: int
    device_id: int
    _managed_address: int
    _struct: type[ctypes.Structure]

    def release(self) -> None:
        address, self._managed_address = self._managed_address, 0
        if address:
            managed = self._struct.from_address(address)
            if managed.deleter:
                managed.deleter(address)

    def __del__(self) -> None:
        self.release()


def import_capsule(capsule: Any) -> ImportedTensor:
    """Consume a DLPack capsule (legacy or versioned); the memory must be C-contiguous."""
    for name, used, struct in (
        (_NAME, _USED_NAME, _DLManagedTensor),
        (_NAME_VERSIONED, _USED_NAME_VERSIONED, _DLManagedTensorVersioned),
    ):
        if _pyapi.PyCapsule_IsValid(id(capsule), name):
            address = _pyapi.PyCapsule_GetPointer(id(capsule), name)
            break
    else:
        raise TypeError("not an unconsumed DLPack capsule (expected a 'dltensor' or 'dltensor_versioned' capsule)")
    managed = struct.from_address(address)
    if struct is _DLManagedTensorVersioned and managed.version.major > 1:
        raise TypeError(f"DLPack version {managed.version.major}.{managed.version.minor} is newer than this reader (1.x)")
    tensor = managed.dl_tensor
    shape = tuple(tensor.shape[i] for i in range(tensor.ndim))
    dtype = np_dtype(tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes)
    if tensor.strides and not _is_contiguous(shape, [tensor.strides[i] for i in range(tensor.ndim)]):
        raise ValueError(f"the tensor of shape {shape} is not C-contiguous; make it contiguous first (.contiguous())")
    _pyapi.PyCapsule_SetName(capsule, used)  # from here on we own the deleter call
    return ImportedTensor(
        ptr=(tensor.data or 0) + tensor.byte_offset,
        shape=shape,
        dtype=dtype,
        device_type=tensor.device.device_type,
        device_id=tensor.device.device_id,
        _managed_address=address,
        _struct=struct,
    )


def _is_contiguous(shape: tuple[int, ...], strides: list[int]) -> bool:
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def live_exports() -> int:
    """How many exported tensors are still held by a capsule or a consumer (for leak tests)."""
    with _live_lock:
        return len(_live)
