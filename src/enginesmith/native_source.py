"""A source model in its own framework, handed from its importer to a backend that builds from it directly.

Every source is converted to ONNX (the bundle's portable form, what graph passes, compatibility
reports and most backends read), but a backend of the same framework builds better from the
original: the PyTorch backend exports an ``nn.Module`` with ``torch.export`` instead of going
PyTorch -> ONNX -> onnx2torch -> PyTorch, where each hop loses coverage.

The handoff rides on the ONNX model the build passes along: the importer tags the ModelProto
(``metadata_props`` key ``enginesmith.native_source``, kept by every graph pass) and keeps the
object here, in this process only; ``native_source(model)`` finds it again. A model read from
a file, or one whose tag is unknown to this process, has none, and backends build from the ONNX.
The objects are held for the last few imports only (they can be large).
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import onnx

METADATA_KEY = "enginesmith.native_source"
_KEEP = 2  # imports whose native objects are held (a build, and the one being compared with it)
_REGISTRY: "OrderedDict[str, NativeSource]" = OrderedDict()


@dataclass(frozen=True)
class NativeSource:
    """What a backend needs to build from the source itself.

    ``model``: a ``torch.nn.Module`` (called with keyword arguments ``argument_names``) or a
    ``torch.export.ExportedProgram``. ``input_names``/``output_names``: the engine's names for
    the flattened inputs and outputs, in order (a backend uses the source only when the
    signature it builds for still has exactly these).
    """

    framework: str
    model: Any
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    argument_names: tuple[str, ...] = ()
    description: str = ""


def attach(model: onnx.ModelProto, source: NativeSource) -> None:
    """Tag ``model`` so that :func:`native_source` returns ``source`` for it (and its graph-pass descendants)."""
    key = uuid.uuid4().hex
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, key
    _REGISTRY[key] = source
    while len(_REGISTRY) > _KEEP:
        _REGISTRY.popitem(last=False)


def native_source(model: onnx.ModelProto) -> NativeSource | None:
    """The source ``model`` was converted from, when it was imported in this process and is still held."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return _REGISTRY.get(prop.value)
    return None
