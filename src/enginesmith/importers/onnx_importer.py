"""ONNX importer: load (with external data), check, infer shapes, read the signature."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from ..errors import SourceError
from ..graph._onnx import dims_of
from ..signature import Dim, Signature, TensorSpec, normalize_dim
from . import ImportedModel, ImportOptions, ReferenceRunner


def _dims(type_proto: onnx.TypeProto) -> tuple[Dim, ...]:
    """Unnamed dims ('?', '-1', a negative size, converters' 'unk__N') become None: each is its own unknown."""
    return tuple(normalize_dim(d) for d in dims_of(type_proto) or ())


def _dtype(value: onnx.ValueInfoProto) -> str:
    elem = value.type.tensor_type.elem_type
    if not value.type.HasField("tensor_type") or elem == onnx.TensorProto.UNDEFINED:
        raise SourceError(
            f"tensor '{value.name}' is not a plain tensor with a known element type; "
            "sequence, map and optional inputs/outputs are not supported"
        )
    return onnx.helper.tensor_dtype_to_np_dtype(elem).name


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    return TensorSpec(name=value.name, dtype=_dtype(value), shape=_dims(value.type))


def signature_of(model: onnx.ModelProto) -> Signature:
    """Inputs (initializers listed as inputs are weights, not user inputs) and outputs."""
    graph = model.graph
    weights = {init.name for init in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    inferred = {v.name: v for v in graph.value_info}
    outputs = []
    for out in graph.output:
        has_type = out.type.HasField("tensor_type") and out.type.tensor_type.elem_type
        outputs.append(_spec(out if has_type or out.name not in inferred else inferred[out.name]))
    inputs = tuple(_spec(v) for v in graph.input if v.name not in weights)
    if not inputs:
        raise SourceError("the model has no inputs (every graph input is an initializer); nothing to feed")
    return Signature(inputs=inputs, outputs=tuple(outputs))


def _load(path: Path) -> tuple[onnx.ModelProto, bytes]:
    """The model with external data loaded, and bytes that rebuild it anywhere."""
    if not path.exists():
        raise SourceError(f"model not found: '{path}': check the path")
    if not path.is_file():
        raise SourceError(f"'{path}' is not a file; an ONNX model is a single .onnx file")
    raw = path.read_bytes()
    try:
        model = onnx.load_model_from_string(raw)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise SourceError(
            f"'{path.name}' is not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "the file may be truncated or of another format"
        ) from None
    if not model.HasField("graph") or not model.opset_import:
        raise SourceError(f"'{path.name}' is not an ONNX model (no graph or opset in the file)")
    uses_external = any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    )
    if uses_external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise SourceError(
                f"external weights of '{path.name}' could not be read ({exc}); keep the data files next to the model"
            ) from None
        raw = model.SerializeToString()
    return model, raw


def _prepare(model: onnx.ModelProto, name: str) -> tuple[onnx.ModelProto, list[str]]:
    log: list[str] = []
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SourceError(f"'{name}' fails the ONNX checker: {first}") from None
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # shape inference is best effort; the signature comes from graph I/O
        log.append(f"shape inference skipped: {str(exc).splitlines()[0][:200]}")
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import)
    log.append(f"ONNX model '{name}': IR {model.ir_version}, opsets {opsets}, {len(model.graph.node)} nodes")
    return model, log


def import_source(source: Any, options: ImportOptions) -> ImportedModel:
    if isinstance(source, onnx.ModelProto):
        model, raw, name = source, source.SerializeToString(), (source.graph.name or "model") + ".onnx"
    else:
        path = Path(source)
        model, raw = _load(path)
        name = path.name
    model, log = _prepare(model, name)
    return ImportedModel(
        model=model,
        signature=signature_of(model),
        kind="onnx",
        source_filename=name,
        source_bytes=raw,
        log=log,
    )


def reference(source: Any, options: ImportOptions) -> ReferenceRunner:
    """The source run by ONNX Runtime with default options: what a user gets by hand."""
    from ..backends.onnxruntime import plain_session_runner

    if isinstance(source, onnx.ModelProto):
        raw = source.SerializeToString()
    else:
        _, raw = _load(Path(source))
    return plain_session_runner(raw)
