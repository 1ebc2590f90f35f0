"""TensorRT backend options, optimization profiles and the precision plan: pure logic, no TensorRT.

Everything here is decided from the user's options, the model's signature and a
:class:`TrtApi` description of the installed TensorRT (what its Python API has),
so it is tested on machines without TensorRT against the API of each version.

Backend options (``BuildOptions.backend_options``)
    ``workspace_mb``          builder workspace pool limit; default 256 on Jetson and other
                              integrated GPUs (Nano builds get killed for lack of memory),
                              a quarter of the GPU's memory up to 4096 elsewhere
    ``profiles``              {input: {"min": dims, "opt": dims, "max": dims}}, dims a list or "1x3x224x224"
    ``max_batch``/``opt_batch``  default profile of a dynamic batch: 1 / opt_batch / max_batch
                              (defaults 1 and 8 on integrated GPUs, 1 and 32 elsewhere)
    ``dla_core``              run on this DLA core (Jetson Xavier/Orin), fp16 or int8 only
    ``gpu_fallback``          let layers the DLA cannot run fall back to the GPU (default true)
    ``optimization_level``    builder optimization level 0-5 (TensorRT >= 8.6; its default is 3)
    ``version_compatible``    engine runs on later TensorRT versions of the same major (TensorRT >= 8.6)
    ``hardware_compatibility``  "none" (default), "ampere_plus" (TensorRT >= 8.6, built on
                              sm_80+), "same_compute_capability" (TensorRT >= 10.9, built on sm_75+)
    ``timing_cache``          "auto" (default: a file in enginesmith's cache folder, reused by every
                              build on this GPU and TensorRT version), a file path, or "off"
    ``strongly_typed``        "auto" (default: when the model carries its own precisions, fp16
                              tensors or Q/DQ nodes), true or false; TensorRT 11 always is
    ``contexts``              execution contexts for concurrent calls (default 1 integrated, 2 else);
                              a dynamic-shape engine gets one optimization profile per context
    ``cuda_graphs``           capture each fixed input shape's run in a CUDA graph (default false)
    ``gpu``                   CUDA device index (default 0)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import onnx

from ...errors import BuildError, InputError
from ...signature import Signature, TensorSpec

OPTION_NAMES = (
    "workspace_mb", "profiles", "max_batch", "opt_batch", "dla_core", "gpu_fallback", "optimization_level",
    "version_compatible", "hardware_compatibility", "timing_cache", "strongly_typed", "contexts", "cuda_graphs", "gpu",
)
# Options other backends record in a bundle's manifest. A bundle built by one of them and
# rebuilt with TensorRT carries them along; they are ignored (and logged), not rejected.
OTHER_BACKEND_OPTIONS = frozenset({"providers", "device", "compile", "mode", "batches", "tf32", "channels_last", "inductor"})
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")

# What a calibration method of enginesmith becomes in TensorRT's implicit quantization.
CALIBRATORS = {"entropy": "IInt8EntropyCalibrator2", "minmax": "IInt8MinMaxCalibrator", "percentile": "IInt8EntropyCalibrator2"}


@dataclass(frozen=True)
class TrtApi:
    """What the installed TensorRT's Python API offers; read with :func:`api_of`."""

    version: tuple[int, ...]
    # BuilderFlag.FP16/INT8 exist: precision is chosen by the builder (removed in TensorRT 11).
    weak_typing: bool
    # NetworkDefinitionCreationFlag.STRONGLY_TYPED (TensorRT >= 10.0).
    strongly_typed: bool
    # IInt8EntropyCalibrator2 and IBuilderConfig.int8_calibrator (removed in TensorRT 11).
    calibrator: bool
    # IExecutionContext.execute_async_v3 and named tensors (TensorRT >= 8.5); else bindings + v2.
    named_tensors: bool
    # IBuilderConfig.set_memory_pool_limit (>= 8.4) instead of max_workspace_size.
    memory_pools: bool
    # NetworkDefinitionCreationFlag.EXPLICIT_BATCH must be set (< 10.0; deprecated, then removed).
    explicit_batch_flag: bool
    # IProgressMonitor (>= 10.0).
    progress_monitor: bool
    # builder_optimization_level, VERSION_COMPATIBLE, hardware_compatibility_level (>= 8.6).
    compatibility_options: bool
    # HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY (>= 10.9).
    same_compute_capability: bool

    @property
    def version_text(self) -> str:
        return ".".join(str(v) for v in self.version)


def api_of(trt: Any) -> TrtApi:
    """Describe an imported ``tensorrt`` module by probing its API, not by trusting version numbers."""
    version = tuple(int(v) for v in re.findall(r"\d+", trt.__version__)[:3])
    flags = trt.BuilderFlag
    creation = trt.NetworkDefinitionCreationFlag
    levels = getattr(trt, "HardwareCompatibilityLevel", None)
    return TrtApi(
        version=version,
        weak_typing=hasattr(flags, "FP16"),
        strongly_typed=hasattr(creation, "STRONGLY_TYPED"),
        calibrator=hasattr(trt, "IInt8EntropyCalibrator2"),
        named_tensors=hasattr(trt.IExecutionContext, "execute_async_v3"),
        memory_pools=hasattr(trt.IBuilderConfig, "set_memory_pool_limit"),
        explicit_batch_flag=version < (10,) and hasattr(creation, "EXPLICIT_BATCH"),
        progress_monitor=hasattr(trt, "IProgressMonitor"),
        compatibility_options=hasattr(flags, "VERSION_COMPATIBLE"),
        same_compute_capability=has_same_compute_capability(version)
        and levels is not None
        and hasattr(levels, "SAME_COMPUTE_CAPABILITY"),
    )


# --------------------------------------------------------------------------- version and device gates

# HardwareCompatibilityLevel.kSAME_COMPUTE_CAPABILITY first appears in NvInfer.h of TensorRT 10.9.
SAME_COMPUTE_CAPABILITY_SINCE = (10, 9)
# NvInfer.h: each level "is only supported for engines built on" these GPUs or later.
_HARDWARE_LEVELS = {
    "ampere_plus": ((8, 6), (8, 0), "Ampere (sm_80)"),
    "same_compute_capability": (SAME_COMPUTE_CAPABILITY_SINCE, (7, 5), "Turing (sm_75)"),
}


def has_same_compute_capability(version: tuple[int, ...]) -> bool:
    """Whether TensorRT ``version`` has the same_compute_capability hardware compatibility level."""
    return tuple(version[:2]) >= SAME_COMPUTE_CAPABILITY_SINCE


def hardware_compatibility_problem(level: str, version: tuple[int, ...], compute_capability: tuple[int, int]) -> str | None:
    """Why ``level`` cannot be built with TensorRT ``version`` on a GPU of ``compute_capability``; None if it can."""
    if level not in _HARDWARE_LEVELS:
        return None
    since, oldest_gpu, gpu_name = _HARDWARE_LEVELS[level]
    have = ".".join(str(v) for v in version)
    if tuple(version[:2]) < since:
        return (
            f"hardware_compatibility {level} needs TensorRT {'.'.join(map(str, since))} or newer; this is TensorRT "
            f"{have}: upgrade TensorRT, or drop --hardware-compat"
        )
    if tuple(compute_capability) < oldest_gpu:
        return (
            f"hardware_compatibility {level} engines can only be built on {gpu_name} or newer GPUs; this GPU is "
            f"sm_{compute_capability[0]}{compute_capability[1]}: build on a newer GPU, or drop --hardware-compat"
        )
    return None


def _no_dla_in(version: tuple[int, ...]) -> str:
    """Why TensorRT ``version`` itself may report no DLA cores on a Jetson that has them ("" if no known reason)."""
    text = ".".join(str(v) for v in version)
    if (10, 8) <= tuple(version[:2]) < (11, 0):
        return f"NVIDIA's documentation names TensorRT 10.7 as the last 10.x release with DLA support (this is {text})"
    if (11, 0) <= tuple(version[:2]) < (11, 4):
        return f"DLA was unavailable in TensorRT 11.0 through 11.3 (this is {text})"
    if tuple(version[:3]) < (11, 4, 1) and tuple(version[:2]) == (11, 4):
        return f"TensorRT 11.4.0 supports DLA only on Windows on ARM (this is {text})"
    if tuple(version[:2]) >= (11, 4):
        return f"TensorRT {text} supports DLA on Jetson AGX Orin only with JetPack 7.2.2 or later"
    return ""


def dla_core_problem(requested: int, cores: int, version: tuple[int, ...]) -> str | None:
    """Why DLA core ``requested`` cannot be used when TensorRT ``version`` reports ``cores`` DLA cores; None if it can."""
    if requested < cores:
        return None
    found = f"TensorRT reports {cores} DLA core{'s' if cores != 1 else ''} here"
    hardware = (
        "Jetson AGX Xavier, Xavier NX and AGX Orin / Orin NX have them; Nano, TX2, Orin Nano and Thor do not"
    )
    if cores:
        return f"dla_core {requested}: {found} (cores 0..{cores - 1}); pick one of those"
    reason = _no_dla_in(version)
    if reason:
        return (
            f"dla_core {requested}: {found}. Either this device has no DLA ({hardware}), or this TensorRT cannot use "
            f"it: {reason}; use a TensorRT release with DLA support for this Jetson, or drop --dla-core"
        )
    return f"dla_core {requested}: {found}: this device has no DLA ({hardware}); drop --dla-core"


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Profile:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass
class TrtOptions:
    workspace_mb: int | None = None
    profiles: dict[str, Profile] = field(default_factory=dict)
    max_batch: int | None = None
    opt_batch: int | None = None
    dla_core: int | None = None
    gpu_fallback: bool = True
    optimization_level: int | None = None
    version_compatible: bool = False
    hardware_compatibility: str = "none"
    timing_cache: str = "auto"
    strongly_typed: bool | None = None  # None: auto
    contexts: int | None = None
    cuda_graphs: bool = False
    gpu: int = 0
    ignored: tuple[str, ...] = ()

    def to_backend_options(self) -> dict[str, Any]:
        """The resolved options as they are stored in the manifest (and read back by :func:`parse_options`)."""
        data: dict[str, Any] = {
            "workspace_mb": self.workspace_mb,
            "profiles": {name: p.to_dict() for name, p in self.profiles.items()},
            "max_batch": self.max_batch,
            "opt_batch": self.opt_batch,
            "dla_core": self.dla_core,
            "gpu_fallback": self.gpu_fallback,
            "optimization_level": self.optimization_level,
            "version_compatible": self.version_compatible,
            "hardware_compatibility": self.hardware_compatibility,
            "timing_cache": self.timing_cache,
            "strongly_typed": "auto" if self.strongly_typed is None else self.strongly_typed,
            "contexts": self.contexts,
            "cuda_graphs": self.cuda_graphs,
            "gpu": self.gpu,
        }
        return {key: value for key, value in data.items() if value is not None}


def parse_options(raw: Mapping[str, Any]) -> TrtOptions:
    """Validate ``backend_options``: unknown names, types and ranges each raise a :class:`BuildError`."""
    unknown = sorted(set(raw) - set(OPTION_NAMES) - OTHER_BACKEND_OPTIONS)
    if unknown:
        raise BuildError(
            f"unknown TensorRT backend option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
            f"the options are {', '.join(OPTION_NAMES)}"
        )
    options = TrtOptions(ignored=tuple(sorted(set(raw) & OTHER_BACKEND_OPTIONS)))
    options.workspace_mb = _int(raw, "workspace_mb", minimum=1)
    options.max_batch = _int(raw, "max_batch", minimum=1)
    options.opt_batch = _int(raw, "opt_batch", minimum=1)
    if options.max_batch and options.opt_batch and options.opt_batch > options.max_batch:
        raise BuildError(f"opt_batch ({options.opt_batch}) is larger than max_batch ({options.max_batch})")
    options.dla_core = _int(raw, "dla_core", minimum=0)
    options.gpu_fallback = _bool(raw, "gpu_fallback", True)
    options.optimization_level = _int(raw, "optimization_level", minimum=0, maximum=5)
    options.version_compatible = _bool(raw, "version_compatible", False)
    options.hardware_compatibility = str(raw.get("hardware_compatibility") or "none").lower()
    if options.hardware_compatibility not in HARDWARE_COMPATIBILITY:
        raise BuildError(
            f"hardware_compatibility '{raw['hardware_compatibility']}' is not one of {', '.join(HARDWARE_COMPATIBILITY)}"
        )
    options.timing_cache = _timing_cache(raw.get("timing_cache", "auto"))
    strongly = raw.get("strongly_typed", "auto")
    options.strongly_typed = None if strongly in (None, "auto") else _bool(raw, "strongly_typed", False)
    options.contexts = _int(raw, "contexts", minimum=1)
    options.cuda_graphs = _bool(raw, "cuda_graphs", False)
    options.gpu = _int(raw, "gpu", minimum=0) or 0
    options.profiles = {str(name): _profile(str(name), spec) for name, spec in (raw.get("profiles") or {}).items()}
    return options


def _int(raw: Mapping[str, Any], key: str, minimum: int, maximum: int | None = None) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise BuildError(f"backend option {key} must be a whole number, got {value!r}")
    number = int(value)
    if number < minimum or (maximum is not None and number > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise BuildError(f"backend option {key} must be {bounds}, got {number}")
    return number


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    return bool_option(key, raw.get(key, default))


def bool_option(key: str, value: Any) -> bool:
    """A backend option's true/false, from a bool or its text forms (CLI ``--option key=on``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise BuildError(f"backend option {key} must be true or false, got {value!r}")


def _timing_cache(value: Any) -> str:
    if value in (None, True) or str(value).lower() == "auto":
        return "auto"
    if value is False or str(value).lower() in ("off", "none", "false"):
        return "off"
    return str(value)


def parse_dims(text: Any, what: str) -> tuple[int, ...]:
    """Dims from ``[1, 3, 224, 224]``, ``(1, 3, 224, 224)`` or ``"1x3x224x224"``."""
    if isinstance(text, str):
        parts = [p for p in re.split(r"[x,\s]+", text.strip()) if p]
    elif isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        raise BuildError(f"{what}: expected dims like [1, 3, 224, 224] or '1x3x224x224', got {text!r}")
    dims = []
    for part in parts:
        if isinstance(part, bool) or not str(part).isdigit():
            raise BuildError(f"{what}: '{part}' is not a dimension (whole numbers >= 0), in {text!r}")
        dims.append(int(part))
    return tuple(dims)


def _profile(name: str, spec: Any) -> Profile:
    if not isinstance(spec, Mapping) or set(spec) != {"min", "opt", "max"}:
        raise BuildError(f"profile of input '{name}' needs exactly min, opt and max dims, got {spec!r}")
    low, opt, high = (parse_dims(spec[k], f"profile {k} of input '{name}'") for k in ("min", "opt", "max"))
    if not len(low) == len(opt) == len(high):
        raise BuildError(f"profile of input '{name}': min, opt and max have different ranks ({low}, {opt}, {high})")
    for axis, (a, b, c) in enumerate(zip(low, opt, high)):
        if not a <= b <= c:
            raise BuildError(
                f"profile of input '{name}', axis {axis}: needs min <= opt <= max, got {a}, {b}, {c}"
            )
    return Profile(low, opt, high)


# --------------------------------------------------------------------------- profiles


def default_batches(integrated: bool) -> tuple[int, int]:
    """(opt, max) batch of the default profile: Jetsons have little memory to spare."""
    return (1, 8) if integrated else (1, 32)


def resolve_profiles(signature: Signature, options: TrtOptions, integrated: bool) -> dict[str, Profile]:
    """One profile per dynamic input: the user's, else derived from a dynamic batch (axis 0)."""
    names = set(signature.input_names)
    strangers = sorted(set(options.profiles) - names)
    if strangers:
        raise BuildError(f"profiles name unknown inputs {', '.join(strangers)}: the inputs are {', '.join(signature.input_names)}")
    opt_default, max_default = default_batches(integrated)
    max_batch = options.max_batch or max(opt_default, options.opt_batch or 0, max_default)
    opt_batch = options.opt_batch or min(opt_default, max_batch)
    profiles = {}
    for spec in signature.inputs:
        if spec.name in options.profiles:
            profiles[spec.name] = _checked_profile(spec, options.profiles[spec.name])
        elif spec.is_dynamic:
            profiles[spec.name] = _batch_profile(spec, opt_batch, max_batch)
    return profiles


def _checked_profile(spec: TensorSpec, profile: Profile) -> Profile:
    if len(profile.min) != spec.rank:
        raise BuildError(f"profile of input '{spec.name}' has rank {len(profile.min)}; the input has rank {spec.rank} {list(spec.shape)}")
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim >= 0 and not profile.min[axis] == profile.max[axis] == dim:
            raise BuildError(
                f"profile of input '{spec.name}', axis {axis}: the model fixes this dim to {dim}, "
                f"the profile gives {profile.min[axis]}..{profile.max[axis]}"
            )
    return profile


def _batch_profile(spec: TensorSpec, opt_batch: int, max_batch: int) -> Profile:
    free = [f"{axis} ({dim or '?'})" for axis, dim in enumerate(spec.shape) if axis and not (isinstance(dim, int) and dim >= 0)]
    if free:
        raise BuildError(
            f"input '{spec.name}' {list(spec.shape)} has dynamic dims besides the batch (axis {', '.join(free)}): "
            f"give its range as backend option profiles={{'{spec.name}': {{'min': [...], 'opt': [...], 'max': [...]}}}} "
            "(CLI: --min/--opt/--max)"
        )
    rest = tuple(int(d) for d in spec.shape[1:])  # type: ignore[arg-type]
    return Profile((1, *rest), (opt_batch, *rest), (max_batch, *rest))


def profile_max_batch(profiles: Mapping[str, Profile]) -> int | None:
    """The largest batch every input's profile takes, for the engine's batch splitting; None if they differ."""
    batches = {p.max[0] for p in profiles.values() if p.max}
    return batches.pop() if len(batches) == 1 else None


def check_in_profile(name: str, shape: tuple[int, ...], low: tuple[int, ...], high: tuple[int, ...]) -> None:
    """Raise :class:`InputError` when ``shape`` falls outside the engine's optimization profile."""
    if len(shape) != len(low):
        raise InputError(f"input '{name}' has rank {len(shape)} {list(shape)}; the engine takes rank {len(low)}")
    bad = [axis for axis, (d, a, b) in enumerate(zip(shape, low, high)) if not a <= d <= b]
    if bad:
        ranges = ", ".join(f"axis {axis}: {low[axis]}..{high[axis]}" for axis in bad)
        raise InputError(
            f"input '{name}' has shape {list(shape)}, outside the engine's optimization profile ({ranges}; "
            f"min {list(low)}, max {list(high)}); rebuild with a larger profile (backend option profiles / max_batch)"
        )


# --------------------------------------------------------------------------- precisions

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_HALF_TYPES = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})


@dataclass(frozen=True)
class ModelPrecisions:
    has_qdq: bool
    has_half: bool

    @property
    def own_precisions(self) -> bool:
        return self.has_qdq or self.has_half


def model_precisions(model: onnx.ModelProto) -> ModelPrecisions:
    """Whether the model already says which precisions it computes in (Q/DQ nodes, fp16/bf16 tensors)."""
    graph = model.graph
    has_qdq = any(node.op_type in QDQ_OPS for node in graph.node)
    values = list(graph.input) + list(graph.output) + list(graph.value_info)
    has_half = any(t.data_type in _HALF_TYPES for t in graph.initializer) or any(
        v.type.tensor_type.elem_type in _HALF_TYPES for v in values
    ) or any(
        node.op_type == "Cast" and any(a.name == "to" and a.i in _HALF_TYPES for a in node.attribute) for node in graph.node
    )
    return ModelPrecisions(has_qdq, has_half)


@dataclass(frozen=True)
class PrecisionPlan:
    strongly_typed: bool
    # BuilderFlag names to set (weakly typed networks only).
    builder_flags: tuple[str, ...] = ()
    # Rewrite the ONNX model to fp16 before parsing (strongly typed networks take precisions from the model).
    convert_fp16: bool = False
    # Insert Q/DQ nodes calibrated by ONNX Runtime (explicit quantization; TensorRT 11 has no calibrators).
    quantize_qdq: bool = False
    # Name of the TensorRT calibrator class for implicit int8 quantization, or "".
    calibrator: str = ""
    notes: tuple[str, ...] = ()


def plan_precision(
    precision: str, api: TrtApi, model: ModelPrecisions, strongly_typed: bool | None, calibration_method: str = "entropy"
) -> PrecisionPlan:
    """How to get ``precision`` out of this TensorRT: builder flags (weak typing) or a rewritten model (strong)."""
    strong = _strongly_typed(api, model, strongly_typed)
    if strong:
        return _strong_plan(precision, model)
    flags: list[str] = []
    notes: list[str] = []
    if precision in ("fp16", "int8") or model.has_half:
        flags.append("FP16")
    calibrator = ""
    if precision == "int8" or model.has_qdq:
        flags.append("INT8")
        if not model.has_qdq:
            calibrator = CALIBRATORS[calibration_method]
            notes.append(f"int8: implicit quantization calibrated with {calibrator} ({calibration_method})")
            if calibration_method == "percentile":
                notes.append("TensorRT has no percentile calibrator: entropy calibration (IInt8EntropyCalibrator2) is used")
        else:
            notes.append("int8: the model's Q/DQ nodes set the scales (explicit quantization), no calibration")
    return PrecisionPlan(False, tuple(flags), calibrator=calibrator, notes=tuple(notes))


def _strongly_typed(api: TrtApi, model: ModelPrecisions, requested: bool | None) -> bool:
    if not api.weak_typing:
        if requested is False:
            raise BuildError(
                f"TensorRT {api.version_text} builds strongly typed networks only (precision comes from the model); "
                "drop strongly_typed=false"
            )
        return True
    if requested and not api.strongly_typed:
        raise BuildError(f"strongly typed networks need TensorRT 10 or newer; this is TensorRT {api.version_text}")
    if requested is None:
        return api.strongly_typed and model.own_precisions
    return requested


def _strong_plan(precision: str, model: ModelPrecisions) -> PrecisionPlan:
    notes = ["strongly typed network: every tensor keeps the type the model gives it"]
    convert = precision == "fp16" and not model.has_half
    quantize = precision == "int8" and not model.has_qdq
    if convert:
        notes.append("fp16: model converted to fp16 (inputs/outputs and sensitive ops kept fp32) before parsing")
    if quantize:
        notes.append("int8: Q/DQ nodes inserted from ONNX Runtime calibration (explicit quantization), symmetric int8")
    return PrecisionPlan(True, convert_fp16=convert, quantize_qdq=quantize, notes=tuple(notes))
