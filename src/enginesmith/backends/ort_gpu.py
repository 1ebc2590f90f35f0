"""ONNX Runtime's TensorRT and CUDA execution providers: options, caches, calibration tables, GPU facts.

The ONNX Runtime backend (:mod:`.onnxruntime`) uses this module when a GPU provider is
picked (``--provider tensorrt`` / ``cuda``, onnxruntime-gpu installed). The backend options
have the names of the TensorRT backend's (:mod:`.tensorrt.options`), so ``--workspace-mb``,
``--min/--opt/--max``, ``--dla-core``, ``--builder-level`` and ``--timing-cache`` mean the same
with either backend; here they become ONNX Runtime's documented TensorRT provider options
(``trt_*``, see onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html):

=========================  ===============================================================
backend option             TensorRT provider option
=========================  ===============================================================
precision fp16             ``trt_fp16_enable``
precision int8             ``trt_int8_enable`` (+ fp16) and, for models without Q/DQ nodes,
                           ``trt_int8_calibration_table_name`` with
                           ``trt_int8_use_native_calibration_table=False``: a table written
                           by ``onnxruntime.quantization.write_calibration_table``
workspace_mb               ``trt_max_workspace_size`` (bytes)
profiles / max_batch       ``trt_profile_min_shapes`` / ``_opt_`` / ``_max_`` (``x:1x6,y:1x3``)
dla_core                   ``trt_dla_enable`` + ``trt_dla_core``
optimization_level         ``trt_builder_optimization_level``
hardware_compatibility     ``trt_engine_hw_compatible`` (``ampere_plus`` only)
cuda_graphs                ``trt_cuda_graph_enable``
engine_cache (default on)  ``trt_engine_cache_enable`` + ``trt_engine_cache_path``
timing_cache               ``trt_timing_cache_enable`` + ``trt_timing_cache_path`` (a folder:
                           ONNX Runtime names the file per compute capability)
gpu                        ``device_id`` of the TensorRT and CUDA providers
=========================  ===============================================================

Caches
    ONNX Runtime writes the TensorRT engines (``.engine`` + ``.profile``), the timing cache
    (``.timing``) and reads the calibration table in one folder. enginesmith builds into a
    temporary folder, keeps every file it holds as a bundle cache entry ``ort_tensorrt.<file>``
    (plus ``ort_tensorrt.meta.json``: the GPU and TensorRT they were made on), and restores
    them into a private folder when the engine is loaded, so a load on the same GPU skips the
    TensorRT build. Engines from another GPU or TensorRT version are left out at load
    (ONNX Runtime would rebuild or refuse them).

What has run
    The option mapping, the profile strings, the calibration tables (ONNX Runtime's
    calibrators run on the CPU), the cache bookkeeping and the version parsing are tested on
    CPU. No session on the TensorRT or CUDA provider has run: onnxruntime-gpu and TensorRT
    cannot be installed where this was written (nor on the project's GPU machine, which has
    no network), so the sessions themselves are written against the documentation only.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import BackendUnavailableError, BuildError, ValidationDataError
from ..signature import Signature, random_inputs
from .base import Calibration
from .caches import cache_dir
from .tensorrt.options import Profile, TrtOptions, bool_option, parse_options, profile_max_batch, resolve_profiles

TRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
GPU_PROVIDERS = frozenset({TRT_EP, CUDA_EP})
MiB = 1 << 20

# Backend options that configure the TensorRT provider (names shared with the TensorRT backend).
TRT_OPTIONS = (
    "workspace_mb", "profiles", "max_batch", "opt_batch", "dla_core", "gpu_fallback", "optimization_level",
    "version_compatible", "hardware_compatibility", "timing_cache", "cuda_graphs", "engine_cache",
)
# TensorRT backend options that ONNX Runtime's provider has no equivalent for.
TRT_BACKEND_ONLY = ("strongly_typed", "contexts")

CACHE_PREFIX = "ort_tensorrt."
META_NAME = CACHE_PREFIX + "meta.json"
CALIBRATION_TABLE = "calibration.flatbuffers"
# Files whose use depends on the GPU and TensorRT version (the calibration table does not).
DEVICE_BOUND_SUFFIXES = (".engine", ".profile", ".timing")


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class OrtGpuSettings:
    """The GPU part of the ONNX Runtime backend's options, validated."""

    trt: TrtOptions | None  # None when the TensorRT provider is not used
    gpu: int = 0
    engine_cache: bool = True


_LABELS = {TRT_EP: "TensorRT", CUDA_EP: "CUDA", "CPUExecutionProvider": "CPU"}


def _labels(providers: list[str]) -> str:
    return ", ".join(_LABELS.get(p, p.replace("ExecutionProvider", "")) for p in providers)


def gpu_settings(raw: Mapping[str, Any], providers: list[str]) -> OrtGpuSettings:
    """Validate the TensorRT/CUDA options against the providers; a misplaced option is a :class:`BuildError`."""
    given = sorted(k for k in raw if k in TRT_OPTIONS)
    if given and TRT_EP not in providers:
        raise BuildError(
            f"backend option{'s' if len(given) > 1 else ''} {', '.join(given)} configure TensorRT, but this ONNX Runtime "
            f"build uses the {_labels(providers)} provider(s): add --provider tensorrt (onnxruntime-gpu with TensorRT) "
            "or build with --backend tensorrt"
        )
    backend_only = sorted(k for k in raw if k in TRT_BACKEND_ONLY)
    if backend_only and TRT_EP in providers:
        raise BuildError(
            f"backend option{'s' if len(backend_only) > 1 else ''} {', '.join(backend_only)} exist in the TensorRT backend "
            "only, not in ONNX Runtime's TensorRT provider: drop them or build with --backend tensorrt"
        )
    if "gpu" in raw and not GPU_PROVIDERS & set(providers):
        raise BuildError("backend option gpu selects a CUDA device: add --provider cuda or --provider tensorrt")
    gpu = parse_options({"gpu": raw.get("gpu")}).gpu if raw.get("gpu") is not None else 0
    if TRT_EP not in providers:
        return OrtGpuSettings(None, gpu)
    trt = parse_options({k: raw[k] for k in given if k != "engine_cache"})
    _check_supported(trt)
    return OrtGpuSettings(trt, gpu, bool_option("engine_cache", raw.get("engine_cache", True)))


def _check_supported(trt: TrtOptions) -> None:
    """Options the TensorRT backend has but ONNX Runtime's provider cannot express."""
    if trt.version_compatible:
        raise BuildError(
            "ONNX Runtime's TensorRT provider cannot build version-compatible engines: drop --version-compatible "
            "or build with --backend tensorrt"
        )
    if trt.hardware_compatibility == "same_compute_capability":
        raise BuildError(
            "ONNX Runtime's TensorRT provider knows hardware compatibility ampere_plus only (trt_engine_hw_compatible): "
            "use --hardware-compat ampere_plus or --backend tensorrt"
        )
    if not trt.gpu_fallback:
        raise BuildError(
            "ONNX Runtime's TensorRT provider always lets layers the DLA cannot run fall back to the GPU: "
            "drop gpu_fallback=false or build with --backend tensorrt"
        )


def profile_shapes(profiles: Mapping[str, Profile]) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` strings: ``"x:1x6,y:1x3"``, one entry per dynamic input."""
    bad = [name for name in profiles if not name or ":" in name or "," in name]
    if bad:
        raise BuildError(
            f"input name {bad[0]!r} contains ':' or ',', which ONNX Runtime's profile shape options cannot express; "
            "rename the input or build with --backend tensorrt"
        )
    text = {}
    for key in ("min", "opt", "max"):
        text[f"trt_profile_{key}_shapes"] = ",".join(
            f"{name}:{'x'.join(str(d) for d in getattr(p, key))}" for name, p in profiles.items()
        )
    return text


def _flag(value: bool) -> str:
    return "True" if value else "False"  # what ONNX Runtime's Python docs pass for bool options


@dataclass(frozen=True)
class TrtEpPlan:
    """Everything the TensorRT provider options are made from (stored in, and read back from, the manifest)."""

    settings: OrtGpuSettings
    precision: str
    profiles: dict[str, Profile]
    workspace_mb: int | None
    int8_table: bool  # a calibration table sits in the cache folder


def trt_provider_options(plan: TrtEpPlan, cache_folder: str) -> dict[str, str]:
    """The TensorRT provider's options (strings, as ONNX Runtime stores them) for a build or a load."""
    trt = plan.settings.trt
    assert trt is not None
    options = {
        "device_id": str(plan.settings.gpu),
        # int8 keeps fp16 on too: TensorRT picks fp16 for layers without int8 kernels instead of fp32.
        "trt_fp16_enable": _flag(plan.precision in ("fp16", "int8")),
        "trt_int8_enable": _flag(plan.precision == "int8"),
        # Also where the calibration table is read from, so it is set even without the engine cache.
        "trt_engine_cache_path": cache_folder,
        "trt_engine_cache_enable": _flag(plan.settings.engine_cache),
        "trt_timing_cache_enable": _flag(trt.timing_cache != "off"),
    }
    if trt.timing_cache != "off":
        options["trt_timing_cache_path"] = cache_folder
    if plan.int8_table:
        options["trt_int8_calibration_table_name"] = CALIBRATION_TABLE
        options["trt_int8_use_native_calibration_table"] = _flag(False)  # ONNX Runtime's flatbuffers table
    if plan.workspace_mb:
        options["trt_max_workspace_size"] = str(plan.workspace_mb * MiB)
    if trt.dla_core is not None:
        options["trt_dla_enable"] = _flag(True)
        options["trt_dla_core"] = str(trt.dla_core)
    if trt.optimization_level is not None:
        options["trt_builder_optimization_level"] = str(trt.optimization_level)
    if trt.hardware_compatibility == "ampere_plus":
        options["trt_engine_hw_compatible"] = _flag(True)
    if trt.cuda_graphs:
        options["trt_cuda_graph_enable"] = _flag(True)
    if plan.profiles:
        options.update(profile_shapes(plan.profiles))
    return options


def cuda_provider_options(settings: OrtGpuSettings) -> dict[str, str]:
    """The CUDA provider's options; its documented defaults (exhaustive cuDNN search, arena) are kept."""
    return {"device_id": str(settings.gpu)}


def provider_list(providers: list[str], plan: TrtEpPlan | None, settings: OrtGpuSettings, cache_folder: str) -> list[Any]:
    """``providers=`` for ``InferenceSession``: names, with (name, options) for the GPU providers."""
    listed: list[Any] = []
    for name in providers:
        if name == TRT_EP and plan is not None:
            listed.append((name, trt_provider_options(plan, cache_folder)))
        elif name == CUDA_EP:
            listed.append((name, cuda_provider_options(settings)))
        else:
            listed.append(name)
    return listed


def resolve_plan(
    settings: OrtGpuSettings, precision: str, signature: Signature, device: "GpuFacts | None", int8_table: bool
) -> TrtEpPlan:
    """Profiles from the options or the dynamic batch, and the workspace default of the TensorRT backend."""
    assert settings.trt is not None
    integrated = bool(device and device.integrated)
    profiles = resolve_profiles(signature, settings.trt, integrated)
    workspace = settings.trt.workspace_mb or (default_workspace_mb(device) if device else None)
    return TrtEpPlan(settings, precision, profiles, workspace, int8_table)


def default_workspace_mb(device: "GpuFacts") -> int:
    """The TensorRT backend's default: 256 MiB on integrated GPUs (Jetson), a quarter of the GPU up to 4 GiB."""
    if device.integrated or not device.total_memory:
        return 256
    return int(max(256, min(4096, device.total_memory // 4 // MiB)))


def resolved_backend_options(raw: Mapping[str, Any], providers: list[str], plan: TrtEpPlan | None) -> dict[str, Any]:
    """The options as stored in the manifest: a load rebuilds exactly the provider options of the build."""
    options: dict[str, Any] = {**raw, "providers": providers}
    if plan is None:
        return options
    options["profiles"] = {name: p.to_dict() for name, p in plan.profiles.items()}
    options["engine_cache"] = plan.settings.engine_cache
    if plan.workspace_mb:
        options["workspace_mb"] = plan.workspace_mb
    max_batch = profile_max_batch(plan.profiles) if plan.profiles else None
    if max_batch:
        options["max_batch"] = max_batch  # the Engine splits larger batches
    return options


def plan_from_manifest(raw: Mapping[str, Any], providers: list[str], precision: str, int8_table: bool) -> TrtEpPlan | None:
    """The build's plan again, from the resolved options a manifest stores (no device needed)."""
    settings = gpu_settings({k: v for k, v in raw.items() if k != "providers"}, providers)
    if settings.trt is None:
        return None
    return TrtEpPlan(settings, precision, dict(settings.trt.profiles), settings.trt.workspace_mb, int8_table)


def warmup_feeds(signature: Signature, profiles: Mapping[str, Profile]) -> dict[str, np.ndarray]:
    """Inputs at the profiles' opt shapes (batch 1 elsewhere): the run that makes ONNX Runtime build the engines."""
    specs = [replace(s, shape=tuple(profiles[s.name].opt)) if s.name in profiles else s for s in signature.inputs]
    return random_inputs(specs, batch=1, seed=0)


def missing_providers(requested: list[str], active: list[str]) -> list[str]:
    """GPU providers asked for that the session did not start (ONNX Runtime only warns and falls back)."""
    return [p for p in requested if p in GPU_PROVIDERS and p not in active]


def explain_missing(missing: list[str], ort_version: str) -> BackendUnavailableError:
    names = _labels(missing)
    if TRT_EP in missing:
        fix = (
            "install the TensorRT libraries this onnxruntime-gpu was built against (see the ONNX Runtime/TensorRT "
            "version table on onnxruntime.ai), or build with --provider cuda, or with --backend tensorrt"
        )
    else:
        fix = "install the CUDA and cuDNN libraries this onnxruntime-gpu was built against, or build without --provider cuda"
    return BackendUnavailableError(f"ONNX Runtime {ort_version} could not start its {names} execution provider: {fix}")


# --------------------------------------------------------------------------- int8 calibration table


def _symmetric_ranges(tensors: Any) -> Any:
    """Ranges as TensorRT uses them: symmetric, ``[-m, m]`` with ``m = max(|lowest|, |highest|)``.

    ``write_calibration_table`` stores ``max(highest, lowest)``, which is wrong for a tensor
    whose values are all negative; symmetric ranges make its choice the right one.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    data = {}
    for name in tensors:
        low, high = tensors[name].range_value
        # Per-tensor ranges: a range stored per channel is reduced to its largest magnitude.
        bound = np.float32(max(np.abs(np.asarray(low, np.float64)).max(), np.abs(np.asarray(high, np.float64)).max()))
        data[name] = TensorData(lowest=np.array(-bound, np.float32), highest=np.array(bound, np.float32))
    return TensorsData(CalibrationMethod.MinMax, data)


def calibration_table(ranges_json: bytes, tmp: Path) -> bytes:
    """ONNX Runtime's TensorRT calibration table (flatbuffers) from its JSON calibration cache."""
    from onnxruntime.quantization import write_calibration_table
    from onnxruntime.quantization.calibrate import load_tensors_data

    source = tmp / "ranges.json"
    source.write_bytes(ranges_json)
    try:
        tensors = load_tensors_data(source)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValidationDataError(f"the calibration cache cannot be read as ONNX Runtime ranges ({exc}); calibrate again with --calib DATA") from None
    folder = tmp / "table"
    folder.mkdir(exist_ok=True)
    write_calibration_table(_symmetric_ranges(tensors), dir=str(folder))
    return (folder / CALIBRATION_TABLE).read_bytes()


class _Batches:
    """ONNX Runtime's CalibrationDataReader over enginesmith's batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def calibrate_ranges(model_path: Path, calibration: Calibration, tmp: Path, log: list[str]) -> bytes:
    """Activation ranges of every tensor (JSON, ONNX Runtime's cache format), from data or from the cache.

    Calibration runs on ONNX Runtime's CPU provider, so it works (and is tested) without a GPU.
    """
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data

    if calibration.cache is not None and calibration.cache.lstrip().startswith(b"{"):
        log.append("int8: calibration skipped, ranges reused from the calibration cache")
        return calibration.cache
    if not calibration.batches:
        raise ValidationDataError("int8 needs calibration data: give --calib DATA (or --calib-random for a smoke test)")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    try:
        calibrator = create_calibrator(
            model_path, None, augmented_model_path=str(tmp / "augmented.onnx"),
            calibrate_method=methods[calibration.method],
            extra_options={"symmetric": True} if calibration.method == "minmax" else {},
        )
        calibrator.collect_data(_Batches(calibration.batches))
        ranges = calibrator.compute_data()
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises many types
        raise BuildError(f"int8 calibration for TensorRT failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    samples = sum(next(iter(b.values())).shape[0] for b in calibration.batches)
    log.append(f"int8: {calibration.method} calibration of {len(list(ranges))} tensors on {samples} samples "
               "(TensorRT calibration table, symmetric ranges)")
    target = tmp / "ranges.json"
    save_tensors_data(ranges, target)
    return target.read_bytes()


# --------------------------------------------------------------------------- cache folders


def restore_caches(caches: Mapping[str, bytes], folder: Path, keep_device_bound: bool = True) -> list[str]:
    """Write the bundle's ``ort_tensorrt.*`` entries into ``folder``; returns the file names written."""
    written = []
    for entry, data in caches.items():
        if not entry.startswith(CACHE_PREFIX) or entry == META_NAME:
            continue
        name = entry[len(CACHE_PREFIX):]
        if Path(name).name != name or name in ("", ".", ".."):
            continue  # bundle names are checked on read; a path here is never written outside the folder
        if not keep_device_bound and name.endswith(DEVICE_BOUND_SUFFIXES):
            continue
        (folder / name).write_bytes(data)
        written.append(name)
    return sorted(written)


def collect_caches(folder: Path, meta: Mapping[str, Any]) -> dict[str, bytes]:
    """Every file ONNX Runtime left in the cache folder, as bundle cache entries, with the facts they depend on."""
    caches = {CACHE_PREFIX + p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    if caches:
        caches[META_NAME] = json.dumps(dict(meta), sort_keys=True).encode()
    return caches


def cache_meta(device: GpuFacts | None, trt_version: str | None, ort_version: str, provider_options: Mapping[str, str]) -> dict[str, Any]:
    """What the cached engines depend on: the GPU, TensorRT, ONNX Runtime and the provider options (paths left out)."""
    meta: dict[str, Any] = {"onnxruntime": ort_version, "provider_options": settings_key(provider_options)}
    if device is not None:
        meta["gpu"] = device.name
        meta["compute_capability"] = "{}.{}".format(*device.compute_capability)
    if trt_version:
        meta["tensorrt"] = trt_version
    return meta


def settings_key(provider_options: Mapping[str, str]) -> dict[str, str]:
    """Provider options without the folders, which differ between the build and every load."""
    return {k: v for k, v in sorted(provider_options.items()) if k not in ("trt_engine_cache_path", "trt_timing_cache_path")}


def stale_reason(caches: Mapping[str, bytes], here: Mapping[str, Any]) -> str | None:
    """Why the bundle's TensorRT engines and timing cache cannot be used here, or None when they can.

    ``here`` is :func:`cache_meta` of this machine and these options. Facts unknown on either
    side are not held against the caches: ONNX Runtime names its engine files by compute
    capability and rebuilds what does not fit.
    """
    raw = caches.get(META_NAME)
    if raw is None:
        return None
    try:
        built = json.loads(raw)
    except ValueError:
        return "their description is unreadable"
    diffs = [
        f"{key} is {here.get(key) or 'unknown'} (engines: {built[key]})"
        for key in ("gpu", "compute_capability", "tensorrt", "onnxruntime")
        if built.get(key) and here.get(key) and built[key] != here[key]
    ]
    if built.get("provider_options") and here.get("provider_options") and built["provider_options"] != here["provider_options"]:
        changed = sorted(k for k in set(built["provider_options"]) | set(here["provider_options"])
                         if built["provider_options"].get(k) != here["provider_options"].get(k))
        diffs.append(f"the TensorRT provider options differ ({', '.join(changed)})")
    return "; ".join(diffs) or None


def copy_timing_caches(source: Path, target: Path) -> int:
    """Copy ``*.timing`` files (ONNX Runtime names them per compute capability); returns how many."""
    count = 0
    if not source.is_dir():
        return 0
    for path in source.glob("*.timing"):
        try:
            target.mkdir(parents=True, exist_ok=True)
            partial = target / f".{path.name}.{os.getpid()}.partial"
            shutil.copyfile(path, partial)
            os.replace(partial, target / path.name)  # concurrent builds: the last complete file wins
            count += 1
        except OSError:
            continue  # a read-only shared cache must not fail a build
    return count


def shared_timing_folder(option: str) -> Path | None:
    """Where timing caches are shared between builds: enginesmith's cache folder ("auto"), a given folder, or None."""
    if option == "off":
        return None
    if option != "auto":
        return Path(option).expanduser()
    return cache_dir() / "onnxruntime-tensorrt"


# --------------------------------------------------------------------------- GPU facts


@dataclass(frozen=True)
class GpuFacts:
    name: str
    compute_capability: tuple[int, int]
    integrated: bool
    total_memory: int
    driver: str


def gpu_facts(index: int = 0) -> GpuFacts | None:
    """The GPU's facts via cuda-python, else the CUDA driver library itself; None without a usable GPU."""
    try:
        from .tensorrt import cuda

        facts = cuda.device_facts(index)
        return GpuFacts(facts.name, facts.compute_capability, facts.integrated, facts.total_memory, facts.driver_version)
    except Exception:  # noqa: BLE001 - no cuda-python, no runtime library, or no device: ask the driver
        return _driver_api_facts(index)


# CUdevice_attribute values (cuda.h).
_CU_INTEGRATED, _CU_CC_MAJOR, _CU_CC_MINOR = 18, 75, 76


def _driver_library() -> Any | None:
    names = ["nvcuda.dll"] if platform.system() == "Windows" else ["libcuda.so.1", "libcuda.so"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _driver_api_facts(index: int) -> GpuFacts | None:
    """Read the device through the CUDA driver API (libcuda ships with every NVIDIA driver)."""
    lib = _driver_library()
    if lib is None or lib.cuInit(0) != 0:
        return None
    device = ctypes.c_int()
    if lib.cuDeviceGet(ctypes.byref(device), index) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    values = {}
    for key, attribute in (("integrated", _CU_INTEGRATED), ("major", _CU_CC_MAJOR), ("minor", _CU_CC_MINOR)):
        value = ctypes.c_int()
        lib.cuDeviceGetAttribute(ctypes.byref(value), attribute, device)
        values[key] = value.value
    memory = ctypes.c_size_t()
    total = getattr(lib, "cuDeviceTotalMem_v2", None)
    if total is not None:
        total(ctypes.byref(memory), device)
    version = ctypes.c_int()
    lib.cuDriverGetVersion(ctypes.byref(version))
    lib.cuDeviceGetName(name, len(name), device)
    return GpuFacts(
        name.value.decode(errors="replace"), (values["major"], values["minor"]), bool(values["integrated"]),
        int(memory.value), cuda_version_text(version.value),
    )


def cuda_version_text(version: int) -> str:
    """``12040`` -> ``"12.4"`` (CUDA encodes 1000 * major + 10 * minor)."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def parse_infer_lib_version(number: int) -> str:
    """``getInferLibVersion()`` as text: ``8601`` -> 8.6.1 (TensorRT 8), ``100300`` -> 10.3.0 (TensorRT 10+).

    TensorRT 8 encodes major * 1000 + minor * 100 + patch; TensorRT 10 changed it to
    (major * 100 + minor) * 100 + patch (NvInferRuntimeBase.h of each release).
    """
    if number >= 100000:
        return f"{number // 10000}.{(number // 100) % 100}.{number % 100}"
    return f"{number // 1000}.{(number // 100) % 10}.{number % 100}"


_NVINFER = ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so.8", "libnvinfer.so", "nvinfer_10.dll", "nvinfer.dll")
_TRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu12-libs", "tensorrt-cu13-libs", "tensorrt-libs")


def tensorrt_version() -> str | None:
    """The TensorRT library ONNX Runtime will load: asked from libnvinfer itself, else from pip's metadata."""
    for name in _NVINFER:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            return parse_infer_lib_version(int(lib.getInferLibVersion()))
        except AttributeError:
            continue
    from importlib import metadata

    for distribution in _TRT_DISTRIBUTIONS:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def ort_cuda_version() -> str | None:
    """The CUDA version onnxruntime-gpu was built with (recorded in its package info)."""
    try:
        from onnxruntime.capi import build_and_package_info
    except ImportError:
        return None
    return getattr(build_and_package_info, "cuda_version", None) or None


def gpu_fingerprint(providers: list[str], gpu: int) -> dict[str, str]:
    """Device name, compute capability, driver, CUDA and TensorRT versions, each where obtainable."""
    facts: dict[str, str] = {}
    device = gpu_facts(gpu)
    if device is not None:
        facts["gpu"] = device.name
        facts["compute_capability"] = "{}.{}".format(*device.compute_capability)
        facts["cuda_driver"] = device.driver
    cuda = ort_cuda_version()
    if cuda:
        facts["cuda_runtime"] = cuda
    if TRT_EP in providers:
        version = tensorrt_version()
        if version:
            facts["tensorrt"] = version
    return facts


__all__ = [
    "CACHE_PREFIX", "CALIBRATION_TABLE", "CUDA_EP", "GPU_PROVIDERS", "META_NAME", "TRT_EP", "TRT_OPTIONS",
    "GpuFacts", "OrtGpuSettings", "TrtEpPlan", "cache_meta", "calibrate_ranges", "calibration_table", "collect_caches",
    "copy_timing_caches", "cuda_provider_options", "explain_missing", "gpu_facts", "gpu_fingerprint", "gpu_settings",
    "missing_providers", "parse_infer_lib_version", "plan_from_manifest", "profile_shapes", "provider_list",
    "resolve_plan", "resolved_backend_options", "restore_caches", "settings_key", "shared_timing_folder", "stale_reason",
    "tensorrt_version", "trt_provider_options", "warmup_feeds",
]
