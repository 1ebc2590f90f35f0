"""Checking user inputs against an engine's signature.

Errors name the input, what the engine expects and what it got. Casts that
keep meaning (float64 -> float32, int32 -> int64) are applied and reported as
an :class:`InputCastWarning`; casts that would change meaning (float -> int)
are refused.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np

from ..errors import InputError
from ..signature import Signature, TensorSpec, is_named_symbol, shape_text


class InputCastWarning(UserWarning):
    """An input was cast to the dtype the engine takes."""


def describe_inputs(signature: Signature) -> str:
    return ", ".join(f"{s.name} ({s.dtype}{shape_text(s.shape)})" for s in signature.inputs)


def to_numpy(name: str, value: Any) -> np.ndarray:
    """numpy arrays pass through; DLPack producers and ``__array__`` objects are converted."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "__dlpack__"):
        try:
            return np.from_dlpack(value)
        except (BufferError, TypeError, RuntimeError, ValueError):
            pass  # e.g. a GPU tensor: fall back to __array__, which copies to host where supported
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise InputError(f"input '{name}' cannot be converted to an array ({type(value).__name__}: {exc})") from None
    if array.dtype == object:
        raise InputError(f"input '{name}' is not numeric (ragged list or objects of type {type(value).__name__})")
    return array


def cast_to_spec(name: str, array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    target = np.dtype(spec.dtype)
    if array.dtype == target:
        return array
    if not np.can_cast(array.dtype, target, "same_kind"):
        raise InputError(
            f"input '{name}' has dtype {array.dtype} but the engine takes {target}; "
            f"a {array.dtype} -> {target} cast would change values, so convert it yourself if that is intended"
        )
    if target.kind in "iu" and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise InputError(f"input '{name}' has values outside the range of {target}, the dtype the engine takes")
    warnings.warn(f"input '{name}' cast from {array.dtype} to {target}", InputCastWarning, stacklevel=4)
    return array.astype(target)


# symbol -> (size, input, axis) where the size was first seen
SymbolSizes = dict[str, tuple[int, str, int]]


def check_shape(name: str, array: np.ndarray, spec: TensorSpec, symbols: SymbolSizes, batch_flexible: bool) -> None:
    """Rank, fixed dims and consistent named symbols; axis 0 may differ when batches are split.

    Only equal *named* symbols must agree (across inputs and within one input); unnamed
    dims ('?', None, '-1', converters' 'unk__N') are independent of each other.
    """
    if array.ndim != spec.rank:
        raise InputError(
            f"input '{name}' must have rank {spec.rank} {shape_text(spec.shape)}, got shape {tuple(array.shape)}"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
        if isinstance(want, int) and want >= 0 and want != got and not (axis == 0 and batch_flexible):
            raise InputError(
                f"input '{name}' must have shape {shape_text(spec.shape)}, got {tuple(array.shape)} "
                f"(axis {axis} is {got}, the engine needs {want})"
            )
        if is_named_symbol(want):
            size, where, where_axis = symbols.setdefault(want, (got, name, axis))
            if size != got:
                seen = "the same input" if where == name else f"input '{where}'"
                raise InputError(
                    f"input '{name}' axis {axis} is {got}, but symbol '{want}' is {size} ({seen} axis {where_axis}); "
                    f"dims named '{want}' must be equal"
                )


def prepare_inputs(signature: Signature, inputs: Mapping[str, Any], batch_flexible: bool) -> dict[str, np.ndarray]:
    unknown = [n for n in inputs if n not in signature.input_names]
    if unknown:
        raise InputError(f"unknown input '{unknown[0]}': this engine takes {describe_inputs(signature)}")
    missing = [n for n in signature.input_names if n not in inputs]
    if missing:
        raise InputError(f"missing input '{missing[0]}': this engine takes {describe_inputs(signature)}")
    feeds: dict[str, np.ndarray] = {}
    symbols: SymbolSizes = {}
    for spec in signature.inputs:
        array = cast_to_spec(spec.name, to_numpy(spec.name, inputs[spec.name]), spec)
        check_shape(spec.name, array, spec, symbols, batch_flexible)
        feeds[spec.name] = np.asarray(array, order="C")  # keeps 0-d scalars 0-d (ascontiguousarray makes them 1-d)
    return feeds


class InputChecker:
    """:func:`prepare_inputs` for one signature, remembering the input layouts it accepted.

    A layout is each input's shape, the arrays having exactly the engine's dtypes and being
    C-contiguous numpy arrays. The checks depend on nothing else, so a call whose arrays have a
    layout accepted before (nothing to cast or copy) skips them, and a plain ``dict`` of them is
    handed on as it is (sessions only read their feeds). On models that run in tens of
    microseconds the checks cost several percent of the call; serving and benchmarks call with
    the same layout again and again.
    """

    REMEMBERED = 64  # layouts kept; a model fed ever-new shapes is checked each time

    def __init__(self, signature: Signature, batch_flexible: bool):
        self._signature = signature
        self._names = tuple(signature.input_names)
        # np.dtype("float32") is one object: arrays of that dtype carry it, so an identity test says
        # "no cast needed" faster than a comparison. Unpickled arrays (multiprocessing, Ray's object
        # store) carry an equal but distinct dtype: they fall back to the comparison, not to the checks.
        self._expected = tuple((spec.name, np.dtype(spec.dtype)) for spec in signature.inputs)
        self._batch_flexible = batch_flexible
        self._accepted: set[tuple[tuple[int, ...], ...]] = set()

    def __call__(self, inputs: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        key = self._layout(inputs)
        if key is not None and key in self._accepted:
            return inputs if type(inputs) is dict else {name: inputs[name] for name in self._names}
        feeds = prepare_inputs(self._signature, inputs, self._batch_flexible)
        # Remembered only when the checks passed them as they were (no cast, no copy).
        if key is not None and len(self._accepted) < self.REMEMBERED and all(
                feeds[name] is inputs[name] for name in self._names):
            self._accepted.add(key)
        return feeds

    def _layout(self, inputs: Mapping[str, Any]) -> tuple[tuple[int, ...], ...] | None:
        """The inputs' shapes in signature order when they are exactly its names, as C-contiguous
        numpy arrays of the engine's dtypes; else None (the full checks decide)."""
        if len(inputs) != len(self._names):
            return None
        shapes = []
        for name, dtype in self._expected:
            array = inputs.get(name)
            if type(array) is not np.ndarray or not array.flags.c_contiguous:
                return None
            if array.dtype is not dtype and array.dtype != dtype:
                return None
            shapes.append(array.shape)
        return tuple(shapes)
