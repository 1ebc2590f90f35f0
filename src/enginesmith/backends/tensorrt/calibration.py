"""TensorRT's implicit int8 calibration (``IInt8EntropyCalibrator2`` / ``IInt8MinMaxCalibrator``, TensorRT 8.6 and 10.x).

TensorRT asks the calibrator for batches through ``get_batch(names)`` and reads each
input's data at the returned device pointers, in the type the *network* gives the input:

- Since TensorRT 9 the ONNX parser keeps INT64 inputs as INT64 (8.6 made them INT32), so
  the type must come from the network (``network.get_input(i).dtype``), never from a
  guess: feeding int32 to an INT64 input makes TensorRT read twice the bytes allocated.
- Inputs that are not an index or mask type (FLOAT, INT32, INT64, BOOL) are calibrated
  from float32 data: Polygraphy's calibrator (``backend/trt/calibrator.py``, TensorRT 10)
  overrides them to float32 with the warning "TensorRT requires non-index calibration
  inputs to be provided in float32".
- TensorRT may call ``get_batch`` from a thread of its own, where another CUDA device (or
  none) is current: :class:`CalibrationFeeder` makes the engine's GPU current around its
  allocations and copies.
- A network with runtime dimensions needs a calibration profile (``set_calibration_profile``:
  "must be set if int8 calibration is used ... for a network with runtime dimensions"; its
  MIN and MAX are overwritten by OPT), also when a calibration cache means no batch is fed:
  :func:`calibration_profiles`.

Everything but :func:`make_calibrator` works without TensorRT (its tests run on CPU and,
for the device part, on any CUDA GPU).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from ...errors import BuildError, ValidationDataError
from . import cuda
from .options import Profile

# TensorRT DataType names (trt.DataType.<name>) that calibration feeds in their own type;
# every other input type (HALF, BF16, INT8, UINT8, FP8, ...) is fed as float32 (Polygraphy's rule).
_KEPT_TYPES = {"FLOAT": np.float32, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}


def trt_dtype_name(trt_dtype: Any) -> str:
    """``"INT64"`` for ``trt.DataType.INT64`` (pybind enums have ``.name``; ``str()`` is ``"DataType.INT64"``)."""
    return str(getattr(trt_dtype, "name", None) or str(trt_dtype).split(".")[-1]).upper()


def calibration_dtype(trt_dtype_name: str) -> np.dtype:
    """The numpy type a calibration batch must have for a network input of TensorRT type ``trt_dtype_name``."""
    return np.dtype(_KEPT_TYPES.get(trt_dtype_name.upper(), np.float32))


def calibration_array(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` as C-contiguous ``dtype``; integer values that ``dtype`` cannot hold are refused, not wrapped."""
    array = np.asarray(array)
    if array.dtype.kind in "iu" and dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise ValidationDataError(
                f"calibration input '{name}' has values {low}..{high}, outside {dtype}, the type the TensorRT network "
                f"takes (TensorRT 8.6 parses int64 inputs as int32): keep the values within {info.min}..{info.max}"
            )
    return np.asarray(array, dtype=dtype, order="C")  # keeps 0-d scalars 0-d (ascontiguousarray makes them 1-d)


def calibration_profiles(
    profiles: Mapping[str, Profile], batches: list[dict[str, np.ndarray]]
) -> dict[str, Profile]:
    """The calibration profile of a dynamic-shape network ({} for a static one).

    TensorRT calibrates at one shape, the profile's OPT: the shape of the calibration
    batches when there are any, else (scales read from a cache, no batch fed) the
    optimization profile's OPT.
    """
    if batches:
        shapes = {name: tuple(int(d) for d in batches[0][name].shape) for name in profiles if name in batches[0]}
        missing = sorted(set(profiles) - set(shapes))
        if missing:
            raise ValidationDataError(f"calibration batches lack input(s) {', '.join(missing)}")
    else:
        shapes = {name: profile.opt for name, profile in profiles.items()}
    return {name: Profile(shape, shape, shape) for name, shape in shapes.items()}


def uniform_batches(batches: list[dict[str, np.ndarray]], log: list[str]) -> list[dict[str, np.ndarray]]:
    """The batches shaped like the first: TensorRT calibrates at one shape, so a short last batch is dropped."""
    if not batches:
        return []
    first = {name: array.shape for name, array in batches[0].items()}
    kept = [b for b in batches if {n: a.shape for n, a in b.items()} == first]
    if len(kept) < len(batches):
        log.append(f"int8: {len(batches) - len(kept)} calibration batch(es) of another shape left out")
    return kept


class CalibrationFeeder:
    """The batches a calibrator hands TensorRT: each input cast to the network's type, on the engine's GPU.

    ``input_dtypes`` maps each network input to its calibration type (:func:`calibration_dtype`).
    :meth:`next_pointers` may be called from any thread: it makes ``gpu`` current while it
    allocates and copies, and leaves the calling thread's device as it was. Device buffers
    are kept per input and reused while the shape and type stay the same.
    """

    def __init__(self, batches: list[dict[str, np.ndarray]], input_dtypes: Mapping[str, np.dtype], gpu: int):
        self._batches: Iterator[dict[str, np.ndarray]] = iter(batches)
        self._dtypes = {name: np.dtype(dtype) for name, dtype in input_dtypes.items()}
        self.gpu = gpu
        self._device: dict[str, cuda.DeviceArray] = {}
        self._stream: cuda.Stream | None = None

    def host_arrays(self, batch: Mapping[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        """The batch's arrays for ``names``, in TensorRT's order and types (no CUDA involved)."""
        missing = [n for n in names if n not in batch]
        if missing:
            raise ValidationDataError(f"calibration batches lack input(s) {', '.join(missing)}")
        unknown = [n for n in names if n not in self._dtypes]
        if unknown:
            raise BuildError(f"TensorRT asked for calibration data of {', '.join(unknown)}, which are not network inputs")
        return [calibration_array(name, batch[name], self._dtypes[name]) for name in names]

    def next_pointers(self, names: list[str]) -> list[int] | None:
        """Device pointers of the next batch's inputs ``names``; None when the batches are spent."""
        batch = next(self._batches, None)
        if batch is None:
            return None
        hosts = self.host_arrays(batch, names)
        with cuda.on_device(self.gpu):
            if self._stream is None:
                self._stream = cuda.Stream()
            pointers = []
            for name, host in zip(names, hosts):
                device = self._device.get(name)
                if device is None or device.shape != host.shape or device.dtype != host.dtype:
                    device = self._device[name] = cuda.DeviceArray.empty(host.shape, host.dtype)
                device.copy_from_host(host, self._stream)
                pointers.append(device.ptr)
            self._stream.synchronize()  # ``hosts`` are pageable and temporary: the copies must be done
        return pointers

    def close(self) -> None:
        with cuda.on_device(self.gpu):
            self._device.clear()
            if self._stream is not None:
                self._stream.close()
                self._stream = None


def make_calibrator(trt: Any, class_name: str, feeder: CalibrationFeeder, cache: bytes | None) -> Any:
    """An instance of ``trt.<class_name>`` (e.g. IInt8EntropyCalibrator2) feeding ``feeder``'s batches."""
    base = getattr(trt, class_name)

    class Calibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # pybind trampoline: without this TensorRT crashes (Polygraphy's note)
            self._failure: BaseException | None = None
            self.written: bytes | None = None

        def get_batch_size(self) -> int:
            return 1  # explicit-batch networks: the batch is part of each input's shape

        def get_batch(self, names: list[str]) -> list[int] | None:
            # Exceptions must not cross into TensorRT: keep the first, end calibration, raise after the build.
            try:
                return feeder.next_pointers(list(names))
            except BaseException as exc:  # noqa: BLE001
                self._failure = self._failure or exc
                return None

        def read_calibration_cache(self) -> bytes | None:
            return cache

        def write_calibration_cache(self, data: Any) -> None:
            self.written = bytes(data)

        def free(self) -> None:
            """Free the calibration buffers (the build is over)."""
            feeder.close()

        def raise_failure(self) -> None:
            if self._failure is not None:
                raise BuildError(f"int8 calibration failed: {self._failure}") from self._failure

    return Calibrator()
