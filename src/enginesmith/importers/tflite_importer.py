"""TFLite importer: ``.tflite`` flat buffers, converted with tf2onnx ``from_tflite``.

Names: the ONNX inputs and outputs take the names of the model's signature
(``ImportOptions.signature_key`` when the file has several, else its only one), e.g.
``feat`` and ``probs`` rather than the tensor names ``serving_default_feat:0`` and
``StatefulPartitionedCall:1``. A file without signatures keeps its tensor names (``:0`` dropped).

Reference: the TFLite interpreter itself (``ai_edge_litert`` when installed, else
``tf.lite.Interpreter``), resized to each batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import EnginesmithError, SourceError, UnsupportedModelError
from . import ImportedModel, ImportOptions, ReferenceRunner
from . import _convert as cv


def _check_file(path: Path) -> bytes:
    if not path.exists():
        raise SourceError(f"model not found: '{path}': check the path")
    if not path.is_file():
        raise SourceError(f"'{path}' is not a file; a TFLite model is a single .tflite file")
    raw = path.read_bytes()
    if len(raw) < 8 or raw[4:8] != b"TFL3":
        raise SourceError(f"'{path.name}' is not a TFLite flat buffer (no TFL3 identifier); it may be truncated")
    return raw


def _interpreter(raw: bytes, path: Path) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter  # the maintained LiteRT runtime
    except ImportError:
        tf = cv.tensorflow()
        Interpreter = tf.lite.Interpreter
    with cv.quiet(cv.TF_LOGGERS):
        try:
            interpreter = Interpreter(model_content=raw)
            interpreter.allocate_tensors()
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"the TFLite interpreter cannot load '{path.name}': {cv.first_line(exc, 240)}") from None
    return interpreter


def _signature_key(interpreter: Any, options: ImportOptions, path: Path) -> str | None:
    signatures = interpreter.get_signature_list()
    if not signatures:
        return None
    if options.signature_key in signatures:
        return options.signature_key
    if len(signatures) == 1:
        return next(iter(signatures))
    raise SourceError(
        f"'{path.name}' has signatures {', '.join(sorted(signatures))} but not '{options.signature_key}': "
        "choose one with --signature"
    )


def _names(interpreter: Any, key: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(tensor name -> public input name, tensor name -> public output name)."""
    if key is None:
        ins = {d["name"]: cv.plain_name(d["name"]) for d in interpreter.get_input_details()}
        outs = {d["name"]: cv.plain_name(d["name"]) for d in interpreter.get_output_details()}
        return ins, outs
    runner = interpreter.get_signature_runner(key)
    ins = {d["name"]: name for name, d in runner.get_input_details().items()}
    outs = {d["name"]: name for name, d in runner.get_output_details().items()}
    return ins, outs


def _order_outputs(proto: onnx.ModelProto, order: list[str]) -> None:
    """Graph outputs in the signature's order (the subgraph's own order is arbitrary)."""
    outputs = list(proto.graph.output)
    if sorted(o.name for o in outputs) != sorted(order):
        return
    by_name = {o.name: o for o in outputs}
    reordered = [onnx.ValueInfoProto() for _ in order]
    for target, name in zip(reordered, order):
        target.CopyFrom(by_name[name])
    del proto.graph.output[:]
    proto.graph.output.extend(reordered)


def import_source(source: Any, options: ImportOptions) -> ImportedModel:
    if not isinstance(source, (str, Path)):
        raise SourceError(f"a TFLite source is a .tflite file, not {type(source).__name__}")
    path = Path(source)
    raw = _check_file(path)
    tf2onnx = cv.tf2onnx()
    interpreter = _interpreter(raw, path)
    key = _signature_key(interpreter, options, path)
    in_names, out_names = _names(interpreter, key)
    opset = cv.opset_for(options)
    log = [f"converted TFLite model '{path.name}' with tf2onnx {tf2onnx.__version__} from_tflite, opset {opset}"]
    if options.input_shapes or options.dynamic_axes:
        log.append("--input/--dynamic are ignored for TFLite: shapes come from the flat buffer")
    with cv.quiet(cv.TF_LOGGERS, streams=True) as records:
        try:
            proto, _ = tf2onnx.convert.from_tflite(str(path), opset=opset)
        except EnginesmithError:
            raise
        except Exception as exc:  # noqa: BLE001
            sparse = sparse_tensors(interpreter)
            if sparse:
                raise UnsupportedModelError(
                    f"'{path.name}' stores {len(sparse)} weight tensor(s) in TFLite's sparse format (e.g. '{sparse[0]}'), "
                    "which tf2onnx cannot convert; export the model without sparsity (a dense .tflite, or the "
                    f"original Keras/SavedModel model); tf2onnx said: {cv.first_line(exc, 160)}"
                ) from None
            raise UnsupportedModelError(f"tf2onnx cannot convert '{path.name}': {cv.first_line(exc, 240)}") from None
    log += cv.converter_errors(records)
    unknown = cv.unknown_ops(proto)
    if unknown:
        ops = ", ".join(sorted({f"{n.op_type} ('{n.name}')" for n in unknown})[:6])
        raise UnsupportedModelError(
            f"'{path.name}' uses TFLite ops tf2onnx cannot convert to ONNX: {ops}; "
            "convert the original model instead (or a TFLite model without resource variables / custom ops)"
        )
    mapping = {v.name: in_names[v.name] for v in proto.graph.input if v.name in in_names}
    mapping.update({v.name: out_names[v.name] for v in proto.graph.output if v.name in out_names})
    applied = {a: b for a, b in mapping.items() if a != b}
    if applied:
        cv.rename_tensors(proto, applied)
        log.append("renamed to signature names: " + ", ".join(f"{a} -> {b}" for a, b in applied.items()))
    if key is not None:
        _order_outputs(proto, list(interpreter.get_signature_list()[key]["outputs"]))
    if cv.name_batch_dims(proto):
        log.append("dynamic batch dimension 'batch'")
    imported = cv.finish(proto, kind="tflite", source_filename=path.name, source_bytes=raw, log=log)
    quantized = quantized_tensors(interpreter)
    if quantized:
        imported.source_precision = "int8"
        imported.log.append(
            f"quantized TFLite model ({quantized} integer tensors with scales): the interpreter computes in int8, "
            "so engines are verified against it with int8 tolerances"
        )
    return imported


def sparse_tensors(interpreter: Any) -> list[str]:
    """Names of tensors stored in TFLite's sparse format (``sparsity_parameters`` set)."""
    return [d["name"] for d in interpreter.get_tensor_details() if d.get("sparsity_parameters")]


def quantized_tensors(interpreter: Any) -> int:
    """How many tensors hold quantized integers (int8/uint8/int16 with scales): activations or weights that the
    interpreter computes with in integer arithmetic (full-integer and dynamic-range quantization alike)."""
    count = 0
    for detail in interpreter.get_tensor_details():
        scales = (detail.get("quantization_parameters") or {}).get("scales")
        if np.dtype(detail["dtype"]) in (np.int8, np.uint8, np.int16) and scales is not None and len(scales):
            count += 1
    return count


def reference(source: Any, options: ImportOptions) -> ReferenceRunner:
    """The model run by the TFLite interpreter, keyed by the engine's names."""
    if not isinstance(source, (str, Path)):
        raise SourceError(f"a TFLite source is a .tflite file, not {type(source).__name__}")
    path = Path(source)
    raw = _check_file(path)
    interpreter = _interpreter(raw, path)
    key = _signature_key(interpreter, options, path)
    if key is not None:
        runner = interpreter.get_signature_runner(key)
        details = runner.get_input_details()

        def run_signature(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            kwargs = {name: np.asarray(feeds[name], dtype=d["dtype"]) for name, d in details.items()}
            with cv.quiet(cv.TF_LOGGERS):
                result = runner(**kwargs)
            return {name: np.array(value) for name, value in result.items()}

        run_signature.input_names = list(details)  # type: ignore[attr-defined]  # validate checks them before running
        return run_signature

    def run_tensors(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        in_details = interpreter.get_input_details()
        arrays = [np.asarray(feeds[cv.plain_name(d["name"])], dtype=d["dtype"]) for d in in_details]
        with cv.quiet(cv.TF_LOGGERS):
            if any(tuple(a.shape) != tuple(d["shape"]) for a, d in zip(arrays, in_details)):
                for a, d in zip(arrays, in_details):
                    interpreter.resize_tensor_input(d["index"], list(a.shape))
                interpreter.allocate_tensors()
            for a, d in zip(arrays, in_details):
                interpreter.set_tensor(d["index"], a)
            interpreter.invoke()
            return {cv.plain_name(d["name"]): np.array(interpreter.get_tensor(d["index"])) for d in interpreter.get_output_details()}

    run_tensors.input_names = [cv.plain_name(d["name"]) for d in interpreter.get_input_details()]  # type: ignore[attr-defined]
    return run_tensors
