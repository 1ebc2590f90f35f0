"""The public Python API; the CLI is a thin layer over these functions.

``build`` runs the stages of :mod:`enginesmith.pipeline`; ``validate`` and ``layerwise``
compare an engine with its source (:mod:`enginesmith.validate.engine_checks`,
:mod:`enginesmith.graph.layerwise`); ``bench`` times it; ``load`` and ``info`` read bundles.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .backends import Backend, BuildOptions, get_backend
from .backends.base import ProgressCallback
from .bench import BenchReport, machine_facts, measure
from .build_inputs import sample_axes, sample_feeds, take_rows
from .bundle import extract_verified_entry, read_bundle
from .errors import (
    BackendUnavailableError,
    EnginesmithError,
    PlatformMismatchError,
    UntrustedCodeError,
    ValidationDataError,
)
from .importers import ImportOptions, reference_runner
from .importers.archive import write_embedded_source
from .manifest import Manifest
from .pipeline import BuildRequest, reusable_caches, run_build  # noqa: F401  (reusable_caches: part of the API)
from .pipeline.request import CALIBRATION_CACHE_NAME  # noqa: F401
from .precision_data import PrecisionDataWarning, RandomCalibrationWarning  # noqa: F401  (warnings of build)
from .runtime.engine import Engine
from .runtime.preprocess import PreprocessSpec
from .validate import AccuracyBudget, Tolerance, ValidationReport
from .validate.data import load_dataset
from .validate.engine_checks import (  # noqa: F401  (validation_batches, validate_engine: part of the API)
    attach_report,
    check_same_inputs,
    default_validation_batches,
    store_report,
    validate_engine,
    validation_batches,
)

SourceLike = Any  # a path, or an in-memory model (onnx.ModelProto, keras.Model, torch.nn.Module)


# --------------------------------------------------------------------------- build


def build(
    source: SourceLike,
    *,
    backend: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
    backend_options: Mapping[str, Any] | None = None,
    import_options: ImportOptions | None = None,
    include_source: bool = True,
    verify: bool = True,
    tolerance: Tolerance | None = None,
    output: str | Path | None = None,
    progress: ProgressCallback | None = None,
    calibration_data: str | Path | Mapping[str, np.ndarray] | None = None,
    calibration_method: str | None = None,
    calibration_random: bool = False,
    calibration_cache: str | Path | None = None,
    preprocess: PreprocessSpec | str | None = None,
    holdout: float = 0.2,
    accuracy_budget: AccuracyBudget | str | None = None,
    force_precision: bool | None = None,
    graph_passes: bool | None = None,
    disabled_passes: Sequence[str] | None = None,
    check_compatibility: bool = True,
    data: str | Path | Mapping[str, np.ndarray] | None = None,
    candidates: Sequence[str] | None = None,
    select: str | None = None,
    coco_annotations: str | Path | None = None,
    coco_images: str | Path | None = None,
) -> Engine:
    """Build an engine for this machine from a model file, an in-memory model, or a bundle.

    ``backend="auto"`` builds every candidate backend installed here (``candidates``, default
    ONNX Runtime and OpenVINO), checks each against the source, times each, and keeps the one
    ``select`` picks: ``"latency"`` (lowest p50 at batch 1, the default), ``"throughput"`` or
    ``"throughput-within:MS"``; with ``precision="best"`` every precision of every candidate
    competes. The table is ``checks["backend_candidates"]``. ``backend=None`` takes the
    highest-priority backend without timing (on a rebuild: the bundle's, or auto again when
    auto chose it).

    Given a bundle, the engine is rebuilt from the source model it carries with the
    options (and calibration cache) it was built with, unless overridden here.

    ``precision`` is fp32, fp16, int8 or ``best``; int8 calibrates on ``calibration_data``
    (an .npy/.npz file, a folder of images or arrays, or a dict of arrays) and keeps
    ``holdout`` of it aside to validate on. ``best`` builds every precision the backend
    supports and keeps the fastest that stays within ``accuracy_budget`` (``"1%"``,
    ``"agreement>=0.99"``, ``"rel_l2<=0.05"``), or, for detectors, ``"map:1%"``: the engine
    may lose at most 1 point (100 x mAP) of COCO mAP@[.5:.95] (``map50:`` for mAP@.5) against the
    source on ``coco_images`` labelled by ``coco_annotations`` (COCO instances JSON; needs
    ``enginesmith[vision]``); the verify stage and ``best``'s candidates are then judged by mAP,
    recorded in ``checks["map_budget"]`` (and the candidates' rows).

    Before building, the model is checked against the backend's operator support
    (``check_compatibility``; an unbuildable model raises
    :class:`~enginesmith.graph.compat.IncompatibleModelError` carrying the full report) and
    the default graph passes run (``graph_passes``; names in ``disabled_passes`` are
    skipped), each checked numerically and rolled back if it changes the outputs.

    With ``verify`` (the default) the engine is compared with the source run by its own
    framework, and a failed comparison raises :class:`BuildError`; it runs on ``data`` when given,
    else on the held-out calibration data, else on the generated inputs.

    ``data`` (an .npz keyed by input name, an .npy for a single input, a folder of images or
    arrays, or a dict of arrays) gives sample inputs: the graph-pass checks and the
    verification run on them, and the first of them (at most 8 MB) are stored in the bundle,
    where ``validate`` and rebuilds find them. Without data, inputs are generated from what the
    graph says about its inputs and tried on the source first; a model that runs on none of
    them stops the build with a :class:`BuildError` naming what was tried and the fix.

    The build runs as named stages (import, check, inputs, passes, build, verify, package);
    an error raised in one carries its name in ``stage``, and ``checks["stages"]`` in the
    manifest records the seconds each took.
    """
    request = BuildRequest(
        source, backend=backend, precision=precision, threads=threads, backend_options=backend_options,
        import_options=import_options, include_source=include_source, verify=verify, tolerance=tolerance,
        output=output, calibration_data=calibration_data, calibration_method=calibration_method,
        calibration_random=calibration_random, calibration_cache=calibration_cache, preprocess=preprocess,
        holdout=holdout, accuracy_budget=accuracy_budget, force_precision=force_precision, graph_passes=graph_passes,
        disabled_passes=disabled_passes, check_compatibility=check_compatibility, data=data,
        candidates=candidates, select=select, coco_annotations=coco_annotations, coco_images=coco_images,
    )
    return run_build(request, progress)


# --------------------------------------------------------------------------- load


def load(path: str | Path, *, check_platform: bool = True, trust_code: bool = False, threads: int | None = None) -> Engine:
    """Open a bundle: verify checksums, check it was built for this platform, load the payload.

    Engines whose payload runs code when loaded (the PyTorch backend's compiler cache) are
    refused unless ``trust_code``: say so only for engines from builders you trust.
    ``threads`` overrides the intra-op threads the build recorded (several engines sharing a machine).
    """
    path = Path(path)
    manifest = read_bundle(path, payload=False).manifest
    backend = _backend_for(manifest, path)
    options = BuildOptions.from_dict(manifest.build_options)
    if threads is not None:
        options.threads = threads
    if check_platform:
        check_platform_compatible(manifest, backend, path)
    reason = backend.payload_runs_code(options)
    if reason and not trust_code:
        raise UntrustedCodeError(
            f"loading '{path.name}' would run code from the file ({backend.display_name}: {reason}); "
            "load it only if you trust whoever built it: pass --trust-code (trust_code=True)"
        )
    # Cache entries are read only for backends that restore them at load (they can be large).
    caches = read_bundle(path, payload=False, caches=True).caches if backend.needs_caches_at_load(options) else {}
    with tempfile.TemporaryDirectory(prefix="enginesmith-load-") as tmp:
        payload = extract_verified_entry(path, manifest, manifest.payload_entry, Path(tmp) / manifest.payload_name)
        session = backend.load_with_caches(payload, options, manifest.signature, caches)
    return Engine(manifest, session, path=path)


def _rebuild_hint(manifest: Manifest, path: Path | None) -> str:
    name = path.name if path else "model.engine"
    if manifest.has_source:
        return f"rebuild it here with 'enginesmith build {name}' (the bundle carries its source)"
    return f"rebuild it here from the original model ('{manifest.source_name}') with 'enginesmith build'"


def _backend_for(manifest: Manifest, path: Path | None) -> Backend:
    try:
        backend = get_backend(manifest.backend)
    except BackendUnavailableError:
        raise PlatformMismatchError(
            f"engine was built with backend '{manifest.backend}', which this enginesmith does not know; "
            f"upgrade enginesmith or {_rebuild_hint(manifest, path)}"
        ) from None
    status = backend.available()
    if not status:
        raise PlatformMismatchError(
            f"engine was built for {manifest.backend}, which is not available here ({status.reason}); "
            f"{_rebuild_hint(manifest, path)}"
        )
    return backend


def platform_differences(manifest: Manifest, backend: Backend) -> list[tuple[str, str | None, str | None]]:
    """(key, built, here) for every fingerprint key that must match but does not."""
    options = BuildOptions.from_dict(manifest.build_options)
    try:
        here = backend.fingerprint(options)
    except BackendUnavailableError as exc:
        return [("backend", str(manifest.fingerprint.get("providers", manifest.backend)), f"unavailable ({exc})")]
    return [
        (key, manifest.fingerprint.get(key), here.get(key))
        for key in manifest.fingerprint_must_match
        if manifest.fingerprint.get(key) != here.get(key)
    ]


def check_platform_compatible(manifest: Manifest, backend: Backend, path: Path | None = None) -> None:
    diffs = platform_differences(manifest, backend)
    if not diffs:
        return
    built_for = backend.describe_platform(manifest.fingerprint)
    what = ", ".join(f"{key} is {here or 'absent'} (engine: {built or 'absent'})" for key, built, here in diffs)
    raise PlatformMismatchError(f"engine was built for {built_for}; on this machine {what}: {_rebuild_hint(manifest, path)}")


def image_inputs(engine: Engine, images: Sequence[str | Path]) -> dict[str, np.ndarray]:
    """Images turned into the engine's single input with the preprocessing stored in its manifest."""
    from .runtime.preprocess import load_image
    from .validate.data import default_image_spec

    if len(engine.signature.inputs) != 1:
        raise ValidationDataError("--image feeds single-input engines only; use --input NAME=file.npy")
    spec = PreprocessSpec.from_dict(engine.manifest.preprocess) if engine.manifest.preprocess else default_image_spec(engine.signature)
    return {engine.signature.input_names[0]: np.stack([load_image(Path(p), spec) for p in images])}


# --------------------------------------------------------------------------- validate


def validate(
    engine: Engine | str | Path,
    against: SourceLike | None = None,
    *,
    data: str | Path | None = None,
    batch: int | None = None,
    batches: int = 3,
    seed: int = 0,
    tolerance: Tolerance | None = None,
    import_options: ImportOptions | None = None,
    store: bool = True,
    trust_code: bool = False,
) -> ValidationReport:
    """Compare an engine with a reference model (by default the source the bundle carries).

    Without ``data`` the inputs are the samples the bundle carries (``--data`` at build, or an
    int8 engine's held-out calibration data), else generated from the build's input plan, else
    random; the report's ``inputs`` says which. An int8 engine judged on anything but real
    samples gets an ``inconclusive`` report (not a failure). A reference whose inputs have other
    names than the engine's is refused before anything runs.

    With ``store`` and an engine on disk, the report is written into the bundle. ``trust_code``
    is passed to :func:`load` for an engine given as a path.
    """
    if not isinstance(engine, Engine):
        engine = load(engine, trust_code=trust_code)
    with tempfile.TemporaryDirectory(prefix="enginesmith-validate-") as tmp:
        if against is None:
            against, label = _embedded_source(engine, Path(tmp)), "embedded source"
        else:
            label = Path(against).name if isinstance(against, (str, Path)) else type(against).__name__
        recorded = ImportOptions.from_dict(engine.manifest.build_options.get("import_options", {}))
        options = import_options.over(recorded) if import_options is not None else recorded
        reference = reference_runner(against, options)
        check_same_inputs(engine, reference)
        spec = PreprocessSpec.from_dict(engine.manifest.preprocess) if engine.manifest.preprocess else None
        if data is not None:
            feeds, inputs_label = validation_batches(engine.signature, data, batch, batches, seed, spec)
            real = True
        else:
            feeds, inputs_label, real = default_validation_batches(engine, batch, batches, seed)
        report = validate_engine(engine, reference, feeds, inputs_label, reference_label=label, tolerance=tolerance)
        if engine.precision == "int8" and not real:
            report.inconclusive = (
                f"inputs {inputs_label.split(' (')[0]} cannot judge an int8 engine: its ranges were calibrated on real "
                "data, so differences on other inputs say nothing; validate with --data DATA (real inputs)"
            )
    attach_report(engine, "validation", report)
    if store and engine.path is not None:
        store_report(engine.path, "validation", report)
    return report


def layerwise(
    engine: str | Path,
    against: SourceLike | None = None,
    *,
    data: str | Path | None = None,
    batch: int | None = None,
    seed: int = 0,
    tolerance: Tolerance | None = None,
    import_options: ImportOptions | None = None,
):
    """Compare every intermediate tensor of a saved engine's backend with the source's, in topological order.

    Returns a :class:`~enginesmith.graph.layerwise.LayerwiseReport` naming the first layer
    whose output leaves the tolerance, so a broken conversion or fp16/int8 engine can be located.
    Without ``data`` it runs on the samples the bundle carries, else on the build's input plan.
    """
    from .graph.layerwise import layerwise_for_engine

    return layerwise_for_engine(engine, against, data=data, batch=batch, seed=seed, tolerance=tolerance,
                                import_options=import_options)


def _embedded_source(engine: Engine, tmp: Path) -> Path:
    if engine.path is None:
        raise ValidationDataError("this engine is not saved and no reference was given; pass against=MODEL")
    contents = read_bundle(engine.path, payload=False, source=True)
    if contents.source is None:
        raise ValidationDataError(
            f"'{engine.path.name}' does not carry its source model; give the reference with --against MODEL"
        )
    return write_embedded_source(contents.manifest.source_name, contents.source, tmp)


# --------------------------------------------------------------------------- bench


# How ``bench --vs`` runs each kind of source: what the engine's speed-up is measured against.
BASELINE_HOW = {
    "onnx": "a default ONNX Runtime session",
    "keras": "Keras predict",
    "savedmodel": "the SavedModel's TensorFlow signature",
    "tf_graph": "a TensorFlow session on the frozen graph",
    "tflite": "the TFLite interpreter",
    "torch": "the PyTorch module, eager",
    "torchscript": "the TorchScript module",
}


def baseline_description(source: SourceLike) -> str | None:
    """How ``bench --vs`` runs this source ('Keras predict'), for bench reports and plots."""
    from .importers import detect_kind

    try:
        return BASELINE_HOW.get(detect_kind(source))
    except EnginesmithError:
        return None


def _bench_feeds(engine: Engine, data: str | Path | None, batch: int, seed: int) -> dict[str, np.ndarray]:
    """``batch`` rows of the data (cycled when it has fewer); else inputs the model runs on (:func:`engine_inputs`)."""
    if data is None:
        return engine_inputs(engine, batch, seed)[0]
    spec = PreprocessSpec.from_dict(engine.manifest.preprocess) if engine.manifest.preprocess else None
    return take_rows(load_dataset(data, engine.signature, spec), batch, sample_axes(engine.signature))


def engine_inputs(engine: Engine, batch: int = 1, seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """``batch`` inputs the engine's model runs on, without data: the samples its bundle stores, else
    generated from the build's input plan, else seeded random; and a label saying which."""
    where = f"engine '{engine.path.name if engine.path else 'in memory'}'"
    return sample_feeds(engine.signature, engine.stored_samples(), engine.manifest.checks.get("samples"), where,
                        batch=batch, seed=seed)


def bench(
    engine: Engine | str | Path,
    *,
    batches: Sequence[int] = (1,),
    vs: SourceLike | None = None,
    runs: int | None = 50,
    duration_s: float | None = None,
    warmup: int = 5,
    seed: int = 0,
    data: str | Path | None = None,
    import_options: ImportOptions | None = None,
    baseline: Callable[[dict[str, np.ndarray]], Any] | None = None,
    baseline_label: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    trust_code: bool = False,
) -> BenchReport:
    """Latency and throughput per batch size, optionally against the source run by hand.

    Each target runs ``runs`` times, or with ``duration_s`` for that many seconds (and at least
    10 times) per batch size. Inputs are rows of ``data`` (a file or folder) or seeded random.
    """
    if not isinstance(engine, Engine):
        engine = load(engine, trust_code=trust_code)
    targets: dict[str, Callable] = {"engine": engine.infer}
    label = how = None
    if vs is not None:
        options = import_options or ImportOptions.from_dict(engine.manifest.build_options.get("import_options", {}))
        baseline = reference_runner(vs, options)
        baseline_label = baseline_label or (Path(vs).name if isinstance(vs, (str, Path)) else type(vs).__name__)
        how = baseline_description(vs)
    if baseline is not None:
        label = baseline_label or "baseline"
        targets[label] = baseline
    results = []
    for batch in batches:
        feeds = _bench_feeds(engine, data, batch, seed)
        results += measure(targets, feeds, batch, warmup=warmup, runs=runs, duration_s=duration_s, progress=progress)
    machine = {**machine_facts(), "backend": engine.backend, "precision": engine.precision}
    return BenchReport(results=results, baseline=label, machine=machine, baseline_how=how)


def info(path: str | Path) -> dict[str, Any]:
    """The manifest of a bundle (checksums verified, platform not required to match) and compatibility here."""
    contents = read_bundle(path, payload=False, reports=True)
    manifest = contents.manifest
    data = manifest.to_dict()
    try:
        backend = get_backend(manifest.backend)
        diffs = platform_differences(manifest, backend) if backend.available() else [("backend", manifest.backend, "unavailable")]
        data["platform_summary"] = backend.describe_platform(manifest.fingerprint)
    except BackendUnavailableError:
        diffs = [("backend", manifest.backend, "unknown")]
    data["runs_here"] = not diffs
    data["differences_here"] = [{"key": k, "engine": b, "here": h} for k, b, h in diffs]
    data["reports"] = {name: json.loads(raw) for name, raw in contents.reports.items()}
    return data
