"""A source model in its own framework, handed from its importer to a backend that builds from it directly.

Every source is converted to ONNX (the bundle's portable form, what graph passes, compatibility
reports and most backends read), but a backend of the same framework builds better from the
original: the PyTorch backend exports an ``nn.Module`` with ``torch.export`` instead of going
PyTorch -> ONNX -> onnx2torch -> PyTorch, where each hop loses coverage.

The handoff is explicit: the importer sets ``ImportedModel.native``, the build pipeline passes it
to the backend as ``BuildOptions.native_source`` (never stored in a manifest), and a backend
uses it only while the signature it builds for still has the source's input and output names.
A model read from an ONNX file or a rebuilt bundle's ``.onnx`` source has none, and backends
build from the ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
