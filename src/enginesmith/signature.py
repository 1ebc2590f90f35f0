"""Input/output signatures: names, dtypes and shapes of an engine's tensors.

A dimension is an ``int`` when fixed, a ``str`` when symbolic (``"batch"``),
or ``None`` when unknown. Dtypes are numpy dtype names (``"float32"``) so a
signature survives a JSON round trip unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

Dim = int | str | None

# Dim names exporters write for a dimension they could not name. Such dims are independent
# unknowns, not one shared symbol: x[?, 3, ?, ?] takes any height and any width.
UNNAMED_DIM_TEXTS = frozenset({"", "?", "-1", "none", "null", "unk", "unknown", "dynamic"})
# tf2onnx and ONNX Runtime's symbolic shape inference name every unknown dim "unk__<n>".
_CONVERTER_UNNAMED = re.compile(r"unk__\d+")


def is_named_symbol(dim: Dim) -> bool:
    """A symbolic dim whose name means something: equal names must have equal sizes."""
    return isinstance(dim, str) and dim.strip().lower() not in UNNAMED_DIM_TEXTS and not _CONVERTER_UNNAMED.fullmatch(dim)


def normalize_dim(dim: Dim) -> Dim:
    """Negative sizes and unnamed symbols become ``None`` (unknown); a numeric string becomes an int."""
    if isinstance(dim, bool):
        return None
    if isinstance(dim, int):
        return dim if dim >= 0 else None
    if isinstance(dim, str):
        text = dim.strip()
        if text.isdigit():
            return int(text)
        return dim if is_named_symbol(dim) else None
    return None


def dim_text(dim: Dim) -> str:
    return "?" if dim is None else str(dim)


def shape_text(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join(dim_text(d) for d in shape) + "]"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.shape)

    def concrete_shape(self, batch: int = 1, dims: dict[str, int] | None = None) -> tuple[int, ...]:
        """The shape with symbolic dims resolved: axis 0 to ``batch``, others from ``dims`` or 1."""
        dims = dims or {}
        out = []
        for axis, d in enumerate(self.shape):
            if isinstance(d, int) and d >= 0:
                out.append(d)
            elif is_named_symbol(d) and d in dims:
                out.append(dims[d])
            else:
                out.append(batch if axis == 0 else 1)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=tuple(data["shape"]))

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}{shape_text(self.shape)}"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def fixed_batch(self) -> int | None:
        """The leading dim shared by every input when it is fixed, else ``None``."""
        leading = {spec.shape[0] if spec.rank else None for spec in self.inputs}
        if len(leading) == 1:
            (dim,) = leading
            if isinstance(dim, int) and dim > 0:
                return dim
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Signature":
        return cls(
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
        )

    def __str__(self) -> str:
        lines = ["inputs:"] + [f"  {t}" for t in self.inputs]
        lines += ["outputs:"] + [f"  {t}" for t in self.outputs]
        return "\n".join(lines)


def random_inputs(
    specs: Iterable[TensorSpec],
    batch: int = 1,
    seed: int = 0,
    dims: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs drawn from a seeded generator, shaped after the specs.

    Floats are standard normal; integers are small non-negative values so
    index-like inputs (token ids, class ids) stay in range; booleans are fair coins.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = spec.concrete_shape(batch, dims)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 10, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.random(shape) < 0.5
        else:
            raise TypeError(f"cannot generate random data of dtype {dtype} for input '{spec.name}'")
    return feeds
