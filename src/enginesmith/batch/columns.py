"""Tensors in Arrow columns: one tensor per row, read into numpy batches and written back.

A row's tensor may be stored as a (nested) fixed-size list, a (nested) variable list whose rows
all have the same shape, or Ray's tensor extension type; a rank-1 engine input ``[batch]`` is a
plain numeric column. Outputs are written as nested fixed-size lists (plain Arrow, readable by
pandas, pyarrow, Ray and Spark alike), or as variable lists where the signature leaves a dim open.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..errors import InputError
from ..signature import TensorSpec, shape_text


@dataclass(frozen=True)
class ColumnLayout:
    """What a column's Arrow type says about its rows: element dtype and per-row dims (None: varies)."""

    dtype: np.dtype
    row_dims: tuple[int | None, ...] | None  # None: not known from the type (a flattened tensor extension)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _tensor_extension_shape(t: pa.DataType) -> tuple[int | None, ...] | None:
    """Ray's ArrowTensorType keeps the per-row shape on the type; its variable-shape sibling does not."""
    shape = getattr(t, "shape", None)
    return tuple(int(d) if d is not None and d >= 0 else None for d in shape) if shape is not None else None


def column_layout(t: pa.DataType) -> ColumnLayout:
    """The element dtype and per-row dims a column's type declares; InputError for non-numeric columns."""
    if isinstance(t, pa.ExtensionType):
        storage = t.storage_type
        inner = column_layout(storage)
        shape = _tensor_extension_shape(t)
        return ColumnLayout(inner.dtype, shape if shape is not None else None)
    dims: list[int | None] = []
    while _is_list(t):
        dims.append(t.list_size if pa.types.is_fixed_size_list(t) else None)
        t = t.value_type
    if isinstance(t, pa.ExtensionType) or not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise InputError(f"holds {t} values, not numbers")
    return ColumnLayout(np.dtype(t.to_pandas_dtype()), tuple(dims))


def check_column(name: str, t: pa.DataType, spec: TensorSpec) -> ColumnLayout:
    """A column fits an engine input: numbers of a dtype that casts without changing values, the input's rank."""
    try:
        layout = column_layout(t)
    except InputError as exc:
        raise InputError(f"column '{name}' {exc}; engine input '{spec.name}' takes {_describe(spec)}") from None
    target = np.dtype(spec.dtype)
    if layout.dtype != target and not np.can_cast(layout.dtype, target, "same_kind"):
        raise InputError(
            f"column '{name}' holds {layout.dtype} but engine input '{spec.name}' takes {_describe(spec)}; "
            f"a {layout.dtype} -> {target} cast would change values: convert the column first"
        )
    row_spec = spec.shape[1:]
    dims = layout.row_dims
    if dims is None:
        return layout
    if len(dims) == len(row_spec):
        for axis, (got, want) in enumerate(zip(dims, row_spec), start=1):
            if got is not None and isinstance(want, int) and want >= 0 and got != want:
                raise InputError(
                    f"column '{name}' rows are {_dims_text(dims)} but engine input '{spec.name}' takes "
                    f"{_describe(spec)} (axis {axis} is {got}, the engine needs {want})"
                )
    elif not _fixed(row_spec) or len(dims) > len(row_spec):
        raise InputError(
            f"column '{name}' holds rank-{len(dims)} rows ({_dims_text(dims)}) but engine input '{spec.name}' takes "
            f"{_describe(spec)}: one row is {shape_text(row_spec)}"
        )
    elif None not in dims and _size(dims) != _size(row_spec):
        # fewer levels than the engine's row rank: a flattened tensor (Ray's tensor storage), same count of values
        raise InputError(
            f"column '{name}' rows hold {_size(dims)} values ({_dims_text(dims)}) but engine input '{spec.name}' "
            f"takes {_describe(spec)}: {_size(row_spec)} values per row"
        )
    return layout


def column_to_array(name: str, column: pa.ChunkedArray | pa.Array, spec: TensorSpec) -> np.ndarray:
    """The column's rows stacked into one array ``[rows, *row_shape]`` in the input's dtype."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise InputError(f"column '{name}' has {array.null_count} empty (null) rows; every row needs a tensor")
    rows = len(array)
    if isinstance(array.type, pa.ExtensionType):
        shape = _tensor_extension_shape(array.type)
        array = array.storage
        dims: list[int | None] = list(shape) if shape is not None and None not in shape else []
        values, found = _flatten(name, array, rows)
        dims = dims or found
    else:
        values, dims = _flatten(name, array, rows)
    row_spec = spec.shape[1:]
    if len(dims) != len(row_spec) and _fixed(row_spec) and values.size == rows * _size(row_spec):
        dims = list(row_spec)  # a flattened tensor (Ray's tensor storage read without Ray): the engine's shape
    result = values.reshape((rows, *dims))
    if result.ndim != len(spec.shape):
        raise InputError(
            f"column '{name}' rows are {_dims_text(tuple(dims))} but engine input '{spec.name}' takes {_describe(spec)}"
        )
    for axis, (want, got) in enumerate(zip(row_spec, result.shape[1:]), start=1):
        if isinstance(want, int) and want >= 0 and want != got:
            raise InputError(
                f"column '{name}' rows are {_dims_text(tuple(result.shape[1:]))} but engine input '{spec.name}' takes "
                f"{_describe(spec)} (axis {axis} is {got}, the engine needs {want})"
            )
    return result.astype(spec.dtype, copy=False)


def _flatten(name: str, array: pa.Array, rows: int) -> tuple[np.ndarray, list[int]]:
    """Peel list levels off; every row must have the same length at each level (a rectangular tensor)."""
    dims: list[int] = []
    count = rows
    while _is_list(array.type):
        if array.null_count:
            raise InputError(f"column '{name}' has empty (null) elements inside its rows")
        if pa.types.is_fixed_size_list(array.type):
            size = array.type.list_size
        else:
            lengths = np.unique(np.asarray(array.value_lengths()))
            if len(lengths) > 1:
                raise InputError(
                    f"column '{name}' has rows of different lengths ({', '.join(map(str, lengths[:4]))}, ...); "
                    "every row of an engine input needs the same shape"
                )
            size = int(lengths[0]) if len(lengths) else 0
        dims.append(size)
        array = array.flatten()
        count *= size
    if array.null_count:
        raise InputError(f"column '{name}' has empty (null) values inside its rows")
    values = array.to_numpy(zero_copy_only=False)
    if values.size != count:
        raise InputError(f"column '{name}' has rows of different shapes; every row needs the same shape")
    return values, dims


def array_to_column(value: np.ndarray, spec: TensorSpec) -> pa.Array:
    """An output batch ``[rows, ...]`` as one Arrow column: nested fixed-size lists where the row shape is fixed."""
    value = np.ascontiguousarray(value)
    column: pa.Array = pa.array(value.reshape(-1))
    fixed = _fixed(spec.shape[1:])
    for level in range(value.ndim - 1, 0, -1):
        size = value.shape[level]
        if fixed:
            column = pa.FixedSizeListArray.from_arrays(column, size)
        else:
            parents = int(np.prod(value.shape[:level], dtype=np.int64))
            column = pa.ListArray.from_arrays(pa.array(np.arange(parents + 1, dtype=np.int32) * size), column)
    return column


def output_type(spec: TensorSpec) -> pa.DataType:
    """The Arrow type :func:`array_to_column` gives an output, known before anything runs."""
    t = pa.from_numpy_dtype(np.dtype(spec.dtype))
    fixed = _fixed(spec.shape[1:])
    for dim in reversed(spec.shape[1:]):
        t = pa.list_(t, dim) if fixed else pa.list_(t)
    return t


def _fixed(dims) -> bool:
    return all(isinstance(d, int) and d >= 0 for d in dims)


def _size(dims) -> int:
    return int(np.prod([d for d in dims], dtype=np.int64)) if dims else 1


def _dims_text(dims: tuple[int | None, ...]) -> str:
    return shape_text(dims) if dims else "scalars"


def _describe(spec: TensorSpec) -> str:
    return f"{spec.dtype}{shape_text(spec.shape)}"
