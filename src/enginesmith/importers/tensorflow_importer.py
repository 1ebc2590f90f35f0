"""TensorFlow importer: SavedModel folders and frozen GraphDef ``.pb`` files, converted with tf2onnx.

SavedModel: one signature (``ImportOptions.signature_key``, default ``serving_default``) is
converted the way the ``tf2onnx`` command line does it; the ONNX inputs and outputs carry
the signature's argument and output names. The bundle embeds the folder as
``<dirname>.dir.zip`` (see :mod:`enginesmith.importers.archive`).

Frozen GraphDef (the TF1-era export): the inputs are the Placeholders the outputs depend
on and the outputs are the nodes nothing consumes, leaving out training, saver, summary and
assert nodes (see :func:`graph_io`); ``input_names``/``output_names`` override both.
Only the part of the graph the outputs need is converted (training-only nodes are
stripped). :func:`list_graph_nodes` lists the nodes for ``enginesmith inspect``.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from ..errors import EnginesmithError, SourceError, UnsupportedModelError
from . import ImportedModel, ImportOptions, ReferenceRunner
from . import _convert as cv

# Ops that are never model outputs even when nothing consumes them.
_NOT_OUTPUT_OPS = {
    "NoOp", "Const", "Placeholder", "PlaceholderWithDefault", "VariableV2", "Variable", "VarHandleOp",
    "VarIsInitializedOp", "Assert", "Print", "PrintV2", "CheckNumerics", "IsVariableInitialized",
    "MergeV2Checkpoints", "ShardedFilename", "StringJoin", "ReadVariableOp",
}
_NOT_OUTPUT_PREFIXES = ("Apply", "ResourceApply", "SparseApply", "ResourceSparseApply", "Assign", "Save", "Restore")
# First name scopes of training / bookkeeping subgraphs.
_TRAINING_SCOPES = {
    "save", "saver", "gradients", "train", "training", "optimizer", "optimizers", "summaries", "summary",
    "loss", "losses", "metrics", "init", "global_step", "Adam", "SGD", "GradientDescent", "Momentum",
    "RMSProp", "Adagrad", "Ftrl", "ExponentialMovingAverage", "report_uninitialized_variables",
}
_VARIABLE_OPS = {"VariableV2", "Variable", "VarHandleOp"}
_AUTO_IDENTITY = re.compile(r"^Identity(_\d+)?$")


def _node_of(name: str) -> str:
    """The node name of an input reference ('^ctrl', 'x:1' -> 'ctrl', 'x')."""
    return name.lstrip("^").split(":")[0]


def _is_training_node(node: Any) -> bool:
    op = node.op
    if op in _NOT_OUTPUT_OPS or op.startswith(_NOT_OUTPUT_PREFIXES) or "Summary" in op:
        return True
    parts = node.name.split("/")
    if any(part.lower().startswith("assert") for part in parts):
        return True  # assertion subgraphs (Assert, AssertGuard, assert_equal/...)
    scope = parts[0]
    return scope in _TRAINING_SCOPES or re.sub(r"_\d+$", "", scope) in _TRAINING_SCOPES


# --------------------------------------------------------------------------- frozen graphs


def read_graph_def(path: str | Path) -> Any:
    """The GraphDef stored in a .pb file."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"model not found: '{path}': check the path")
    if not path.is_file():
        raise SourceError(f"'{path}' is not a file; a frozen TensorFlow graph is a single .pb file")
    tf = cv.tensorflow()
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError
        raise SourceError(
            f"'{path.name}' is not a TensorFlow GraphDef ({cv.first_line(exc, 120)}); "
            "it may be truncated, a SavedModel's saved_model.pb (give its folder), or another format"
        ) from None
    if not graph_def.node:
        raise SourceError(f"'{path.name}' holds no TensorFlow graph nodes; it is not a frozen GraphDef")
    return graph_def


def graph_io(graph_def: Any) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of a frozen graph, found by structure.

    Outputs: nodes nothing consumes (data or control edges), leaving out training,
    saver, summary, assert and bookkeeping nodes; an auto-named trailing ``Identity`` that
    TF2 freezing adds is looked through to the top-level, named node it forwards.
    Inputs: the Placeholders those outputs depend on (PlaceholderWithDefault is not an
    input: it has a default).
    """
    nodes = {n.name: n for n in graph_def.node}
    consumed: set[str] = set()
    for node in graph_def.node:
        consumed.update(_node_of(i) for i in node.input)
    outputs: list[str] = []
    for node in graph_def.node:
        if node.name in consumed or _is_training_node(node):
            continue
        name = node.name
        data = [i for i in node.input if not i.startswith("^")]
        if node.op == "Identity" and _AUTO_IDENTITY.match(name) and len(data) == 1:
            inner = data[0]
            inner_node = nodes.get(_node_of(inner))
            if inner_node is not None and "/" not in inner_node.name and not _AUTO_IDENTITY.match(inner_node.name):
                name = inner if ":" in inner and not inner.endswith(":0") else inner_node.name
        if name not in outputs:
            outputs.append(name)
    inputs = _placeholders_feeding(graph_def, outputs)
    return inputs, outputs


def _ancestors(graph_def: Any, outputs: list[str]) -> set[str]:
    nodes = {n.name: n for n in graph_def.node}
    seen: set[str] = set()
    queue = deque(_node_of(o) for o in outputs)
    while queue:
        name = queue.popleft()
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        queue.extend(_node_of(i) for i in nodes[name].input)
    return seen


def _placeholders_feeding(graph_def: Any, outputs: list[str]) -> list[str]:
    needed = _ancestors(graph_def, outputs)
    return [n.name for n in graph_def.node if n.op == "Placeholder" and n.name in needed]


def list_graph_nodes(path: str | Path) -> list[dict[str, Any]]:
    """Every node of a frozen graph: name, op, inputs, and role ('input', 'output' or '')."""
    graph_def = read_graph_def(path)
    inputs, outputs = graph_io(graph_def)
    output_nodes = {_node_of(o) for o in outputs}
    rows = []
    for node in graph_def.node:
        role = "input" if node.name in inputs else "output" if node.name in output_nodes else ""
        rows.append({"name": node.name, "op": node.op, "inputs": list(node.input), "role": role})
    return rows


def _resolve_names(graph_def: Any, given: list[str], what: str, path: Path) -> list[str]:
    nodes = {n.name for n in graph_def.node}
    missing = [g for g in given if _node_of(g) not in nodes]
    if missing:
        close = [n for n in nodes if any(m.split(":")[0].lower() in n.lower() for m in missing)][:5]
        hint = f" (similar: {', '.join(sorted(close))})" if close else ""
        raise SourceError(
            f"{what} {', '.join(missing)} not in '{path.name}'{hint}; "
            f"'enginesmith inspect {path.name}' lists the nodes"
        )
    return [g.split(":")[0] if g.endswith(":0") else g for g in given]


def _frozen_io(graph_def: Any, options: ImportOptions, path: Path) -> tuple[list[str], list[str], list[str]]:
    log: list[str] = []
    auto_in, auto_out = graph_io(graph_def)
    if options.output_names:
        outputs = _resolve_names(graph_def, options.output_names, "output(s)", path)
    else:
        outputs = auto_out
        if not outputs:
            raise SourceError(
                f"no output nodes found in '{path.name}'; give them with --outputs NAME[,NAME] "
                f"('enginesmith inspect {path.name}' lists the nodes)"
            )
        log.append(f"outputs found by structure: {', '.join(outputs)}")
    if options.input_names:
        inputs = _resolve_names(graph_def, options.input_names, "input(s)", path)
    else:
        inputs = auto_in if not options.output_names else _placeholders_feeding(graph_def, outputs)
        if not inputs:
            raise SourceError(
                f"no Placeholder feeds the outputs {', '.join(outputs)} of '{path.name}'; give the inputs with --inputs NAME"
            )
        log.append(f"inputs found by structure: {', '.join(inputs)}")
    return inputs, outputs, log


def _strip(graph_def: Any, inputs: list[str], outputs: list[str]) -> tuple[Any, int]:
    """Only what the outputs need (training, saver and summary nodes go), Identity chains folded."""
    tf = cv.tensorflow()
    graph_util = tf.compat.v1.graph_util
    keep = sorted({_node_of(n) for n in inputs + outputs})
    sub = graph_util.extract_sub_graph(graph_def, [_node_of(o) for o in outputs])
    sub = graph_util.remove_training_nodes(sub, protected_nodes=keep)
    return sub, len(graph_def.node) - len(sub.node)


def _shape_override(graph_def: Any, inputs: list[str], options: ImportOptions) -> dict[str, list[int]] | None:
    """tf2onnx shape overrides from --input/--dynamic (-1 marks a dynamic axis)."""
    if not options.input_shapes and not options.dynamic_axes:
        return None
    nodes = {n.name: n for n in graph_def.node}
    unknown = (set(options.input_shapes) | set(options.dynamic_axes)) - {cv.plain_name(i) for i in inputs}
    if unknown:
        raise SourceError(f"no input named {', '.join(sorted(unknown))}; the inputs are {', '.join(inputs)}")
    override: dict[str, list[int]] = {}
    for name in inputs:
        plain = cv.plain_name(name)
        if plain not in options.input_shapes and plain not in options.dynamic_axes:
            continue
        if plain in options.input_shapes:
            shape = [int(d) for d in options.input_shapes[plain]]
        else:
            node = nodes.get(_node_of(name))
            attr = node.attr.get("shape") if node is not None else None
            if attr is None or attr.shape.unknown_rank:
                raise SourceError(f"input '{plain}' has no known rank; give its full shape with --input {plain}:1x...")
            shape = [int(d.size) for d in attr.shape.dim]
        for axis in options.dynamic_axes.get(plain, []):
            shape[axis] = -1
        override[cv.tensor_name(name)] = shape
    return override


def _convert_dynamic_or_fixed(
    convert: Callable[[ImportOptions], onnx.ModelProto], options: ImportOptions
) -> tuple[onnx.ModelProto, list[str]]:
    """``convert(options)``; when that fails with dynamic axes asked for, ``convert`` at the graph's own
    shapes and a log line saying so. The first failure is raised when there are no dynamic axes.

    A graph exported at batch 1 (TF Object Detection API) bakes the 1 into its Reshapes, and
    TensorFlow's shape inference fails once the axis is unknown. Converted at batch 1, the model gets
    its dynamic axes from the make_dynamic pass build runs for the same ``dynamic_axes``, which
    rewrites those Reshapes and checks the result per item.
    """
    try:
        return convert(options), []
    except EnginesmithError:
        raise
    except Exception:  # noqa: BLE001 - tf2onnx raises many kinds
        if not options.dynamic_axes:
            raise
    proto = convert(replace(options, dynamic_axes={}))
    axes = ", ".join(f"{name}:{list(a)}" for name, a in options.dynamic_axes.items())
    return proto, [f"tf2onnx cannot convert with dynamic axes {axes}: converted at the graph's own shapes; "
                   "the make_dynamic graph pass marks them"]


def _convert_frozen(path: Path, options: ImportOptions) -> tuple[onnx.ModelProto, list[str]]:
    tf2onnx = cv.tf2onnx()
    graph_def = read_graph_def(path)
    inputs, outputs, log = _frozen_io(graph_def, options, path)
    stripped, removed = _strip(graph_def, inputs, outputs)
    if removed:
        log.append(f"stripped {removed} nodes the outputs do not need (training, saver, summary, assert)")
    variables = [n.name for n in stripped.node if n.op in _VARIABLE_OPS]
    if variables:
        raise SourceError(
            f"'{path.name}' is not frozen: the outputs read variables ({', '.join(variables[:3])}); freeze it "
            "(convert_variables_to_constants) or give the SavedModel folder instead"
        )
    opset = cv.opset_for(options)
    in_tensors = [cv.tensor_name(n) for n in inputs]
    out_tensors = [cv.tensor_name(n) for n in outputs]

    def convert(opts: ImportOptions) -> onnx.ModelProto:
        proto, _ = tf2onnx.convert.from_graph_def(
            stripped, name=path.stem, input_names=in_tensors, output_names=out_tensors, opset=opset,
            shape_override=_shape_override(graph_def, inputs, opts),
        )
        return proto

    with cv.quiet(cv.TF_LOGGERS, streams=True) as records:
        try:
            proto, note = _convert_dynamic_or_fixed(convert, options)
        except EnginesmithError:
            raise
        except Exception as exc:  # noqa: BLE001 - tf2onnx raises many kinds
            raise UnsupportedModelError(f"tf2onnx cannot convert '{path.name}': {cv.first_line(exc, 240)}") from None
    log += note
    log.insert(0, f"converted frozen graph '{path.name}' with tf2onnx {tf2onnx.__version__} from_graph_def, opset {opset}")
    log += cv.converter_errors(records)
    _raise_unknown(proto, path.name)
    mapping = {t: cv.plain_name(t) for t in in_tensors + out_tensors if cv.plain_name(t) != t}
    if mapping:
        cv.rename_tensors(proto, mapping)
    if cv.name_batch_dims(proto):
        log.append("dynamic batch dimension 'batch'")
    return proto, log


def _raise_unknown(proto: onnx.ModelProto, label: str) -> None:
    unknown = cv.unknown_ops(proto)
    if unknown:
        nodes = ", ".join(sorted({f"'{n.name}' ({n.op_type})" for n in unknown})[:6])
        raise UnsupportedModelError(
            f"'{label}' uses TensorFlow ops tf2onnx cannot convert to ONNX: {nodes}; "
            "rewrite them with standard ops or try another --opset"
        )


def _frozen_reference(path: Path, options: ImportOptions) -> ReferenceRunner:
    """The original (unstripped) graph run by TensorFlow."""
    tf = cv.tensorflow()
    graph_def = read_graph_def(path)
    inputs, outputs, _ = _frozen_io(graph_def, options, path)

    def load():
        tf.compat.v1.import_graph_def(graph_def, name="")

    with cv.quiet(cv.TF_LOGGERS):
        try:
            wrapped = tf.compat.v1.wrap_function(load, [])
            graph = wrapped.graph
            pruned = wrapped.prune(
                feeds=[graph.as_graph_element(cv.tensor_name(n)) for n in inputs],
                fetches=[graph.as_graph_element(cv.tensor_name(n)) for n in outputs],
            )
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"TensorFlow cannot run '{path.name}': {cv.first_line(exc, 240)}") from None
    in_names = [cv.plain_name(n) for n in inputs]
    out_names = [cv.plain_name(n) for n in outputs]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with cv.quiet(cv.TF_LOGGERS):
            results = pruned(*[tf.constant(np.asarray(feeds[n])) for n in in_names])
        return {name: np.asarray(value) for name, value in zip(out_names, results)}

    run.input_names = in_names  # type: ignore[attr-defined]  # validate checks them before running
    return run


# --------------------------------------------------------------------------- SavedModel


def _saved_model_dir(source: str | Path) -> Path:
    path = Path(source)
    if not path.exists():
        raise SourceError(f"model not found: '{path}': check the path")
    if path.is_file() and path.name in ("saved_model.pb", "saved_model.pbtxt"):
        path = path.parent
    if not path.is_dir() or not ((path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()):
        raise SourceError(f"'{path}' is not a TensorFlow SavedModel folder (no saved_model.pb in it)")
    return path


def _load_saved_model(path: Path) -> Any:
    tf = cv.tensorflow()
    with cv.quiet(cv.TF_LOGGERS):
        try:
            return tf.saved_model.load(str(path))
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"'{path.name}' is not a loadable SavedModel ({cv.first_line(exc, 240)})") from None


def _signature(loaded: Any, key: str, path: Path) -> Any:
    available = sorted(k for k in loaded.signatures.keys() if not k.startswith("_"))
    if key not in loaded.signatures:
        if not available:
            raise SourceError(
                f"SavedModel '{path.name}' has no signatures; export it with a serving signature "
                "(tf.saved_model.save(obj, path, signatures=...) or keras model.export(path))"
            )
        raise SourceError(
            f"SavedModel '{path.name}' has no signature '{key}'; it has {', '.join(available)}: choose one with --signature"
        )
    return loaded.signatures[key]


def _signature_names(func: Any) -> tuple[list[str], list[str]]:
    """(input argument names, output names) of a signature, in tf2onnx's order (sorted keys)."""
    kwargs = func.structured_input_signature[1]
    outputs = func.structured_outputs
    out_names = sorted(outputs) if isinstance(outputs, dict) else [f"output_{i}" for i in range(len(func.outputs))]
    return sorted(kwargs), out_names


def _convert_saved_model(path: Path, options: ImportOptions) -> tuple[onnx.ModelProto, list[str]]:
    tf2onnx = cv.tf2onnx()
    from tf2onnx import tf_loader
    from tf2onnx.convert import _convert_common

    key = options.signature_key or "serving_default"
    try:
        loaded = _load_saved_model(path)
    except SourceError as exc:
        return _convert_saved_model_v1(path, options, key, exc)
    func = _signature(loaded, key, path)
    _, out_names = _signature_names(func)
    opset = cv.opset_for(options)
    with cv.quiet(cv.TF_LOGGERS, streams=True) as records:
        def convert(opts: ImportOptions) -> onnx.ModelProto:
            # What `python -m tf2onnx.convert --saved-model DIR --signature_def KEY` does.
            graph_def, inputs, outputs, tables, renames = tf_loader.from_saved_model(
                str(path), None, None, tag=["serve"], signatures=[key],
                return_initialized_tables=True, return_tensors_to_rename=True,
            )
            proto, _ = _convert_common(
                graph_def, name=path.name, continue_on_error=True, opset=opset,
                input_names=inputs, output_names=outputs, tensors_to_rename=renames,
                initialized_tables=tables, shape_override=_saved_model_override(func, inputs, renames, opts),
            )
            return proto

        try:
            proto, note = _convert_dynamic_or_fixed(convert, options)
        except EnginesmithError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedModelError(
                f"tf2onnx cannot convert signature '{key}' of '{path.name}': {cv.first_line(exc, 240)}"
            ) from None
    log = [f"converted SavedModel '{path.name}' signature '{key}' with tf2onnx {tf2onnx.__version__}, opset {opset}"]
    log += note + cv.converter_errors(records)
    _raise_unknown(proto, path.name)
    # tf2onnx names inputs after the TensorSpec names; callers use the argument names.
    spec_to_arg = {spec.name: arg for arg, spec in func.structured_input_signature[1].items() if spec.name and spec.name != arg}
    mapping = {v.name: spec_to_arg[v.name] for v in proto.graph.input if v.name in spec_to_arg}
    current_out = [o.name for o in proto.graph.output]
    if not isinstance(func.structured_outputs, dict) and current_out != out_names:
        mapping.update(dict(zip(current_out, out_names)))
    if mapping:
        cv.rename_tensors(proto, mapping)
        log.append("renamed: " + ", ".join(f"{a} -> {b}" for a, b in mapping.items()))
    if cv.name_batch_dims(proto):
        log.append("dynamic batch dimension 'batch'")
    return proto, log


def _saved_model_override(func: Any, inputs: list[str], renames: dict, options: ImportOptions) -> dict | None:
    if not options.input_shapes and not options.dynamic_axes:
        return None
    specs = func.structured_input_signature[1]
    by_name = {renames.get(t, cv.plain_name(t)): t for t in inputs}
    unknown = (set(options.input_shapes) | set(options.dynamic_axes)) - set(specs)
    if unknown:
        raise SourceError(f"no input named {', '.join(sorted(unknown))}; the signature takes {', '.join(sorted(specs))}")
    override = {}
    for arg, spec in specs.items():
        if arg not in options.input_shapes and arg not in options.dynamic_axes:
            continue
        if arg in options.input_shapes:
            shape = [int(d) for d in options.input_shapes[arg]]
        else:
            if spec.shape.rank is None:
                raise SourceError(f"input '{arg}' has no known rank; give its full shape with --input {arg}:1x...")
            shape = [-1 if d is None else int(d) for d in spec.shape.as_list()]
        for axis in options.dynamic_axes.get(arg, []):
            shape[axis] = -1
        tensor = by_name.get(spec.name or arg) or by_name.get(arg)
        if tensor is not None:
            override[tensor] = shape
    return override


def _saved_model_reference(path: Path, options: ImportOptions) -> ReferenceRunner:
    tf = cv.tensorflow()
    key = options.signature_key or "serving_default"
    try:
        loaded = _load_saved_model(path)
    except SourceError as exc:
        return _v1_reference(path, key, exc)
    func = _signature(loaded, key, path)
    arg_names, out_names = _signature_names(func)
    specs = func.structured_input_signature[1]
    keep = (loaded, func)  # the loaded object owns the variables the signature reads

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kwargs = {name: tf.constant(np.asarray(feeds[name]), dtype=specs[name].dtype) for name in arg_names}
        with cv.quiet(cv.TF_LOGGERS):
            result = keep[1](**kwargs)
        if isinstance(result, dict):
            return {name: np.asarray(value) for name, value in result.items()}
        flat = tf.nest.flatten(result)
        return {name: np.asarray(value) for name, value in zip(out_names, flat)}

    run.input_names = list(arg_names)  # type: ignore[attr-defined]  # validate checks them before running
    return run


# --------------------------------------------------------------------------- SavedModels TF2 cannot revive
# A SavedModel whose object graph tf.saved_model.load cannot rebuild (a Keras optimizer saved by an
# older Keras comes back as a plain object: "'_UserObject' object has no attribute 'add_slot'") still
# has its signature's graph and variables; the TF1 loader reads those, as a TF Serving server would.


def _v1_session(path: Path, key: str, error: SourceError) -> tuple[Any, Any, Any]:
    """(graph, session, signature_def) of ``key``, loaded with the TF1 loader; ``error`` if that fails too."""
    tf = cv.tensorflow()
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    try:
        with graph.as_default(), cv.quiet(cv.TF_LOGGERS, streams=True):
            meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(path))
    except Exception:  # noqa: BLE001 - the first error says more than the fallback's
        session.close()
        raise error from None
    if key not in meta.signature_def:
        session.close()
        raise SourceError(f"SavedModel '{path.name}' has no signature '{key}' (it has {', '.join(meta.signature_def) or 'none'})")
    return graph, session, meta.signature_def[key]


def _convert_saved_model_v1(path: Path, options: ImportOptions, key: str, error: SourceError) -> tuple[onnx.ModelProto, list[str]]:
    tf2onnx = cv.tf2onnx()
    from tf2onnx import tf_loader
    from tf2onnx.convert import _convert_common

    graph, session, signature = _v1_session(path, key, error)
    # What tf2onnx's TF1 SavedModel path does (its own loader call is TF1-only): freeze the session
    # on the signature's tensors, named after the signature's keys.
    inputs = [info.name for info in signature.inputs.values()]
    outputs = [info.name for info in signature.outputs.values()]
    renames = {info.name: key_name for key_name, info in [*signature.inputs.items(), *signature.outputs.items()]}
    opset = cv.opset_for(options)
    with cv.quiet(cv.TF_LOGGERS, streams=True) as records:
        try:
            graph_def = _freeze_v1(graph, session, inputs, outputs)
            tables = {}
            proto, _ = _convert_common(
                graph_def, name=path.name, continue_on_error=True, opset=opset, input_names=inputs,
                output_names=outputs, tensors_to_rename=renames, initialized_tables=tables,
            )
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedModelError(
                f"tf2onnx cannot convert signature '{key}' of '{path.name}': {cv.first_line(exc, 240)}"
            ) from None
    log = [f"converted SavedModel '{path.name}' signature '{key}' with tf2onnx {tf2onnx.__version__}, opset {opset}, "
           f"through the TF1 loader (TF2 cannot rebuild its objects: {error})"]
    log += cv.converter_errors(records)
    _raise_unknown(proto, path.name)
    if cv.name_batch_dims(proto):
        log.append("dynamic batch dimension 'batch'")
    return proto, log


def _freeze_v1(graph: Any, session: Any, inputs: list[str], outputs: list[str]) -> Any:
    """The signature's graph with its function calls inlined and its variables as constants.

    Grappler inlines the StatefulPartitionedCall a TF2-saved signature is made of first; freezing
    before would turn the resource handles the call takes into float constants it cannot inline.
    Lookup tables are not read (tf2onnx reads them with TF1-only calls).
    """
    tf = cv.tensorflow()
    from tf2onnx import tf_loader

    with graph.as_default():
        graph_def = graph.as_graph_def(add_shapes=True)
    keep = [name.split(":")[0] for name in outputs]
    keep += [node.name for node in graph_def.node if node.op in ("VarHandleOp", "VariableV2")]
    with tf.Graph().as_default():
        inlined = tf_loader.tf_optimize(inputs, keep, graph_def)
    with graph.as_default():
        frozen = tf.compat.v1.graph_util.convert_variables_to_constants(session, inlined, [n.split(":")[0] for n in outputs])
    with tf.Graph().as_default():
        return tf_loader.tf_optimize(inputs, outputs, frozen)


def _v1_reference(path: Path, key: str, error: SourceError) -> ReferenceRunner:
    _, session, signature = _v1_session(path, key, error)
    inputs = {name: info.name for name, info in signature.inputs.items()}
    outputs = {name: info.name for name, info in signature.outputs.items()}

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with cv.quiet(cv.TF_LOGGERS):
            result = session.run(outputs, {tensor: np.asarray(feeds[name]) for name, tensor in inputs.items()})
        return {name: np.asarray(value) for name, value in result.items()}

    run.input_names = list(inputs)  # type: ignore[attr-defined]  # validate checks them before running
    return run


# --------------------------------------------------------------------------- importer interface


def _is_saved_model(source: Any) -> bool:
    path = Path(source)
    return path.is_dir() or path.name in ("saved_model.pb", "saved_model.pbtxt")


def import_source(source: Any, options: ImportOptions) -> ImportedModel:
    if not isinstance(source, (str, Path)):
        raise SourceError(f"a TensorFlow source is a SavedModel folder or a frozen .pb file, not {type(source).__name__}")
    if _is_saved_model(source):
        from .archive import pack_directory

        path = _saved_model_dir(source)
        proto, log = _convert_saved_model(path, options)
        return cv.finish(proto, kind="savedmodel", source_filename=f"{path.name}.dir.zip",
                         source_bytes=pack_directory(path), log=log)
    path = Path(source)
    proto, log = _convert_frozen(path, options)
    return cv.finish(proto, kind="tf_graph", source_filename=path.name, source_bytes=path.read_bytes(), log=log)


def reference(source: Any, options: ImportOptions) -> ReferenceRunner:
    if not isinstance(source, (str, Path)):
        raise SourceError(f"a TensorFlow source is a SavedModel folder or a frozen .pb file, not {type(source).__name__}")
    if _is_saved_model(source):
        return _saved_model_reference(_saved_model_dir(source), options)
    return _frozen_reference(Path(source), options)
