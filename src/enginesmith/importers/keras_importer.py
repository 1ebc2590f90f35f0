"""Keras 3 importer: ``.keras`` files, legacy HDF5 ``.h5`` models and in-memory ``keras.Model`` objects.

Conversion: Keras' own ONNX export (``model.export(format="onnx")``, which drives tf2onnx
on the model's traced function); when that raises, tf2onnx ``from_function`` on a plain
``tf.function`` around the model, and the build log says so. Either way the graph's
inputs and outputs are renamed to the Keras names (input layer names / dict keys, output
layer names / dict keys) instead of converter names such as ``Identity:0``.

Safety: files are loaded with ``safe_mode=True``. A Lambda layer (Python bytecode in the
file) is refused, naming the layers, unless ``trust_code`` is set. In-memory models are
already running in the caller's process, so they are accepted; the ``.keras`` file the
bundle embeds then needs ``--trust-code`` to be rebuilt, and the log says so.
"""

from __future__ import annotations

import json
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import EnginesmithError, SourceError, UnsupportedModelError
from . import ImportedModel, ImportOptions, ReferenceRunner
from . import _convert as cv

_AUTO_NAME = re.compile(r"^(keras_tensor|input_layer|input)(_\d+)?$")


# --------------------------------------------------------------------------- loading


def is_keras_model(obj: Any) -> bool:
    return any(c.__module__.split(".")[0] == "keras" and c.__name__ in ("Model", "Functional", "Sequential")
               for c in type(obj).__mro__)


def _config_of(path: Path) -> dict | None:
    """The model config stored in the file, read without deserializing anything."""
    try:
        if path.suffix.lower() == ".keras":
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("config.json"))
        import h5py

        with h5py.File(path, "r") as handle:
            raw = handle.attrs.get("model_config")
            if raw is None:
                return None
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except Exception:  # noqa: BLE001 - unreadable configs are reported by the loader itself
        return None


def _layers_of_class(config: Any, class_name: str) -> list[str]:
    found: list[str] = []
    if isinstance(config, dict):
        if config.get("class_name") == class_name:
            inner = config.get("config") or {}
            found.append(str(inner.get("name") or config.get("name") or "?"))
        for value in config.values():
            found += _layers_of_class(value, class_name)
    elif isinstance(config, list):
        for value in config:
            found += _layers_of_class(value, class_name)
    return found


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SourceError(f"model not found: '{path}': check the path")
    if not path.is_file():
        raise SourceError(f"'{path}' is not a file; a Keras model is a .keras or .h5 file")
    suffix = path.suffix.lower()
    if suffix == ".keras" and not zipfile.is_zipfile(path):
        raise SourceError(f"'{path.name}' is not a Keras 3 .keras file (not a zip archive); it may be truncated")
    if suffix in (".h5", ".hdf5"):
        with open(path, "rb") as handle:
            if handle.read(8) != b"\x89HDF\r\n\x1a\n":
                raise SourceError(f"'{path.name}' is not an HDF5 file; it may be truncated or of another format")


def load_model(path: Path, options: ImportOptions, log: list[str] | None = None) -> Any:
    """The model from a .keras/.h5 file, in safe mode unless ``trust_code``."""
    _check_file(path)
    keras = cv.keras()
    config = _config_of(path)
    lambdas = _layers_of_class(config, "Lambda") if config else []
    if lambdas and not options.trust_code:
        raise SourceError(
            f"'{path.name}' has Lambda layer(s) {', '.join(repr(n) for n in lambdas)} whose Python code would run "
            "when loading; refused in safe mode. If you trust the file, pass --trust-code (trust_code=True)"
        )
    with cv.quiet(cv.TF_LOGGERS):
        try:
            model = keras.saving.load_model(path, compile=False, safe_mode=not options.trust_code)
        except EnginesmithError:
            raise
        except Exception as exc:  # noqa: BLE001 - Keras raises ValueError/TypeError/OSError for bad files
            raise _load_error(path, exc) from None
    if options.trust_code and log is not None:
        note = f" (Lambda layers: {', '.join(lambdas)})" if lambdas else ""
        log.append(f"loaded '{path.name}' with safe_mode=False because of --trust-code{note}")
    if not is_keras_model(model):
        raise SourceError(f"'{path.name}' holds a {type(model).__name__}, not a Keras model")
    return model


def _load_error(path: Path, exc: Exception) -> EnginesmithError:
    text = cv.first_line(exc)
    full = str(exc)
    if "safe_mode" in full or "unsafe_deserialization" in full:
        return SourceError(
            f"'{path.name}' needs code execution to load ({text[:160]}); refused in safe mode. "
            "If you trust the file, pass --trust-code (trust_code=True)"
        )
    located = re.search(r"Could not locate (?:class|function) '([^']+)'", full)
    if located:
        return SourceError(
            f"'{path.name}' uses the custom Keras object '{located.group(1)}', which is not registered here: "
            "import the module that defines it (decorated with @keras.saving.register_keras_serializable()) "
            "before building, or pass the keras.Model object to enginesmith.build()"
        )
    return SourceError(f"'{path.name}' is not a loadable Keras model ({type(exc).__name__}: {text})")


# --------------------------------------------------------------------------- names and specs


def _input_structure(model: Any) -> tuple[Any, list[tuple[str, Any]], bool]:
    """The structure the model is called with, its flat (name, spec-like) leaves in order, and
    whether the leaves are separate positional arguments (subclassed models) rather than one
    structured argument (functional and sequential models)."""
    keras = cv.keras()
    tree = keras.tree
    positional = False
    struct = getattr(model, "_inputs_struct", None)
    if struct is None:
        inputs = getattr(model, "inputs", None) if _has_attr(model, "inputs") else None
        if inputs:
            struct = inputs[0] if len(inputs) == 1 else list(inputs)
    if struct is None:
        # Subclassed models: the shapes recorded when the model was first called.
        from keras.src.export.export_utils import get_input_signature

        try:
            signature = get_input_signature(model)
        except Exception as exc:  # noqa: BLE001
            raise SourceError(
                f"cannot tell the inputs of Keras model '{model.name}' ({cv.first_line(exc)}); "
                "call it once on example data (or build it with keras.Input) first"
            ) from None
        positional = len(signature) > 1
        struct = list(signature) if positional else signature[0]
    leaves = tree.flatten_with_path(struct)
    named: list[tuple[str, Any]] = []
    for i, (path, leaf) in enumerate(leaves):
        key = path[-1] if path and isinstance(path[-1], str) else None
        name = key or getattr(leaf, "name", None)
        if not name or _AUTO_NAME.match(str(name)):
            name = "input" if len(leaves) == 1 else f"input_{i}"
        named.append((str(name), leaf))
    _check_unique([n for n, _ in named], "input")
    return struct, named, positional


def _has_attr(obj: Any, name: str) -> bool:
    try:
        return getattr(obj, name, None) is not None
    except Exception:  # noqa: BLE001 - some Keras properties raise when unbuilt
        return False


def output_names(model: Any, options: ImportOptions) -> list[str]:
    """Flat output names, in the order the converted graph and ``predict`` flatten them."""
    keras = cv.keras()
    struct = getattr(model, "_outputs_struct", None)
    if struct is not None:
        leaves = keras.tree.flatten_with_path(struct)
        layer_names = list(getattr(model, "output_names", None) or [])
        names = []
        for i, (path, _) in enumerate(leaves):
            key = path[-1] if path and isinstance(path[-1], str) else None
            names.append(key or (layer_names[i] if i < len(layer_names) else f"output_{i}"))
    elif _has_attr(model, "layers") and model.layers and _has_attr(model, "outputs") and len(model.outputs) == 1:
        names = [model.layers[-1].name]  # Sequential: the last layer
    else:
        names = []
    if options.output_names:
        if names and len(options.output_names) != len(names):
            raise SourceError(
                f"--outputs gives {len(options.output_names)} names but the model has {len(names)} outputs ({', '.join(names)})"
            )
        names = list(options.output_names)
    return _dedupe(names)


def _dedupe(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 0
        out.append(name)
    return out


def _check_unique(names: list[str], what: str) -> None:
    if len(set(names)) != len(names):
        raise SourceError(f"the model has several {what}s with the same name: {names}")


def _tensor_specs(model: Any, options: ImportOptions) -> tuple[list[Any], list[str]]:
    """(the positional arguments of the traced function as tf.TensorSpecs, flat input names)."""
    tf = cv.tensorflow()
    keras = cv.keras()
    struct, named, positional = _input_structure(model)
    names = [n for n, _ in named]
    unknown = set(options.input_shapes) - set(names)
    unknown |= set(options.dynamic_axes) - set(names)
    if unknown:
        raise SourceError(
            f"no input named {', '.join(sorted(unknown))}; the model's inputs are {', '.join(names)}"
        )
    specs = []
    for name, leaf in named:
        shape = list(leaf.shape) if getattr(leaf, "shape", None) is not None else None
        if shape is None:
            raise SourceError(f"input '{name}' has no known rank; give its shape with --input {name}:1x...")
        if shape:
            shape[0] = None  # dynamic batch by default
        if name in options.input_shapes:
            given = list(options.input_shapes[name])
            if len(given) != len(shape):
                raise SourceError(f"--input {name} gives rank {len(given)} but the model's input has rank {len(shape)}")
            shape = given
        for axis in options.dynamic_axes.get(name, []):
            if not -len(shape) <= axis < len(shape):
                raise SourceError(f"--dynamic {name}:{axis}: the input has only {len(shape)} axes")
            shape[axis] = None
        dtype = keras.backend.standardize_dtype(getattr(leaf, "dtype", None) or "float32")
        specs.append(tf.TensorSpec(shape, tf.as_dtype(dtype), name=name))
    if positional:
        return specs, names
    return [keras.tree.pack_sequence_as(struct, specs)], names


# --------------------------------------------------------------------------- conversion


def _layer_names(model: Any) -> dict[str, str]:
    """Every (nested) layer name -> its class name."""
    found: dict[str, str] = {}

    def walk(layer: Any) -> None:
        for sub in getattr(layer, "layers", None) or []:
            found.setdefault(sub.name, type(sub).__name__)
            walk(sub)

    walk(model)
    return found


def _all_layers(model: Any) -> list[Any]:
    found: list[Any] = []

    def walk(layer: Any) -> None:
        for sub in getattr(layer, "layers", None) or []:
            found.append(sub)
            walk(sub)

    walk(model)
    return found


def _layer_for_node(node_name: str, layers: dict[str, str]) -> str | None:
    """The innermost Keras layer whose name scope the TF node lives in."""
    best = None
    for part in node_name.split("/"):
        for candidate in (part, re.sub(r"_\d+$", "", part)):
            if candidate in layers:
                best = candidate
                break
    return best


def _unsupported_error(model: Any, nodes: list[onnx.NodeProto], what: str) -> UnsupportedModelError:
    layers = _layer_names(model)
    described = []
    for node in nodes:
        layer = _layer_for_node(node.name, layers)
        where = f"layer '{layer}' ({layers[layer]})" if layer else f"node '{node.name}'"
        text = f"{where} uses TensorFlow op {node.op_type}"
        if text not in described:
            described.append(text)
    return UnsupportedModelError(
        f"{what}: {'; '.join(described)}, which tf2onnx cannot convert to ONNX; rewrite that layer with "
        "standard Keras/TensorFlow ops (no tf.py_function/numpy_function), or export the model yourself to ONNX"
    )


def _export_keras(model: Any, signature: Any, opset: int, tmp: Path) -> onnx.ModelProto:
    target = tmp / "model.onnx"
    cv.tf2onnx()  # Keras drives tf2onnx; this also resets its name counter
    model.export(str(target), format="onnx", verbose=False, input_signature=signature, opset_version=opset)
    return onnx.load(str(target))


def _export_function(model: Any, signature: Any, opset: int) -> onnx.ModelProto:
    tf = cv.tensorflow()
    tf2onnx = cv.tf2onnx()

    @tf.function
    def call(*args):
        return model(*args, training=False)

    proto, _ = tf2onnx.convert.from_function(call, input_signature=signature, opset=opset)
    return proto


def convert(model: Any, options: ImportOptions, name: str) -> tuple[onnx.ModelProto, list[str]]:
    """The model as ONNX with Keras input/output names, and the log of how."""
    signature, in_names = _tensor_specs(model, options)
    out_names = output_names(model, options)
    opset = cv.opset_for(options)
    log: list[str] = []
    proto = None
    with tempfile.TemporaryDirectory(prefix="enginesmith-keras-") as tmp:
        with cv.quiet(cv.TF_LOGGERS, streams=True) as records:
            try:
                proto = _export_keras(model, signature, opset, Path(tmp))
                log.append(f"converted Keras model '{name}' with Keras' own ONNX export (tf2onnx), opset {opset}")
            except Exception as exc:  # noqa: BLE001 - fall back to tf2onnx on a plain tf.function
                log.append(f"Keras' ONNX export failed ({cv.first_line(exc, 160)}); falling back to tf2onnx from_function")
                try:
                    proto = _export_function(model, signature, opset)
                    log.append(f"converted Keras model '{name}' with tf2onnx from_function, opset {opset}")
                except Exception as exc2:  # noqa: BLE001
                    nodes = re.findall(r"\[([^\]:]+): (\w+)\]", str(exc2))
                    raise UnsupportedModelError(
                        f"cannot convert Keras model '{name}' to ONNX ({cv.first_line(exc2, 200)})"
                        + (f"; failing nodes: {', '.join(n for n, _ in nodes[:5])}" if nodes else "")
                    ) from None
        log += cv.converter_errors(records)
    unknown = cv.unknown_ops(proto)
    if unknown:
        raise _unsupported_error(model, unknown, f"Keras model '{name}' cannot be converted")
    log += _rename_io(proto, in_names, out_names)
    if cv.name_batch_dims(proto):
        log.append("dynamic batch dimension 'batch'")
    return proto, log


def _rename_io(proto: onnx.ModelProto, in_names: list[str], out_names: list[str]) -> list[str]:
    graph = proto.graph
    weights = {i.name for i in graph.initializer}
    current_in = [v.name for v in graph.input if v.name not in weights]
    current_out = [v.name for v in graph.output]
    mapping: dict[str, str] = {}
    if current_in != in_names:
        if len(current_in) != len(in_names):
            raise UnsupportedModelError(f"the converted model has inputs {current_in}, expected {in_names}")
        plain = {cv.plain_name(n): n for n in current_in}
        if set(plain) == set(in_names):
            mapping.update({plain[n]: n for n in in_names})
        else:
            mapping.update(dict(zip(current_in, in_names)))
    if out_names and current_out != out_names:
        if len(current_out) != len(out_names):
            raise UnsupportedModelError(f"the converted model has {len(current_out)} outputs, the Keras model {len(out_names)}")
        if set(current_out) == set(out_names):
            # Already the Keras names (dict outputs); only the order may differ: keep the graph's.
            pass
        else:
            mapping.update(dict(zip(current_out, out_names)))
    if not mapping:
        return []
    cv.rename_tensors(proto, mapping)
    return [f"renamed converter names to Keras names: {', '.join(f'{a} -> {b}' for a, b in mapping.items())}"]


# --------------------------------------------------------------------------- importer interface


def _saved_bytes(model: Any, log: list[str]) -> tuple[str, bytes] | None:
    """The in-memory model saved as .keras, for the bundle; None when it cannot be saved."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", getattr(model, "name", "") or "model") or "model"
    with tempfile.TemporaryDirectory(prefix="enginesmith-keras-") as tmp:
        target = Path(tmp) / f"{base}.keras"
        with cv.quiet(cv.TF_LOGGERS):
            try:
                model.save(str(target))
            except Exception as exc:  # noqa: BLE001 - custom layers without get_config
                log.append(f"the model cannot be saved as .keras ({cv.first_line(exc, 160)}); embedding the converted ONNX")
                return None
        return target.name, target.read_bytes()


def import_source(source: Any, options: ImportOptions) -> ImportedModel:
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".onnx":
        from . import onnx_importer  # a model embedded as ONNX because it could not be saved as .keras

        return onnx_importer.import_source(source, options)
    log: list[str] = []
    if isinstance(source, (str, Path)):
        path = Path(source)
        model = load_model(path, options, log)
        filename, raw, label = path.name, path.read_bytes(), path.name
    elif is_keras_model(source):
        model, label = source, getattr(source, "name", "model")
        saved = _saved_bytes(source, log)
        filename, raw = saved if saved else ("", b"")
        lambdas = [layer for layer, cls in _layer_names(source).items() if cls == "Lambda"]
        if saved and lambdas:
            log.append(f"the embedded .keras holds Lambda layer(s) {', '.join(lambdas)}: rebuilding it needs --trust-code")
        custom = sorted({type(layer).__name__ for layer in _all_layers(source)
                         if not type(layer).__module__.startswith("keras")})
        if saved and custom:
            log.append(f"the embedded .keras uses custom classes {', '.join(custom)}: rebuilding it needs them "
                       "registered (@keras.saving.register_keras_serializable) in the rebuilding process")
    else:
        raise SourceError(f"not a Keras model: {type(source).__name__}")
    proto, convert_log = convert(model, options, label)
    log = convert_log + log
    if not raw:
        filename, raw = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', label) or 'model'}.onnx", proto.SerializeToString()
    return cv.finish(proto, kind="keras", source_filename=filename, source_bytes=raw, log=log)


def reference(source: Any, options: ImportOptions) -> ReferenceRunner:
    """The model run by Keras itself (``predict``), keyed by the same names as the engine."""
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".onnx":
        from . import onnx_importer

        return onnx_importer.reference(source, options)
    model = load_model(Path(source), options) if isinstance(source, (str, Path)) else source
    if not is_keras_model(model):
        raise SourceError(f"not a Keras model: {type(model).__name__}")
    keras = cv.keras()
    struct, named, positional = _input_structure(model)
    in_names = [n for n, _ in named]
    out_names = output_names(model, options)

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in in_names if n not in feeds]
        if missing:
            raise SourceError(f"the Keras model needs input(s) {', '.join(missing)}")
        flat = [np.asarray(feeds[n]) for n in in_names]
        with cv.quiet(cv.TF_LOGGERS):
            if positional:
                outputs = model(*flat, training=False)
            else:
                outputs = model.predict(keras.tree.pack_sequence_as(struct, flat), verbose=0)
        leaves = [np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(outputs)]
        names = out_names or [f"output_{i}" for i in range(len(leaves))]
        if len(names) != len(leaves):
            raise SourceError(f"the Keras model returned {len(leaves)} outputs, expected {len(names)}")
        return dict(zip(names, leaves))

    run.input_names = in_names  # type: ignore[attr-defined]  # validate checks them before running
    return run
