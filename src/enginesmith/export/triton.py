"""Triton model repositories from engine bundles: ``config.pbtxt``, the model file, warm-up data.

Batching (``max_batch_size``): Triton either owns axis 0 of every input and output (``max_batch_size
> 0``: the batch dim is left out of ``dims``, and the dynamic batcher merges requests along it) or
does not batch at all (``0``: ``dims`` is the full shape). An engine is exported as batchable when
axis 0 of every input *and* output is dynamic (a symbol or unknown), the same condition under which
``enginesmith serve`` merges requests. A fixed leading dim (``x[1, 3, 224, 224]``, or ``[8, ...]``)
cannot take a merged batch of another size, so such an engine gets ``max_batch_size: 0`` and its
full fixed shape; so does any engine when asked for ``max_batch=0``. The batch limit is the one
asked for, else the engine's own (a TensorRT profile's max), else 32 (``enginesmith serve``'s
default), and never more than the engine's own.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..bundle import read_bundle
from ..errors import InputError, NotExportableError, OutputExistsError
from ..files import write_atomic
from ..manifest import ORT_GPU_PROVIDERS, Manifest
from ..signature import Signature, TensorSpec
from .pbtxt import EnumValue, to_text

DEFAULT_MAX_BATCH = 32  # the same default as enginesmith serve
WARMUP_DIR = "warmup"
VERSION_DIR = "1"

# numpy dtype name -> Triton's DataType (model_config.proto)
TRITON_TYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16", "str": "TYPE_STRING", "object": "TYPE_STRING",
}
# Triton's model folder names: no path separators, nothing hidden.
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")

# ONNX Runtime execution providers -> how Triton's onnxruntime backend is told to use them.
# Providers that compile subgraphs at load: enginesmith keeps only basic optimizations in their payload
# and lets ONNX Runtime do the rest at load, so Triton's default (all optimizations) stays.
ORT_COMPILING_PROVIDERS = {"TensorrtExecutionProvider", "OpenVINOExecutionProvider"}
# Triton's onnxruntime backend 'level': -1 basic, 1 basic + extended, 2 all disabled (its README).
ORT_LEVEL_DISABLED = 2


@dataclass(frozen=True)
class TritonOptions:
    """How the exported models are served. ``max_batch=None``: the engine's own batch, else 32; 0: no batching."""

    max_batch: int | None = None
    preferred_batch: tuple[int, ...] = ()
    queue_delay_us: int = 0
    instances: int = 1
    warmup: bool = True


@dataclass
class TritonModel:
    """One model of a repository, ready to write: the config, the model file and the warm-up data."""

    name: str
    config: dict[str, Any]
    model_file: str
    # The model file's bytes where the plan holds them (an OpenVINO engine's source, or what was given to
    # plan_triton_model); export_triton reads a payload just before writing it, since engines can be GBs.
    payload: bytes | None = field(repr=False)
    warmup_files: dict[str, bytes] = field(default_factory=dict, repr=False)
    notes: list[str] = field(default_factory=list)
    folder: Path | None = None

    @property
    def config_text(self) -> str:
        return to_text(self.config)

    @property
    def max_batch_size(self) -> int:
        return int(self.config.get("max_batch_size", 0))


# --------------------------------------------------------------------------- what each backend becomes


def _refuse(manifest: Manifest, name: str, reason: str = "") -> NotExportableError:
    backend = manifest.backend
    if backend == "torch":
        why = ("its payload is a PyTorch compiler cache that only enginesmith's own loader reads (no model file "
               "Triton's backends load)")
    elif backend == "openvino":
        why = ("its payload is an OpenVINO compiled blob (CompiledModel.export_model), tied to one OpenVINO "
               "version and CPU, which Triton's openvino backend cannot read (it reads IR or ONNX files), "
               f"and the embedded source cannot stand in for it: {reason}")
    else:
        why = f"enginesmith knows no Triton backend for '{backend}' payloads"
    return NotExportableError(
        f"engine '{name}' ({backend} backend) cannot be exported to Triton: {why}; rebuild it with "
        "'enginesmith build ENGINE --backend onnxruntime' (the bundle carries its source) and export that, "
        "or serve it with 'enginesmith serve'"
    )


def _ort_settings(manifest: Manifest, caches: Sequence[str]) -> tuple[dict[str, Any], str, list[str]]:
    """Triton's onnxruntime backend settings from the session options the engine was built and loads with."""
    backend_options = manifest.build_options.get("backend_options") or {}
    providers = list(backend_options.get("providers") or ["CPUExecutionProvider"])
    threads = manifest.build_options.get("threads")
    notes: list[str] = []
    extra: dict[str, Any] = {
        # enginesmith's sessions: intra-op threads as built (0: ONNX Runtime's default, the physical cores),
        # one inter-op thread, sequential execution.
        "parameters": [
            {"key": "intra_op_thread_count", "value": {"string_value": str(threads or 0)}},
            {"key": "inter_op_thread_count", "value": {"string_value": "1"}},
            {"key": "execution_mode", "value": {"string_value": "0"}},
        ],
    }
    optimization: dict[str, Any] = {}
    if not ORT_COMPILING_PROVIDERS & set(providers):
        # The payload is the output of ORT_ENABLE_ALL for these providers: optimizing again only costs load time.
        optimization["graph"] = {"level": ORT_LEVEL_DISABLED}
    accelerators: dict[str, Any] = {}
    if "TensorrtExecutionProvider" in providers:
        if any(name.endswith("calibration.flatbuffers") for name in caches):
            raise NotExportableError(
                "this int8 engine runs on ONNX Runtime's TensorRT provider with a calibration table, which "
                "Triton's onnxruntime backend reads from a path on the server (trt_engine_cache_path); "
                "export an fp16 build, or a model with Q/DQ nodes"
            )
        params = []
        if manifest.precision in ("fp16", "int8"):
            params.append({"key": "precision_mode", "value": manifest.precision.upper()})
        if backend_options.get("workspace_mb"):
            workspace = int(backend_options["workspace_mb"]) * 2**20
            params.append({"key": "max_workspace_size_bytes", "value": str(workspace)})
        params.extend(_trt_profile_parameters(backend_options.get("profiles") or {}))
        accelerators["gpu_execution_accelerator"] = [{"name": "tensorrt", **({"parameters": params} if params else {})}]
        notes.append("TensorRT engines are built by the server at first load (the bundle's cached engines "
                     "are tied to its file paths)")
    elif "CUDAExecutionProvider" in providers:
        accelerators["gpu_execution_accelerator"] = [{"name": "cuda"}]
    if "OpenVINOExecutionProvider" in providers:
        accelerators["cpu_execution_accelerator"] = [{"name": "openvino"}]
    if accelerators:
        optimization["execution_accelerators"] = accelerators
    if optimization:
        extra["optimization"] = optimization
    kind = "KIND_GPU" if ORT_GPU_PROVIDERS & set(providers) else "KIND_CPU"
    if kind == "KIND_CPU":
        notes.append("the model holds ONNX Runtime's CPU-specific optimizations (layouts for this CPU's "
                     "instruction sets, contrib ops): serve it on CPUs like the build machine's, with an ONNX "
                     f"Runtime at least as new as {manifest.backend_version}")
    return extra, kind, notes


# Import options that change the model between the source file and the engine (shapes, names, opset).
SHAPING_IMPORT_OPTIONS = ("input_shapes", "dynamic_axes", "input_names", "output_names", "opset")


def openvino_source_problem(manifest: Manifest, source: bytes | None) -> str | None:
    """Why the bundle's embedded source cannot be served as the OpenVINO engine's model, or None when it can.

    Triton's openvino backend reads ONNX (``default_model_filename: "model.onnx"``) and compiles it at
    load, so an engine built from an ONNX file without shape or name changes can be served from that
    file: enginesmith's graph passes are checked to keep the outputs, and OpenVINO applies its own.
    The precision must be one OpenVINO picks at compile time: NNCF's int8 lives only in the blob.
    """
    import onnx

    if manifest.precision not in ("fp32", "bf16"):
        return (f"the {manifest.precision} precision exists only in the compiled blob (Triton's openvino backend "
                "has no parameter for it)")
    if source is None or manifest.source_kind != "onnx" or not manifest.source_name.endswith(".onnx"):
        return f"the bundle carries no ONNX source (source: {manifest.source_kind} '{manifest.source_name}')"
    import_options = manifest.build_options.get("import_options") or {}
    changed = [key for key in SHAPING_IMPORT_OPTIONS if import_options.get(key)]
    if changed:
        return f"the build changed the source's {', '.join(changed).replace('_', ' ')}"
    try:
        model = onnx.load_model_from_string(source)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others for a damaged file
        return f"the embedded source does not parse as ONNX ({type(exc).__name__})"
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return "the embedded source keeps its weights in external data files"
    weights = {t.name for t in model.graph.initializer}
    inputs = [v.name for v in model.graph.input if v.name not in weights]
    outputs = [v.name for v in model.graph.output]
    if inputs != manifest.signature.input_names or outputs != manifest.signature.output_names:
        return "the embedded source's inputs or outputs differ from the engine's"
    return None


def _openvino_settings(manifest: Manifest) -> tuple[dict[str, Any], list[str]]:
    """Triton's openvino backend parameters from the compile properties the engine was built with."""
    backend_options = manifest.build_options.get("backend_options") or {}
    params = {"PERFORMANCE_HINT": str(backend_options.get("performance_hint", "latency")).upper()}
    if backend_options.get("num_streams") is not None:
        params["NUM_STREAMS"] = str(backend_options["num_streams"]).upper()
    if manifest.build_options.get("threads"):
        params["INFERENCE_NUM_THREADS"] = str(int(manifest.build_options["threads"]))
    notes = ["the model is the bundle's ONNX source, compiled by the server's OpenVINO at load (enginesmith's "
             "checked graph passes are not in it; OpenVINO applies its own)"]
    if manifest.precision == "bf16":
        params["HINT_BF16"] = "YES"
    else:
        notes.append("Triton's openvino backend cannot ask for f32 inference: on CPUs with native bf16 (AVX512-BF16, "
                     "AMX) OpenVINO runs it in bf16 by default, unlike this fp32 engine")
    extra = {"parameters": [{"key": key, "value": {"string_value": value}} for key, value in params.items()]}
    return extra, notes


def _trt_profile_parameters(profiles: Mapping[str, Mapping[str, Sequence[int]]]) -> list[dict[str, str]]:
    if not profiles:
        return []

    def shapes(which: str) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in p[which])}" for name, p in profiles.items())

    return [{"key": f"trt_profile_{which}_shapes", "value": shapes(which)} for which in ("min", "opt", "max")]


# --------------------------------------------------------------------------- shapes and batching


def triton_type(spec: TensorSpec) -> str:
    try:
        return TRITON_TYPES[spec.dtype]
    except KeyError:
        raise NotExportableError(f"tensor '{spec.name}' has dtype {spec.dtype}, which Triton has no type for") from None


def batchable(signature: Signature) -> bool:
    """Axis 0 of every input and output is dynamic: requests can be merged along it."""
    tensors = list(signature.inputs) + list(signature.outputs)
    return bool(tensors) and all(t.rank >= 1 and not isinstance(t.shape[0], int) for t in tensors)


def engine_batch_limit(manifest: Manifest) -> int | None:
    """The most items one call of the payload takes, where the engine has a limit (TensorRT profiles)."""
    limit = (manifest.build_options.get("backend_options") or {}).get("max_batch")
    return int(limit) if limit else None


def resolve_max_batch(manifest: Manifest, options: TritonOptions) -> int:
    if options.max_batch == 0 or not batchable(manifest.signature):
        return 0
    limit = engine_batch_limit(manifest)
    if options.max_batch is not None:
        if limit is not None and options.max_batch > limit:
            raise InputError(f"a max batch of {options.max_batch} is larger than this engine's batch limit of "
                             f"{limit}; ask for at most {limit}, or rebuild the engine with a larger max_batch")
        return options.max_batch
    return limit or DEFAULT_MAX_BATCH


def _dims(spec: TensorSpec, batched: bool) -> tuple[list[int], bool]:
    """Triton dims (-1: any size) without the batch axis when batched; True when a reshape to [] is needed."""
    shape = spec.shape[1:] if batched else spec.shape
    dims = [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
    if batched and not dims:
        return [1], True  # Triton's way to batch a [batch] tensor: dims [1] reshaped to []
    return dims, False


def _tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    dims, reshape = _dims(spec, batched)
    tensor: dict[str, Any] = {"name": spec.name, "data_type": EnumValue(triton_type(spec)), "dims": dims}
    if reshape:
        tensor["reshape"] = {}
    return tensor


# --------------------------------------------------------------------------- warm-up from the stored samples


def _safe_file_name(index: int, name: str) -> str:
    return f"{index}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"


def _fits(shape: Sequence[int], dims: Sequence[int]) -> bool:
    return len(shape) == len(dims) and all(d == -1 or d == s for s, d in zip(shape, dims))


def warmup_from_samples(
    signature: Signature, samples: bytes, max_batch_size: int
) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    """One warm-up request from the first stored sample: (the model_warmup entry, file name -> raw bytes).

    Triton reads each input's ``input_data_file`` (in the model's ``warmup/`` folder) as raw row-major
    data of the given dims. None when a sample is missing or does not fit the config's shapes.
    """
    with np.load(io.BytesIO(samples), allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    inputs: list[dict[str, Any]] = []
    files: dict[str, bytes] = {}
    for index, spec in enumerate(signature.inputs):
        if spec.name not in arrays or triton_type(spec) == "TYPE_STRING":
            return None
        value = arrays[spec.name]
        if max_batch_size > 0:
            if value.ndim < 1 or value.shape[0] < 1:
                return None
            value = value[:1]
            data_shape = list(value.shape[1:])
        else:
            dims = _dims(spec, batched=False)[0]
            if not _fits(value.shape, dims) and value.ndim and _fits((1, *value.shape[1:]), dims):
                value = value[:1]
            if not _fits(value.shape, dims):
                return None
            data_shape = list(value.shape)
        raw = np.ascontiguousarray(value, dtype=np.dtype(spec.dtype).newbyteorder("<")).tobytes()
        file_name = _safe_file_name(index, spec.name)
        files[file_name] = raw
        data_dims = data_shape or [1]  # a batched [batch] input is fed as [1], reshaped to [] by Triton
        inputs.append({"key": spec.name, "value": {"data_type": EnumValue(triton_type(spec)), "dims": data_dims,
                                                   "input_data_file": file_name}})
    entry = {"name": "stored_samples", "batch_size": 1, "inputs": inputs}
    return entry, files


# --------------------------------------------------------------------------- one model


def plan_triton_model(
    manifest: Manifest,
    payload: bytes | None,
    name: str,
    options: TritonOptions = TritonOptions(),
    samples: bytes | None = None,
    caches: Sequence[str] = (),
) -> TritonModel:
    """The config and files of one engine as a Triton model; :class:`NotExportableError` when it cannot be one.

    ``payload`` is the model file's content: the engine's payload (None: planned only, written later),
    or for an OpenVINO engine the ONNX source the bundle carries (its payload is a compiled blob no
    server reads), which the plan needs to check.
    """
    check_model_name(name)
    if manifest.backend == "onnxruntime":
        head: dict[str, Any] = {"name": name, "platform": "onnxruntime_onnx"}
        extra, kind, notes = _ort_settings(manifest, caches)
        model_file = "model.onnx"
    elif manifest.backend == "openvino":
        problem = openvino_source_problem(manifest, payload)
        if problem:
            raise _refuse(manifest, name, problem)
        head = {"name": name, "backend": "openvino"}
        extra, notes = _openvino_settings(manifest)
        kind, model_file = "KIND_CPU", "model.onnx"
    elif manifest.backend == "tensorrt":
        head = {"name": name, "platform": "tensorrt_plan"}
        extra, kind = {}, "KIND_GPU"
        notes = [f"a TensorRT plan runs only under the TensorRT version it was built with "
                 f"({manifest.backend_version}) on the same GPU model: pick the Triton release that ships it"]
        model_file = "model.plan"
    else:
        raise _refuse(manifest, name)
    signature = manifest.signature
    max_batch_size = resolve_max_batch(manifest, options)
    batched = max_batch_size > 0
    if options.max_batch not in (None, 0) and not batched:
        notes.append("not batched: axis 0 of some input or output is fixed or missing, so Triton cannot merge "
                     "requests (max_batch_size 0, full shapes)")
    config: dict[str, Any] = {**head, "max_batch_size": max_batch_size, "default_model_filename": model_file}
    config["input"] = [_tensor(spec, batched) for spec in signature.inputs]
    config["output"] = [_tensor(spec, batched) for spec in signature.outputs]
    if batched:
        preferred = sorted(set(options.preferred_batch))
        too_large = [b for b in preferred if b > max_batch_size]
        if too_large:
            raise InputError(f"preferred batch size {too_large[0]} is larger than the max batch of {max_batch_size}; "
                             "give sizes up to the max batch")
        batching: dict[str, Any] = {}
        if preferred:
            batching["preferred_batch_size"] = preferred
        batching["max_queue_delay_microseconds"] = options.queue_delay_us
        config["dynamic_batching"] = batching
    elif options.preferred_batch:
        notes.append("preferred batch sizes ignored: the model is not batched")
    config["instance_group"] = [{"count": options.instances, "kind": EnumValue(kind)}]
    config.update(extra)
    warmup_files: dict[str, bytes] = {}
    if options.warmup and samples is not None:
        warm = warmup_from_samples(signature, samples, max_batch_size)
        if warm is None:
            notes.append("no warm-up: the stored samples do not fit the model's shapes")
        else:
            config["model_warmup"] = [warm[0]]
            warmup_files = warm[1]
    return TritonModel(name, config, model_file, payload, warmup_files, notes)


def check_model_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise InputError(f"'{name}' cannot be a Triton model name (a folder name): use letters, digits, '_', '.', '-'")
    return name


# --------------------------------------------------------------------------- the repository


def model_names(engines: Sequence[Path], names: Sequence[str]) -> list[str]:
    """--name for each engine in order, the file's stem for the rest; duplicates refused."""
    if len(names) > len(engines):
        raise InputError(f"{len(names)} names for {len(engines)} engines: give at most one --name per engine")
    chosen = list(names) + [Path(p).stem for p in engines[len(names):]]
    for name in chosen:
        check_model_name(name)
    seen = {n for n in chosen if chosen.count(n) > 1}
    if seen:
        raise InputError(f"two engines would both be model '{sorted(seen)[0]}': give each a --name")
    return chosen


def check_model_folder(folder: Path, inputs: Sequence[Path], force: bool) -> None:
    """A non-empty model folder is replaced only with ``force``, and never when it holds an input."""
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"'{folder}' is a file, not a model folder; remove it or pick another repository")
    for path in inputs:
        if folder.exists() and Path(path).resolve().is_relative_to(folder.resolve()):
            raise OutputExistsError(f"engine '{path}' lies inside the model folder '{folder}' it would replace; "
                                    "export to another repository")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise OutputExistsError(f"refusing to replace the model folder '{folder}', which is not empty; give another "
                                "repository or --name, or add --force")


def write_model_folder(repository: Path, model: TritonModel, payload: bytes) -> Path:
    """Write into a hidden folder beside the target, then swap it in: Triton never sees half a model."""
    repository.mkdir(parents=True, exist_ok=True)
    target = repository / model.name
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}.", dir=repository))
    replaced: Path | None = None
    try:
        write_atomic(staging / "config.pbtxt", model.config_text.encode())
        write_atomic(staging / VERSION_DIR / model.model_file, payload)
        for file_name, raw in model.warmup_files.items():
            write_atomic(staging / WARMUP_DIR / file_name, raw)
        os.chmod(staging, 0o777 & ~_umask())
        if target.exists():
            replaced = Path(tempfile.mkdtemp(prefix=f".{model.name}.old.", dir=repository))
            os.replace(target, replaced)
        os.replace(staging, target)
    except BaseException:
        if replaced is not None and not target.exists():
            os.replace(replaced, target)  # put the old model back
            replaced = None
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    model.folder = target
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_triton(
    engines: Sequence[str | os.PathLike],
    repository: str | os.PathLike,
    names: Sequence[str] = (),
    options: TritonOptions = TritonOptions(),
    force: bool = False,
) -> list[TritonModel]:
    """Write each engine as a model of the Triton repository ``repository``; all are checked before any is written."""
    paths = [Path(p) for p in engines]
    repo = Path(repository)
    if repo.exists() and not repo.is_dir():
        raise OutputExistsError(f"'{repo}' is a file; a Triton repository is a folder")
    chosen = model_names(paths, names)
    for name in chosen:
        check_model_folder(repo / name, paths, force)
    models = []
    for path, name in zip(paths, chosen):
        contents = read_bundle(path, payload=False, samples=options.warmup)
        manifest = contents.manifest
        # An OpenVINO engine's model file is its ONNX source; the others' payloads are read when written.
        source = read_bundle(path, payload=False, source=True).source if manifest.backend == "openvino" else None
        cache_names = [entry.removeprefix("cache/") for entry in manifest.files if entry.startswith("cache/")]
        models.append(plan_triton_model(manifest, source, name, options, contents.samples, cache_names))
    for path, model in zip(paths, models):
        payload = model.payload if model.payload is not None else read_bundle(path, payload=True).payload
        assert payload is not None  # read_bundle(payload=True) reads it or raises
        write_model_folder(repo, model, payload)
    return models
