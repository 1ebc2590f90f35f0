"""PyTorch to ONNX: the dynamo exporter on an ExportedProgram, the TorchScript-based one as the fallback,
and the same conversion started in a child process while the engine builds (``onnx_job.py``).

The dynamo exporter works at opset 18 and above (:data:`DYNAMO_MIN_OPSET`), the TorchScript-based
one defaults to 17. Symbolic dims are named after what they are (:func:`name_dims`).
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import Any, Iterator

import onnx

from ..errors import EnginesmithError, UnsupportedModelError
from . import ImportedModel, ImportOptions, PendingOnnx
from . import _convert as cv
from .torch_program import container_modules, index_limits, program_signature

DYNAMO_MIN_OPSET = 18


@contextlib.contextmanager
def eval_mode(module: Any) -> Iterator[None]:
    """The module in eval mode (Dropout off, BatchNorm on running stats), its own mode restored after."""
    training = bool(getattr(module, "training", False))
    if training:
        try:
            module.eval()
        except NotImplementedError:  # an ExportedProgram's module: its graph is fixed already
            training = False
    try:
        yield
    finally:
        if training:
            module.train(True)


def dynamo_onnx(program: Any, in_names: list[str], out_names: list[str], options: ImportOptions, log: list[str]) -> onnx.ModelProto:
    torch = cv.torch()
    opset = options.opset or DYNAMO_MIN_OPSET
    with cv.quiet(cv.TORCH_LOGGERS, streams=True):
        exported = torch.onnx.export(
            program, (), dynamo=True, input_names=in_names, output_names=out_names,
            opset_version=opset, optimize=True, verbose=False,
        )
        proto = exported.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    note = f" (asked {opset}; the dynamo exporter starts at {DYNAMO_MIN_OPSET})" if got != opset else ""
    log.append(f"converted with torch.onnx.export(dynamo=True) (torch {torch.__version__}), opset {got}{note}")
    return proto


def legacy_onnx(
    module: Any, tensors: list[Any], in_names: list[str], out_names: list[str], dyn: list[dict[int, str]],
    options: ImportOptions, log: list[str],
) -> onnx.ModelProto:
    torch = cv.torch()
    opset = cv.opset_for(options)
    axes = {name: dict(d) for name, d in zip(in_names, dyn) if d}
    if any("batch" in d.values() for d in dyn):
        axes.update({name: {0: "batch"} for name in out_names})
    buffer = io.BytesIO()
    with cv.quiet(cv.TORCH_LOGGERS, streams=True):
        torch.onnx.export(
            module, tuple(tensors), buffer, dynamo=False, input_names=in_names, output_names=out_names,
            dynamic_axes=axes or None, opset_version=opset, do_constant_folding=True,
        )
    log.append(f"converted with the TorchScript-based exporter torch.onnx.export(dynamo=False) (torch {torch.__version__}), opset {opset}")
    return onnx.load_model_from_string(buffer.getvalue())


def name_dims(proto: onnx.ModelProto, in_names: list[str]) -> None:
    """Symbolic dims named after what they are: 'batch' for leading axes, '<input>_<axis>' else."""
    mapping: dict[str, str] = {}
    for value in proto.graph.input:
        if value.name not in in_names:
            continue
        for axis, d in enumerate(value.type.tensor_type.shape.dim):
            if d.HasField("dim_param") and d.dim_param not in mapping:
                mapping[d.dim_param] = "batch" if axis == 0 else re.sub(r"\W", "_", f"{value.name}_{axis}")
    cv.rename_dim_params(proto, mapping)


def to_onnx(
    *,
    module: Any | None,
    program: Any | None,
    tensors: list[Any] | None,
    in_names: list[str],
    out_names: list[str],
    dyn: list[dict[int, str]],
    options: ImportOptions,
    log: list[str],
) -> onnx.ModelProto:
    proto = None
    dynamo_failure = ""
    if program is not None:
        try:
            proto = dynamo_onnx(program, in_names, out_names, options, log)
        except EnginesmithError:
            raise
        except Exception as exc:  # noqa: BLE001
            dynamo_failure = cv.first_line(exc, 240)
    if proto is None:
        proto = fallback_onnx(module=module, program=program, tensors=tensors, in_names=in_names, out_names=out_names,
                               dyn=dyn, options=options, log=log, dynamo_failure=dynamo_failure)
    name_dims(proto, in_names)
    return proto


def fallback_onnx(
    *,
    module: Any | None,
    program: Any | None,
    tensors: list[Any] | None,
    in_names: list[str],
    out_names: list[str],
    dyn: list[dict[int, str]],
    options: ImportOptions,
    log: list[str],
    dynamo_failure: str,
) -> onnx.ModelProto:
    """The TorchScript-based exporter, after the dynamo one failed with ``dynamo_failure`` (or was not tried)."""
    if dynamo_failure:
        log.append(f"the dynamo exporter failed ({dynamo_failure[:200]}); falling back to the TorchScript-based exporter")
        if module is None:
            module = program.module()
        if tensors is None:
            raise UnsupportedModelError(f"torch.onnx cannot export this ExportedProgram: {dynamo_failure}")
    try:
        return legacy_onnx(module, tensors, in_names, out_names, dyn, options, log)
    except EnginesmithError:
        raise
    except Exception as exc:  # noqa: BLE001
        # The dynamo exporter's failure is usually the one to fix (the fallback cannot trace e.g. transformers'
        # models at all), so it comes first.
        first = f"the dynamo exporter failed ({dynamo_failure[:200]}), then the TorchScript-based one: " if dynamo_failure else ""
        raise UnsupportedModelError(f"torch.onnx cannot export the model: {first}{cv.first_line(exc, 300)}") from None


# --------------------------------------------------------------------------- the ONNX export alongside the build

def imported_with_background_onnx(
    *,
    program: Any,
    program_bytes: bytes,
    module: Any | None,
    tensors: list[Any] | None,
    in_names: list[str],
    out_names: list[str],
    dyn: list[dict[int, str]],
    options: ImportOptions,
    source_filename: str,
    log: list[str],
) -> ImportedModel | None:
    """The import with its ONNX conversion started in a child process (see ``onnx_job.py``), or None where
    the program's signature cannot stand in for the conversion's.

    Joining it (``ImportedModel.with_onnx``) gives what the sequential import gives: the dynamo
    export of the same program, the TorchScript-based fallback (run here, with the module) when
    that fails, the same errors, the same checks of the converted model.
    """
    from .onnx_importer import signature_of
    from .onnx_job import OnnxJob

    signature = program_signature(program, in_names, out_names)
    if signature is None:
        return None
    job = OnnxJob(program_bytes, in_names, out_names, options.opset or DYNAMO_MIN_OPSET, container_modules(program))
    finished: list[tuple[onnx.ModelProto, list[str]]] = []

    def finish() -> tuple[onnx.ModelProto, list[str]]:
        if finished:
            return finished[0]
        outcome = job.wait()
        pending.seconds = outcome.seconds
        lines = list(outcome.log)
        if outcome.model_bytes is not None:
            proto = onnx.load_model_from_string(outcome.model_bytes)
        else:
            with eval_mode(module) if module is not None else contextlib.nullcontext():
                proto = fallback_onnx(module=module, program=program, tensors=tensors, in_names=in_names,
                                       out_names=out_names, dyn=dyn, options=options, log=lines,
                                       dynamo_failure=outcome.failure)
            name_dims(proto, in_names)
        model, checked = cv.check_converted(proto, source_filename)
        lines += checked
        converted = signature_of(model)
        if converted != signature:
            lines.append(f"note: the ONNX conversion's signature ({converted}) differs from the torch program's "
                         f"({signature}); the engine keeps the program's")
        lines.append(f"ONNX export ran in a separate process alongside the build ({outcome.seconds:.1f} s)")
        finished.append((model, lines))
        return finished[0]

    log.append("the ONNX export runs in a separate process while the engine builds from the torch program")
    pending = PendingOnnx(finish, job.cancel, job.pid)
    return ImportedModel(model=None, signature=signature, kind="torch", source_filename=source_filename,
                         source_bytes=program_bytes, log=log, pending_onnx=pending,
                         input_limits=index_limits(program, in_names))
