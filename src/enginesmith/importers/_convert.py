"""Helpers shared by the framework importers: lazy framework imports, quieting converters,
renaming ONNX graph inputs/outputs, naming dynamic dims, and finishing an import.

Nothing here imports a framework at module import time.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import re
import warnings
from typing import Any, Iterator, Mapping

import onnx

from ..errors import MissingDependencyError, SourceError, UnsupportedModelError
from . import ImportedModel, ImportOptions

# The opset converters are asked for unless ImportOptions.opset says otherwise: every
# backend enginesmith ships (ONNX Runtime, TensorRT 8.6+) runs it fully.
DEFAULT_OPSET = 17

TF_EXTRA = "pip install 'enginesmith[tensorflow]'"
TORCH_EXTRA = "pip install 'enginesmith[torch]'"

# Loggers whose records are captured (not printed) while a converter runs.
TF_LOGGERS = ("tensorflow", "tf2onnx", "absl", "keras", "h5py")
TORCH_LOGGERS = ("torch", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")


def opset_for(options: ImportOptions, default: int = DEFAULT_OPSET) -> int:
    """The user's ``--opset``, else the target backend's choice, else ``default``."""
    return int(options.opset or options.default_opset or default)


# --------------------------------------------------------------------------- framework imports


def require(module: str, extra: str, what: str) -> Any:
    """Import ``module`` or raise MissingDependencyError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{what} needs '{module}', which is not installed ({exc}): {extra}") from None


def tensorflow() -> Any:
    """TensorFlow, imported quietly (its C++ logging is set before the first import)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf = require("tensorflow", TF_EXTRA, "importing TensorFlow models")
    with contextlib.suppress(Exception):
        tf.get_logger().setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    return tf


def keras() -> Any:
    tensorflow()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return require("keras", TF_EXTRA, "importing Keras models")


# tf2onnx's node-name counter as a fresh process has it when its first conversion starts (see tf2onnx()).
_TF2ONNX_FIRST_NAME: list[int] = []


def tf2onnx() -> Any:
    """tf2onnx, quiet, with its node-name counter reset: call it before each conversion.

    tf2onnx numbers the nodes it inserts (``Transpose__8``) with a process-wide counter, so a model
    converted a second time in one process got other tensor names, and the int8 ranges a bundle stores
    by tensor name (used by rebuilds and layer-wise) no longer matched. Every conversion now starts
    from the value a fresh process starts from (after the imports that draw names), so the names are
    also those of engines built before this reset.
    """
    tensorflow()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = require("tf2onnx", TF_EXTRA, "converting TensorFlow models")
        require("tf2onnx.tf_loader", TF_EXTRA, "converting TensorFlow models")
        require("tf2onnx.tfonnx", TF_EXTRA, "converting TensorFlow models")  # its rewriters draw a name on import
    with contextlib.suppress(Exception):
        module.logging.set_level(logging.ERROR)
    with contextlib.suppress(AttributeError):
        if not _TF2ONNX_FIRST_NAME:
            _TF2ONNX_FIRST_NAME.append(module.utils.INTERNAL_NAME)
        module.utils.INTERNAL_NAME = _TF2ONNX_FIRST_NAME[0]
    return module


def torch() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return require("torch", TORCH_EXTRA, "importing PyTorch models")


# --------------------------------------------------------------------------- quiet converters


class _Capture(logging.Handler):
    def __init__(self, records: list[str]):
        super().__init__(level=logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().strip().splitlines()[0]
        except Exception:  # noqa: BLE001 - a malformed log record must not break a conversion
            return
        if message and message not in self.records:
            self.records.append(message)


@contextlib.contextmanager
def quiet(loggers: tuple[str, ...], streams: bool = False) -> Iterator[list[str]]:
    """Silence the converters' logging and warnings; yields the error lines they logged.

    With ``streams``, Python-level prints to stdout/stderr are swallowed as well (torch.export
    prints partial graphs to stderr when it fails); only for conversion steps, since this
    is process-wide while it lasts.
    """
    records: list[str] = []
    handler = _Capture(records)
    saved = []
    for name in loggers:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, list(logger.handlers)))
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            if streams:
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield records
    finally:
        for logger, level, propagate, handlers in saved:
            logger.handlers = handlers
            logger.propagate = propagate
            logger.setLevel(level)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first meaningful line of an exception, without ANSI colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------- ONNX graph edits


def _graph_names(graph: onnx.GraphProto, into: set[str]) -> set[str]:
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        into.add(value.name)
    for init in graph.initializer:
        into.add(init.name)
    for sparse in graph.sparse_initializer:
        into.add(sparse.values.name)
    for node in graph.node:
        into.update(n for n in node.input if n)
        into.update(n for n in node.output if n)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _graph_names(attr.g, into)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _graph_names(sub, into)
    return into


def _defined_in(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph defines itself, which shadow the same names of enclosing scopes."""
    names = {v.name for v in graph.input} | {i.name for i in graph.initializer}
    names |= {s.values.name for s in graph.sparse_initializer}
    for node in graph.node:
        names.update(n for n in node.output if n)
    return names


def _apply_renames(graph: onnx.GraphProto, mapping: Mapping[str, str], top: bool) -> None:
    if not top:
        shadowed = _defined_in(graph)
        mapping = {k: v for k, v in mapping.items() if k not in shadowed}
        if not mapping:
            return
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name in mapping:
            value.name = mapping[value.name]
    if top:
        for init in graph.initializer:
            if init.name in mapping:
                init.name = mapping[init.name]
        for sparse in graph.sparse_initializer:
            if sparse.values.name in mapping:
                sparse.values.name = mapping[sparse.values.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        if top:
            for i, name in enumerate(node.output):
                if name in mapping:
                    node.output[i] = mapping[name]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _apply_renames(attr.g, mapping, top=False)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _apply_renames(sub, mapping, top=False)


def rename_tensors(model: onnx.ModelProto, mapping: Mapping[str, str]) -> dict[str, str]:
    """Rename tensors of the main graph everywhere they appear (producers, consumers, graph
    inputs/outputs, value_info, initializers, and references from If/Loop/Scan bodies).

    A target name already taken by another tensor is freed first by renaming that tensor
    (``name__1``...), so renames never merge two tensors. Returns every rename applied.
    """
    mapping = {old: new for old, new in mapping.items() if old != new}
    if not mapping:
        return {}
    targets = list(mapping.values())
    if len(set(targets)) != len(targets):
        raise SourceError(f"two tensors would get the same name: {sorted(targets)}")
    existing = _graph_names(model.graph, set())
    missing = [old for old in mapping if old not in existing]
    if missing:
        raise SourceError(f"no tensor named {', '.join(missing)} in the converted model")
    taken = existing | set(targets)
    full: dict[str, str] = {}
    for new in targets:
        if new in existing and new not in mapping:
            i = 1
            while f"{new}__{i}" in taken:
                i += 1
            full[new] = f"{new}__{i}"
            taken.add(full[new])
    full.update(mapping)
    _apply_renames(model.graph, full, top=True)
    return full


def rename_dim_params(model: onnx.ModelProto, mapping: Mapping[str, str]) -> None:
    """Rename symbolic dims (``unk__3`` -> ``batch``) in graph inputs, outputs and value_info."""
    graph = model.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if not value.type.HasField("tensor_type"):
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]


def name_batch_dims(model: onnx.ModelProto, outputs: bool = True) -> bool:
    """Call the leading dim ``batch`` where every graph input (and, with ``outputs``, output)
    has a non-fixed leading dim. Returns whether the batch is dynamic."""
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in weights]

    def leading(value: onnx.ValueInfoProto):
        shape = value.type.tensor_type.shape
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape") or not shape.dim:
            return None
        return shape.dim[0]

    dims = [leading(v) for v in inputs]
    if not dims or any(d is None or d.HasField("dim_value") for d in dims):
        return False
    symbols = {d.dim_param for d in dims if d.HasField("dim_param")}
    for d in dims:
        d.dim_param = "batch"
    rename_dim_params(model, {s: "batch" for s in symbols})
    if outputs:
        for value in graph.output:
            d = leading(value)
            if d is not None and not d.HasField("dim_value"):
                d.dim_param = "batch"
    return True


def unknown_ops(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes a converter left unconverted: ops of the ONNX domain that ONNX does not define."""
    found = []
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            found.append(node)
    return found


def finish(
    model: onnx.ModelProto,
    *,
    kind: str,
    source_filename: str,
    source_bytes: bytes,
    log: list[str],
) -> ImportedModel:
    """Check the converted model, infer shapes, read its signature."""
    from .onnx_importer import signature_of

    model, checked = check_converted(model, source_filename)
    log = log + checked
    return ImportedModel(
        model=model,
        signature=signature_of(model),
        kind=kind,
        source_filename=source_filename,
        source_bytes=source_bytes,
        log=log,
    )


def check_converted(model: onnx.ModelProto, source_filename: str) -> tuple[onnx.ModelProto, list[str]]:
    """The converted model checked and with shapes inferred, and its build-log lines."""
    from .onnx_importer import _prepare

    try:
        model, prep_log = _prepare(model, source_filename)
    except SourceError as exc:
        raise UnsupportedModelError(f"the ONNX model converted from '{source_filename}' is invalid: {exc}") from None
    return model, [line.replace("ONNX model", "converted ONNX model", 1) for line in prep_log]


def converter_errors(records: list[str], limit: int = 5) -> list[str]:
    """Converter error lines worth keeping in the build log."""
    return [f"converter: {line[:200]}" for line in records[:limit]]


def tensor_name(name: str) -> str:
    """A TF tensor name for a node or tensor name ('x' -> 'x:0')."""
    return name if re.search(r":\d+$", name) else f"{name}:0"


def plain_name(name: str) -> str:
    """The name users see for a TF tensor: 'x:0' -> 'x' (other output indexes are kept)."""
    return name[:-2] if name.endswith(":0") else name
