"""PyTorch importer: ``nn.Module`` and ``ExportedProgram`` objects, ``.pt2`` ExportedProgram
archives, and TorchScript ``.pt``/``.pth`` archives (these only with ``trust_code``).

Conversion: ``torch.export`` then ``torch.onnx.export(..., dynamo=True)``; where either
fails, the TorchScript-based exporter (``dynamo=False``), and the build log says so.
TorchScript archives go straight to the TorchScript-based exporter (``torch.export``
cannot trace a ScriptModule). The dynamo exporter works at opset 18 and above, so that is
its default; the TorchScript-based one defaults to 17.

Shapes: modules need example inputs (``ImportOptions.example_inputs``: a tensor or array,
a tuple/list of them in ``forward`` order, or a dict keyed by parameter name) or an input
spec (``ImportOptions.input_shapes``, float32). The leading axis of every input is dynamic
by default; an input given in ``input_shapes`` is fixed; ``dynamic_axes`` marks more axes.

What the bundle embeds for in-memory objects: the ``ExportedProgram`` saved with
``torch.export.save`` (``<name>.pt2``). In torch 2.13 that archive keeps the graph as JSON
and plain weights as raw bytes, but ``torch.export.load`` still unpickles some parts:
payloads flagged ``use_pickle`` (tensor subclasses, custom objects) with
``weights_only=False``, the example inputs with a ``weights_only=True`` attempt that falls
back to a full unpickle, and older archive layouts. So loading a ``.pt2`` is not pickle-free
by itself. :func:`check_pt2` therefore inspects the archive first and, unless
``trust_code``, refuses anything that would reach a full unpickle (flagged payloads,
old layouts, AOTInductor code, example inputs a ``weights_only`` load rejects). The
``.pt2`` files this importer writes pass that check, so rebuilding a bundle needs no
``--trust-code``. When a module cannot be exported to an ExportedProgram at all, the bundle
embeds the exported ONNX (``<name>.onnx``) instead and rebuilds from that.
"""

from __future__ import annotations

import inspect
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from ..native_source import NativeSource
from . import ImportedModel, ImportOptions, ReferenceRunner
from . import _convert as cv
from .torch_to_onnx import eval_mode, imported_with_background_onnx, to_onnx

TORCHSCRIPT_SUFFIXES = (".pt", ".pth")


def _classes(obj: Any) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def _is_program(obj: Any) -> bool:
    return "ExportedProgram" in _classes(obj)


def _is_script(obj: Any) -> bool:
    return any(n in ("ScriptModule", "RecursiveScriptModule", "ScriptFunction") for n in _classes(obj))


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "model"


# --------------------------------------------------------------------------- names and examples


def _forward_params(module: Any) -> list[str] | None:
    """Positional parameter names of ``forward``; None when it takes *args."""
    if _is_script(module):
        try:
            return [a.name for a in module.forward.schema.arguments[1:]]
        except Exception:  # noqa: BLE001
            return None
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = []
    for p in params:
        if p.kind == inspect.Parameter.VAR_POSITIONAL:
            return None
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return names


def _to_tensor(value: Any, name: str) -> Any:
    torch = cv.torch()
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray) or np.isscalar(value):
        return torch.from_numpy(np.asarray(value, order="C"))
    raise SourceError(f"example input '{name}' is a {type(value).__name__}; give tensors or numpy arrays")


def _examples(params: list[str] | None, options: ImportOptions, what: str) -> tuple[list[str], list[Any]]:
    """(input names, example tensors) in forward order."""
    torch = cv.torch()
    example = options.example_inputs
    if example is None and not options.input_shapes:
        raise SourceError(
            f"{what} needs example inputs to be exported: pass ImportOptions(example_inputs=(tensor, ...)) "
            "or input shapes (--input NAME:1x3x224x224)"
        )
    if example is None:
        names = list(options.input_shapes)
        if params is not None:
            unknown = [n for n in names if n not in params]
            if unknown:
                raise SourceError(f"{what} has no input {', '.join(unknown)}; forward() takes {', '.join(params)}")
            names = [p for p in params if p in options.input_shapes]
        tensors = [torch.randn(*[int(d) for d in options.input_shapes[n]]) for n in names]
    elif isinstance(example, dict):
        names = list(example)
        if params is not None:
            unknown = [n for n in names if n not in params]
            if unknown:
                raise SourceError(f"{what} has no input {', '.join(unknown)}; forward() takes {', '.join(params)}")
            names = [p for p in params if p in example]
        tensors = [_to_tensor(example[n], n) for n in names]
    else:
        values = list(example) if isinstance(example, (tuple, list)) else [example]
        if params is not None and len(values) > len(params):
            raise SourceError(f"{len(values)} example inputs given but forward() takes {len(params)} ({', '.join(params)})")
        names = list(params[: len(values)]) if params is not None else [f"input_{i}" for i in range(len(values))]
        tensors = [_to_tensor(v, n) for v, n in zip(values, names)]
    for i, name in enumerate(names):
        if example is not None and name in options.input_shapes:
            shape = tuple(int(d) for d in options.input_shapes[name])
            if tuple(tensors[i].shape) != shape:
                tensors[i] = torch.randn(*shape).to(tensors[i].dtype)
    return names, tensors


def _public_names(names: list[str], options: ImportOptions) -> list[str]:
    if not options.input_names:
        return names
    if len(options.input_names) != len(names):
        raise SourceError(f"--inputs gives {len(options.input_names)} names for {len(names)} inputs ({', '.join(names)})")
    return list(options.input_names)


def _dynamic(names: list[str], public: list[str], tensors: list[Any], options: ImportOptions) -> list[dict[int, str]]:
    """Per input: axis -> symbol ('batch' for axis 0)."""
    unknown = set(options.dynamic_axes) - set(names) - set(public)
    if unknown:
        raise SourceError(f"--dynamic names unknown input(s) {', '.join(sorted(unknown))}; inputs are {', '.join(public)}")
    result = []
    for name, pub, tensor in zip(names, public, tensors):
        rank = tensor.dim()
        axes: dict[int, str] = {}
        if rank and name not in options.input_shapes and pub not in options.input_shapes:
            axes[0] = "batch"
        for axis in options.dynamic_axes.get(name, options.dynamic_axes.get(pub, [])):
            if not -rank <= axis < rank:
                raise SourceError(f"--dynamic {pub}:{axis}: the input has {rank} axes")
            axis %= rank
            axes[axis] = "batch" if axis == 0 else re.sub(r"\W", "_", f"{pub}_{axis}")
        result.append(axes)
    return result


def _leaf_names(structure: Any, options: ImportOptions) -> list[str]:
    """Names of the flattened outputs: dict keys, namedtuple fields, else output_<i>."""
    from torch.utils import _pytree as pytree

    leaves = pytree.tree_flatten_with_path(structure)[0]
    names = []
    for path, _ in leaves:
        if not path:
            names.append("output")
            continue
        parts = []
        for key in path:
            if isinstance(key, pytree.MappingKey):
                parts.append(str(key.key))
            elif isinstance(key, pytree.GetAttrKey):
                parts.append(str(key.name))
            elif isinstance(key, pytree.SequenceKey):
                parts.append(str(key.idx))
            else:
                parts.append(re.sub(r"\W", "", str(key)))
        if len(path) == 1 and isinstance(path[0], pytree.SequenceKey):
            names.append(f"output_{path[0].idx}")
        else:
            names.append("_".join(parts))
    if options.output_names:
        if len(options.output_names) != len(names):
            raise SourceError(f"--outputs gives {len(options.output_names)} names for {len(names)} outputs ({', '.join(names)})")
        names = list(options.output_names)
    if len(set(names)) != len(names):
        raise SourceError(f"outputs would share names {names}; give distinct ones with --outputs")
    return names


def _flat_outputs(result: Any) -> list[np.ndarray]:
    torch = cv.torch()
    from torch.utils import _pytree as pytree

    leaves = pytree.tree_leaves(result)
    arrays = []
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise SourceError(f"the model returns a {type(leaf).__name__} among its outputs; only tensors can be engine outputs")
        arrays.append(leaf.detach().cpu().numpy())
    return arrays


# --------------------------------------------------------------------------- .pt2 safety


def check_pt2(path: Path, trust_code: bool) -> list[str]:
    """Refuse (unless ``trust_code``) a .pt2 whose loading would run a full unpickle; returns log lines."""
    torch = cv.torch()
    if not zipfile.is_zipfile(path):
        raise SourceError(f"'{path.name}' is not a torch.export .pt2 archive (not a zip); it may be truncated")
    if trust_code:
        return [f"'{path.name}' loaded without the pickle check (--trust-code)"]
    problems: list[str] = []
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if not any(re.search(r"(^|/)models/[^/]+\.json$", n) for n in names):
            problems.append("it is not in the current torch.export archive layout (older layouts unpickle their weights)")
        if any(re.search(r"(^|/)(data/)?aotinductor/", n) for n in names):
            problems.append("it carries AOTInductor compiled code")
        for name in names:
            if re.search(r"(^|/)data/(weights|constants)/[^/]+_config\.json$", name):
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except (ValueError, AttributeError):
                    problems.append(f"'{name}' is not valid JSON")
                    continue
                flagged = [fqn for fqn, meta in config.items() if isinstance(meta, dict) and meta.get("use_pickle")]
                if flagged:
                    problems.append(f"{', '.join(flagged[:3])} are stored as pickles")
            elif re.search(r"(^|/)data/sample_inputs/[^/]+$", name):
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception:  # noqa: BLE001 - anything but plain tensors
                    problems.append("its example inputs only load as a full pickle")
    if problems:
        raise SourceError(
            f"'{path.name}' cannot be loaded without running pickled code ({'; '.join(problems)}); "
            "pass --trust-code (trust_code=True) if you trust the file, or re-save it with torch.export.save"
        )
    return []


def load_program(path: Path, options: ImportOptions, log: list[str] | None = None) -> Any:
    if not path.exists():
        raise SourceError(f"model not found: '{path}': check the path")
    if not path.is_file():
        raise SourceError(f"'{path}' is not a file; an ExportedProgram is a single .pt2 file")
    notes = check_pt2(path, options.trust_code)
    if log is not None:
        log += notes
    torch = cv.torch()
    with cv.quiet(cv.TORCH_LOGGERS):
        try:
            return torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"'{path.name}' is not a loadable ExportedProgram ({cv.first_line(exc, 200)})") from None


def load_torchscript(path: Path, options: ImportOptions) -> Any:
    if not path.exists():
        raise SourceError(f"model not found: '{path}': check the path")
    if not options.trust_code:
        raise SourceError(
            f"'{path.name}' is a TorchScript/pickle file, which runs code when loaded; refused. "
            "If you trust it, pass --trust-code (trust_code=True); better, export with torch.export.save to .pt2"
        )
    if not zipfile.is_zipfile(path):
        raise SourceError(f"'{path.name}' is not a TorchScript archive (not a zip); save it with torch.jit.save")
    torch = cv.torch()
    with cv.quiet(cv.TORCH_LOGGERS):
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise SourceError(
                f"'{path.name}' is not a TorchScript archive ({cv.first_line(exc, 160)}); a torch.save() pickle of a "
                "module or state_dict cannot be imported: export the model with torch.export.save to .pt2"
            ) from None


# --------------------------------------------------------------------------- export


def _widen(tensor: Any, axes: dict[int, str]) -> Any:
    """Size-0/1 dynamic axes made 2 long, so torch.export does not specialise them to constants."""
    torch = cv.torch()
    for axis in axes:
        size = tensor.shape[axis]
        if size == 1:
            tensor = torch.cat([tensor, tensor], dim=axis)
        elif size == 0:
            shape = list(tensor.shape)
            shape[axis] = 2
            tensor = torch.zeros(shape, dtype=tensor.dtype)
    return tensor


def _export_program(module: Any, tensors: list[Any], dyn: list[dict[int, str]], log: list[str]) -> Any | None:
    """torch.export with the dynamic axes; None (logged) when the module cannot be exported."""
    torch = cv.torch()
    Dim = torch.export.Dim
    widened = [_widen(t, axes) for t, axes in zip(tensors, dyn)]
    if any(w.shape != t.shape for w, t in zip(widened, tensors)):
        log.append("example inputs repeated to size 2 on dynamic axes (torch.export specialises sizes 0 and 1)")
    symbols: dict[str, Any] = {}

    def dim(sym: str) -> Any:
        if sym not in symbols:
            symbols[sym] = Dim(sym)
        return symbols[sym]

    attempts = [
        ("named dims", tuple({a: dim(s) for a, s in axes.items()} or None for axes in dyn)),
        ("Dim.AUTO", tuple({a: Dim.AUTO for a in axes} or None for axes in dyn)),
    ]
    if not any(dyn):
        attempts = attempts[:1]
    error = None
    for _label, shapes in attempts:
        with cv.quiet(cv.TORCH_LOGGERS, streams=True):
            try:
                return torch.export.export(module, tuple(widened), dynamic_shapes=shapes)
            except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds
                error = error or exc
    log.append(f"torch.export failed ({cv.first_line(error, 200)}); falling back to the TorchScript-based ONNX exporter")
    return None


def _program_inputs(program: Any) -> list[str]:
    from torch.export.graph_signature import InputKind

    return [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]


def _program_outputs(program: Any, options: ImportOptions) -> list[str]:
    from torch.utils import _pytree as pytree

    spec = program.call_spec.out_spec
    if spec is None:
        return _leaf_names(None, options)
    return _leaf_names(pytree.tree_unflatten([0] * spec.num_leaves, spec), options)


# --------------------------------------------------------------------------- importer interface


def _program_bytes(program: Any) -> bytes:
    torch = cv.torch()
    buffer = io.BytesIO()
    with cv.quiet(cv.TORCH_LOGGERS, streams=True):
        torch.export.save(program, buffer)
    return buffer.getvalue()


def _program_examples(program: Any) -> list[Any] | None:
    from torch.utils import _pytree as pytree

    example = getattr(program, "example_inputs", None)
    if not example:
        return None
    return list(pytree.tree_leaves(example))


def _import_program(program: Any, options: ImportOptions, label: str, source_filename: str, source_bytes: bytes,
                    log: list[str]) -> ImportedModel:
    in_names = _public_names(_program_inputs(program), options)
    out_names = _program_outputs(program, options)
    log.insert(0, f"ExportedProgram '{label}': inputs {', '.join(in_names)}; outputs {', '.join(out_names)}")
    native = NativeSource("torch", program, tuple(in_names), tuple(out_names), description=f"ExportedProgram '{label}'")
    tensors = _program_examples(program)
    imported = None
    if options.onnx_in_background:
        imported = imported_with_background_onnx(
            program=program, program_bytes=source_bytes, module=None, tensors=tensors, in_names=in_names,
            out_names=out_names, dyn=[{} for _ in in_names], options=options, source_filename=source_filename, log=log)
    if imported is None:
        proto = to_onnx(module=None, program=program, tensors=tensors, in_names=in_names,
                         out_names=out_names, dyn=[{} for _ in in_names], options=options, log=log)
        imported = cv.finish(proto, kind="torch", source_filename=source_filename, source_bytes=source_bytes, log=log)
    return _with_native(imported, native)


def _with_native(imported: ImportedModel, native: NativeSource | None) -> ImportedModel:
    """The imported model carrying its torch source, for the PyTorch backend to build from directly."""
    imported.native = native
    return imported


def _import_module(module: Any, options: ImportOptions, log: list[str]) -> ImportedModel:
    torch = cv.torch()
    label = type(module).__name__
    params = _forward_params(module)
    names, tensors = _examples(params, options, f"torch module {label}")
    public = _public_names(names, options)
    dyn = _dynamic(names, public, tensors, options)
    with eval_mode(module):
        with torch.no_grad(), cv.quiet(cv.TORCH_LOGGERS):
            try:
                result = module(*tensors)
            except Exception as exc:  # noqa: BLE001
                raise SourceError(f"torch module {label} fails on the example inputs: {cv.first_line(exc, 240)}") from None
        out_names = _leaf_names(result, options)
        _flat_outputs(result)  # only tensors
        program = _export_program(module, tensors, dyn, log)
        log.insert(0, f"torch module {label}: inputs {', '.join(public)}; outputs {', '.join(out_names)}")
        if program is None:
            proto = to_onnx(module=module, program=None, tensors=tensors, in_names=public, out_names=out_names,
                             dyn=dyn, options=options, log=log)
            log.append("the bundle embeds the exported ONNX: the module could not be saved as an ExportedProgram")
            return cv.finish(proto, kind="torch", source_filename=f"{_safe_name(label)}.onnx",
                             source_bytes=proto.SerializeToString(), log=log)
        native = NativeSource("torch", module, tuple(public), tuple(out_names), tuple(names), description=f"torch module {label}")
        filename, raw = f"{_safe_name(label)}.pt2", _program_bytes(program)
        imported = None
        if options.onnx_in_background:
            imported = imported_with_background_onnx(
                program=program, program_bytes=raw, module=module, tensors=tensors, in_names=public,
                out_names=out_names, dyn=dyn, options=options, source_filename=filename, log=log)
        if imported is None:
            proto = to_onnx(module=module, program=program, tensors=tensors, in_names=public, out_names=out_names,
                             dyn=dyn, options=options, log=log)
            imported = cv.finish(proto, kind="torch", source_filename=filename, source_bytes=raw, log=log)
    return _with_native(imported, native)


def import_source(source: Any, options: ImportOptions) -> ImportedModel:
    log: list[str] = []
    if isinstance(source, (str, Path)):
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            from . import onnx_importer  # a module embedded as ONNX because it could not be saved as .pt2

            return onnx_importer.import_source(path, options)
        if suffix in TORCHSCRIPT_SUFFIXES:
            scripted = load_torchscript(path, options)
            names, tensors = _examples(_forward_params(scripted), options, f"TorchScript model '{path.name}'")
            public = _public_names(names, options)
            dyn = _dynamic(names, public, tensors, options)
            with eval_mode(scripted), cv.torch().no_grad(), cv.quiet(cv.TORCH_LOGGERS):
                out_names = _leaf_names(scripted(*tensors), options)
            log.append(f"loaded TorchScript '{path.name}' (--trust-code); torch.export cannot trace ScriptModules")
            proto = to_onnx(module=scripted, program=None, tensors=tensors, in_names=public, out_names=out_names,
                             dyn=dyn, options=options, log=log)
            return cv.finish(proto, kind="torchscript", source_filename=path.name, source_bytes=path.read_bytes(), log=log)
        program = load_program(path, options, log)
        return _import_program(program, options, path.name, path.name, path.read_bytes(), log)
    torch = cv.torch()
    if _is_program(source):
        return _import_program(source, options, "in memory", "model.pt2", _program_bytes(source), log)
    if _is_script(source):
        names, tensors = _examples(_forward_params(source), options, "TorchScript module")
        public = _public_names(names, options)
        dyn = _dynamic(names, public, tensors, options)
        with eval_mode(source), torch.no_grad(), cv.quiet(cv.TORCH_LOGGERS):
            out_names = _leaf_names(source(*tensors), options)
        proto = to_onnx(module=source, program=None, tensors=tensors, in_names=public, out_names=out_names,
                         dyn=dyn, options=options, log=log)
        log.append("the bundle embeds the exported ONNX (a ScriptModule cannot be saved as an ExportedProgram)")
        return cv.finish(proto, kind="torch", source_filename="model.onnx", source_bytes=proto.SerializeToString(), log=log)
    if isinstance(source, torch.nn.Module):
        return _import_module(source, options, log)
    raise SourceError(f"not a PyTorch model: {type(source).__name__}")


def _runner(call: Any, in_names: list[str], options: ImportOptions, pack: Any = None) -> ReferenceRunner:
    """Feeds -> the model's own outputs, named like the engine's (names read off the result)."""
    torch = cv.torch()

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [n for n in in_names if n in feeds]
        if pack is not None and len(names) != len(in_names):
            missing = [n for n in in_names if n not in feeds]
            raise SourceError(f"the torch model needs input(s) {', '.join(missing)}")
        if not names:
            raise SourceError(f"none of the inputs {', '.join(in_names)} were given")
        tensors = [torch.from_numpy(np.asarray(feeds[n], order="C")) for n in names]
        with eval_mode(call), torch.no_grad(), cv.quiet(cv.TORCH_LOGGERS):
            if pack is not None:
                args, kwargs = pack(tensors)
                result = call(*args, **kwargs)
            else:
                result = call(*tensors)
        return dict(zip(_leaf_names(result, options), _flat_outputs(result)))

    run.input_names = list(in_names)  # type: ignore[attr-defined]  # validate checks them before running
    return run


def _program_runner(program: Any, options: ImportOptions) -> ReferenceRunner:
    from torch.utils import _pytree as pytree

    in_names = _public_names(_program_inputs(program), options)
    spec = program.call_spec.in_spec
    module = program.module()

    def pack(tensors: list[Any]) -> tuple[tuple, dict]:
        if spec is None:
            return tuple(tensors), {}
        args, kwargs = pytree.tree_unflatten(tensors, spec)
        return tuple(args), dict(kwargs)

    return _runner(module, in_names, options, pack)


def _module_input_names(module: Any, options: ImportOptions) -> list[str]:
    if options.input_names:
        return list(options.input_names)
    params = _forward_params(module)
    if params is None:
        raise SourceError(f"cannot tell the inputs of {type(module).__name__}.forward(*args); give them with --inputs")
    return params


def reference(source: Any, options: ImportOptions) -> ReferenceRunner:
    """The model run by torch itself (the module, the ExportedProgram's module, or the TorchScript module)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            from . import onnx_importer

            return onnx_importer.reference(path, options)
        if suffix in TORCHSCRIPT_SUFFIXES:
            scripted = load_torchscript(path, options)
            return _runner(scripted, _module_input_names(scripted, options), options)
        return _program_runner(load_program(path, options), options)
    torch = cv.torch()
    if _is_program(source):
        return _program_runner(source, options)
    if isinstance(source, torch.nn.Module):
        return _runner(source, _module_input_names(source, options), options)
    raise SourceError(f"not a PyTorch model: {type(source).__name__}")
