"""The public Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import __version__
from .backends import Backend, BuildOptions, Calibration, get_backend, pick_backend
from .backends.base import CALIBRATION_METHODS, PRECISIONS, ProgressCallback
from .bench import BenchReport, machine_facts, measure
from .build_inputs import (
    BuildInputs,
    StoredSamples,
    plan_from_record,
    resolve_build_inputs,
    samples_to_store,
    split_samples,
    stored_validation_batches,
)
from .bundle import BundleContents, extract_verified_entry, looks_like_bundle, read_bundle, write_bundle
from .errors import (
    BackendUnavailableError,
    BuildError,
    BundleError,
    EnginesmithError,
    PlatformMismatchError,
    UntrustedCodeError,
    ValidationDataError,
    VerificationFailedError,
)
from .importers import ImportedModel, ImportOptions, ReferenceRunner, import_model, reference_runner
from .manifest import Manifest
from .precision_data import (  # noqa: F401  (the warnings are part of the API)
    PrecisionData,
    PrecisionDataWarning,
    RandomCalibrationWarning,
    prepare_precision_data,
)
from .runtime.engine import Engine
from .runtime.preprocess import PreprocessSpec, parse_spec
from .signature import Signature, random_inputs
from .validate import (
    RANDOM_INT8_INPUTS,
    AccuracyBudget,
    Tolerance,
    ValidationReport,
    failures_text,
    parse_budget,
    run_validation,
    tolerance_for,
)
from .validate.data import load_dataset, split_batches

# The file name backends use for int8 calibration ranges inside a bundle's cache/ folder.
CALIBRATION_CACHE_NAME = "calibration_cache.json"

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
) -> Engine:
    """Build an engine for this machine from a model file, an in-memory model, or a bundle.

    Given a bundle, the engine is rebuilt from the source model it carries with the
    options (and calibration cache) it was built with, unless overridden here.

    ``precision`` is fp32, fp16, int8 or ``best``; int8 calibrates on ``calibration_data``
    (an .npy/.npz file, a folder of images or arrays, or a dict of arrays) and keeps
    ``holdout`` of it aside to validate on. ``best`` builds every precision the backend
    supports and keeps the fastest that stays within ``accuracy_budget`` (``"1%"``,
    ``"agreement>=0.99"``, ``"rel_l2<=0.05"``).

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
    """
    previous: Manifest | None = None
    previous_caches: dict[str, bytes] = {}
    previous_samples: bytes | None = None
    with tempfile.TemporaryDirectory(prefix="enginesmith-build-") as tmp:
        if isinstance(source, (str, Path)) and Path(source).is_file() and looks_like_bundle(source):
            previous_samples = read_bundle(source, payload=False, samples=True).samples
            source, previous, import_options, previous_caches = _source_from_bundle(Path(source), Path(tmp), import_options)
        import_options = import_options or ImportOptions()
        chosen = _choose_backend(backend, previous)
        if import_options.opset is None:
            import_options = replace(import_options, default_opset=chosen.converter_opset)
        imported = import_model(source, import_options, kind=previous.source_kind if previous else None)
        same_backend = previous is not None and previous.backend == chosen.name
        options = _build_options(previous, precision, threads, backend_options, force_precision, calibration_method,
                                 same_backend=same_backend)
        previous_caches = reusable_caches(previous_caches, same_backend)
        options.previous_caches = previous_caches
        graph = _graph_settings(graph_passes, disabled_passes, check_compatibility, previous)
        spec = _preprocess_spec(preprocess, previous)
        compat_checks = _check_compatibility(imported, chosen, options, import_options, graph)
        inputs = resolve_build_inputs(imported.model, imported.signature, import_options.input_shapes, data, spec,
                                      _stored_samples(previous, previous_samples), needed=verify or graph.enabled,
                                      strict=verify)
        options.sample_feeds = inputs.check_feeds()
        imported, graph_checks = _prepare_graph(imported, chosen, options, import_options, graph, progress,
                                                check_feeds=options.sample_feeds)
        graph_checks = {**compat_checks, **graph_checks}
        budget = _accuracy_budget(accuracy_budget, previous)
        data = prepare_precision_data(
            imported.signature, options, calibration_data, calibration_random, spec, holdout,
            _calibration_cache(calibration_cache, previous_caches),
            budget=budget, best_tries_int8="int8" in chosen.precisions(options),
        )
        # Created after the first engine is built, so an unbuildable model reports the backend's error.
        reference = _lazy_reference(source, import_options, imported.kind)
        if options.precision == "best":
            engine = _build_best(imported, chosen, options, import_options, include_source, progress, data, reference,
                                 budget, inputs)
        else:
            engine = _build_engine(imported, chosen, options, import_options, include_source, progress, data.calibration)
            if verify and engine.precision == "int8" and not data.holdout and not inputs.real:
                # Random inputs fall outside the calibrated ranges, so comparing on them says nothing.
                engine.manifest.build_log.append(
                    f"int8 engine not verified: {data.unverified_reason}; "
                    "run 'enginesmith validate ENGINE --data DATA' on real inputs"
                )
            elif verify:
                _verify(engine, reference, data, tolerance or (budget.tolerance(engine.precision) if budget else None), imported.kind,
                        inputs)
        engine.manifest.build_log.extend(inputs.log)
        _store_samples(engine, inputs, data)
        engine.manifest.checks.update(graph_checks)
        engine.manifest.build_options["graph"] = graph.to_dict()
        engine.manifest.preprocess = spec.to_dict() if spec else None
        engine.manifest.accuracy_budget = budget.to_dict() if budget else None
        if data.check:
            engine.manifest.checks["calibration"] = data.check
    if output is not None:
        engine.save(output, include_source=include_source)
    return engine


def _store_samples(engine: Engine, inputs: BuildInputs, data: "PrecisionData") -> None:
    """Real samples (given data, else int8's held-out calibration data) go into the bundle, within the size bound."""
    raw, record, line = samples_to_store(inputs, data.holdout, data.holdout_label, bool(data.check.get("random")))
    engine.set_samples(raw)
    if record:
        engine.manifest.checks["samples"] = record
    if line:
        engine.manifest.build_log.append(line)


def _stored_samples(previous: Manifest | None, raw: bytes | None) -> StoredSamples | None:
    """The samples a rebuilt bundle carries, with where they first came from."""
    if previous is None or raw is None:
        return None
    return StoredSamples(raw, (previous.checks.get("samples") or {}).get("label", "build samples"))


def _timing_feeds(signature: Signature, inputs: BuildInputs | None) -> dict[str, np.ndarray]:
    """One input to time candidates with: a build sample, else generated from the plan, else random."""
    if inputs is not None and inputs.plan is not None:
        return inputs.plan.generate(seed=0, batch=1)
    feeds = inputs.check_feeds(limit=1) if inputs is not None else None
    return feeds if feeds is not None else random_inputs(signature.inputs, batch=1, seed=0)


def _lazy_reference(source: SourceLike, options: ImportOptions, kind: str) -> ReferenceRunner:
    runner: list[ReferenceRunner] = []

    def run(feeds: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        if not runner:
            runner.append(reference_runner(source, options, kind=kind))
        return runner[0](feeds)

    return run


def _verify(engine: Engine, reference: ReferenceRunner, data: PrecisionData, tolerance: Tolerance | None, kind: str,
            inputs: BuildInputs | None = None) -> None:
    report = _check_engine(engine, reference, data, tolerance, kind, inputs)
    _attach_report(engine, "build_verification", report)
    if not report.passed:
        raise VerificationFailedError(
            f"the built {engine.precision} engine does not match the source model ({failures_text(report)}); "
            "build without verification to keep it anyway"
        )


def _check_engine(engine: Engine, reference: ReferenceRunner, data: PrecisionData, tolerance: Tolerance | None, kind: str,
                  inputs: BuildInputs | None = None) -> ValidationReport:
    planned = inputs.validation_batches(engine.signature) if inputs is not None else None
    # Data the user gave comes first, then int8's held-out calibration data, then the generated plan.
    if planned is not None and inputs.real:
        batches, label = planned
    elif data.holdout:
        batches, label = data.holdout, data.holdout_label
    elif planned is not None:
        batches, label = planned
    else:
        batches, label = validation_batches(engine.signature)
    return validate_engine(engine, reference, batches, label, reference_label=f"{kind} source (its own framework)",
                           tolerance=tolerance)


def _build_best(
    imported: ImportedModel,
    backend: Backend,
    options: BuildOptions,
    import_options: ImportOptions,
    include_source: bool,
    progress: ProgressCallback | None,
    data: PrecisionData,
    reference: ReferenceRunner,
    budget: AccuracyBudget | None,
    inputs: BuildInputs | None = None,
) -> Engine:
    """Build each precision the backend supports; keep the fastest within the accuracy budget."""
    candidates: list[dict[str, Any]] = []
    kept: Engine | None = None
    kept_p50 = float("inf")
    for precision in backend.precisions(options):
        row: dict[str, Any] = {"precision": precision}
        candidates.append(row)
        if precision == "int8" and data.calibration is None:
            row.update(kept=False, reason="no calibration data (give --calib DATA)")
            continue
        candidate_options = replace(options, precision=precision)
        try:
            engine = _build_engine(imported, backend, candidate_options, import_options, include_source, progress,
                                   data.calibration if precision == "int8" else None)
        except EnginesmithError as exc:
            row.update(kept=False, reason=f"build failed: {exc}")
            continue
        tolerance = budget.tolerance(precision) if budget else tolerance_for(precision)
        report = _check_engine(engine, reference, data, tolerance, imported.kind, inputs)
        feeds = _timing_feeds(engine.signature, inputs)
        p50 = measure({"engine": engine.infer}, feeds, 1, warmup=3, runs=20, rounds=2)[0].p50_ms
        row.update(
            p50_ms=p50,
            worst_rel_l2=max(o.rel_l2 for o in report.outputs),
            min_cosine=min(o.cosine for o in report.outputs),
            argmax_agreement=min((o.argmax_agreement for o in report.outputs if o.argmax_agreement is not None), default=None),
        )
        if budget and budget.metric == "agreement" and row["argmax_agreement"] is None:
            raise ValidationDataError(
                f"the accuracy budget '{budget}' needs an output of class scores (float, last axis of 2 or more, "
                "a name that is not a box or regression); "
                "use a rel_l2 budget such as 'rel_l2<=0.05'"
            )
        if not report.passed:
            row.update(kept=False, reason="over the accuracy budget: " + failures_text(report))
            continue
        row.update(kept=False, reason="within budget", report=report)
        if p50 < kept_p50:
            kept, kept_p50 = engine, p50
    for row in candidates:
        report = row.pop("report", None)
        if kept is not None and row["precision"] == kept.precision and report is not None:
            row.update(kept=True, reason="fastest within the budget")
            _attach_report(kept, "build_verification", report)
        elif row["reason"] == "within budget":
            row["reason"] = "within budget, but slower"
    if kept is None:
        table = "; ".join(f"{r['precision']}: {r['reason']}" for r in candidates)
        raise BuildError(f"no precision stays within the accuracy budget ({table})")
    kept.manifest.checks["precision_candidates"] = candidates
    return kept


def _source_from_bundle(
    path: Path, tmp: Path, import_options: ImportOptions | None
) -> tuple[Path, Manifest, ImportOptions, dict[str, bytes]]:
    contents = read_bundle(path, payload=False, source=True, caches=True)
    manifest = contents.manifest
    if contents.source is None:
        raise BundleError(
            f"'{path.name}' does not carry its source model (built with --no-source); "
            "rebuild from the original model file instead"
        )
    target = tmp / Path(manifest.source_name).name
    target.write_bytes(contents.source)
    materialized = _materialize_source(target)
    recorded = ImportOptions.from_dict(manifest.build_options.get("import_options", {}))
    options = import_options.over(recorded) if import_options is not None else recorded
    return materialized, manifest, options, contents.caches


def _materialize_source(path: Path) -> Path:
    """Sources stored as archives (e.g. SavedModel folders) are unpacked safely next to them."""
    if path.suffix == ".zip" and path.stem.endswith(".dir"):
        from .importers.archive import unpack_directory

        return unpack_directory(path, path.with_suffix(""))
    return path


def _build_options(
    previous: Manifest | None,
    precision: str | None,
    threads: int | None,
    backend_options: Mapping[str, Any] | None,
    force_precision: bool | None,
    calibration_method: str | None,
    same_backend: bool = True,
) -> BuildOptions:
    recorded = (previous.build_options.get("requested") or previous.build_options) if previous else None
    base = BuildOptions.from_dict(recorded) if recorded else BuildOptions()
    if not same_backend:
        # Options of another backend (providers, TensorRT profiles) mean nothing to this one.
        base.backend_options = {}
    if precision is not None:
        if precision not in PRECISIONS + ("best",):
            raise BuildError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)} or best")
        base.precision = precision
    if threads is not None:
        base.threads = threads
    if force_precision is not None:
        base.force_precision = force_precision
    if calibration_method is not None:
        if calibration_method not in CALIBRATION_METHODS:
            raise BuildError(
                f"unknown calibration method '{calibration_method}': choose one of {', '.join(CALIBRATION_METHODS)}"
            )
        base.calibration_method = calibration_method
    if backend_options:
        base.backend_options = {**base.backend_options, **backend_options}
    return base


@dataclass(frozen=True)
class GraphSettings:
    """Which graph passes ``build`` runs; recorded in the manifest so a rebuild runs the same ones."""

    enabled: bool = True
    disabled: tuple[str, ...] = ()
    check_compatibility: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"passes": self.enabled, "disabled": list(self.disabled)}


def _graph_settings(
    enabled: bool | None, disabled: Sequence[str] | None, check_compatibility: bool, previous: Manifest | None
) -> GraphSettings:
    recorded = (previous.build_options.get("graph") or {}) if previous is not None else {}
    return GraphSettings(
        enabled=bool(recorded.get("passes", True)) if enabled is None else enabled,
        disabled=tuple(recorded.get("disabled", ())) if disabled is None else tuple(disabled),
        check_compatibility=check_compatibility,
    )


# Passes that exist because the user asked for them: failing one must stop the build, not be skipped.
REQUESTED_PASSES = ("fix_shapes", "make_dynamic", "convert_opset")


def _check_compatibility(
    imported: ImportedModel, backend: Backend, options: BuildOptions, import_options: ImportOptions, graph: GraphSettings
) -> dict[str, Any]:
    """Check the model against the backend (stops with IncompatibleModelError); returns the check summary."""
    from .graph.compat import check_buildable
    from .graph.passes import build_passes

    if not graph.check_compatibility:
        return {}
    specs = build_passes(import_options, graph.disabled) if graph.enabled else []
    names = [spec if isinstance(spec, str) else spec[0] for spec in specs]
    report = check_buildable(imported.model, backend.name, options, passes=names)
    return {"compatibility": {"target": report.target_label, "source": report.source,
                              "counts": report.counts, "summary": report.summary()}}


def _prepare_graph(
    imported: ImportedModel,
    backend: Backend,
    options: BuildOptions,
    import_options: ImportOptions,
    graph: GraphSettings,
    progress: ProgressCallback | None,
    check_feeds: Mapping[str, np.ndarray] | None = None,
) -> tuple[ImportedModel, dict[str, Any]]:
    """Run the graph passes, each checked on ``check_feeds`` (else generated inputs); returns the model and checks."""
    from .graph.passes import build_passes, optimize
    from .importers.onnx_importer import signature_of

    specs = build_passes(import_options, graph.disabled) if graph.enabled else []
    checks: dict[str, Any] = {}
    if not specs:
        return imported, checks
    model, summary = optimize(imported.model, specs, progress=progress, feeds=check_feeds)
    failed = [r for r in summary.rolled_back if r.name in REQUESTED_PASSES]
    if failed:
        raise BuildError(f"could not apply {failed[0].name} {failed[0].args}: {failed[0].reason}")
    checks["graph_passes"] = summary.to_dict()
    reshaped = any(r.name in ("fix_shapes", "make_dynamic") and r.status == "applied" for r in summary.results)
    signature = signature_of(model) if reshaped else imported.signature
    return replace(imported, model=model, signature=signature, log=imported.log + summary.lines()), checks


def _preprocess_spec(given: PreprocessSpec | str | None, previous: Manifest | None) -> PreprocessSpec | None:
    if isinstance(given, str):
        return parse_spec(given)
    if given is None and previous is not None and previous.preprocess:
        return PreprocessSpec.from_dict(previous.preprocess)
    return given


def _accuracy_budget(given: AccuracyBudget | str | None, previous: Manifest | None) -> AccuracyBudget | None:
    if isinstance(given, str):
        return parse_budget(given)
    if given is None and previous is not None and previous.accuracy_budget:
        rule = previous.accuracy_budget
        return AccuracyBudget.from_dict(rule)
    return given


def reusable_caches(caches: Mapping[str, bytes], same_backend: bool) -> dict[str, bytes]:
    """The rebuilt bundle's cache entries the new build may use.

    Cache names are per backend (a TensorRT timing cache, ONNX Runtime's TensorRT engines), so
    a build with another backend gets none of them, except the calibration ranges in ONNX
    Runtime's JSON format, which both the ONNX Runtime and the TensorRT backend read.
    """
    if same_backend:
        return dict(caches)
    ranges = caches.get(CALIBRATION_CACHE_NAME)
    return {CALIBRATION_CACHE_NAME: ranges} if ranges is not None and ranges.lstrip().startswith(b"{") else {}


def _calibration_cache(given: str | Path | None, previous_caches: Mapping[str, bytes]) -> bytes | None:
    """A calibration cache from a file or an engine bundle; else the rebuilt bundle's own."""
    if given is None:
        return previous_caches.get(CALIBRATION_CACHE_NAME)
    path = Path(given)
    if path.is_file() and looks_like_bundle(path):
        cache = read_bundle(path, payload=False, caches=True).caches.get(CALIBRATION_CACHE_NAME)
        if cache is None:
            raise ValidationDataError(f"'{path.name}' holds no calibration cache (it was not built as int8)")
        return cache
    if not path.is_file():
        raise ValidationDataError(f"calibration cache not found: '{path}'")
    return path.read_bytes()


def _choose_backend(name: str | None, previous: Manifest | None) -> Backend:
    if name in (None, "auto") and previous is not None:
        try:
            return pick_backend(previous.backend)
        except BackendUnavailableError:
            pass  # the original backend is not here; fall back to the best available one
    return pick_backend(name or "auto")


def _build_engine(
    imported: ImportedModel,
    backend: Backend,
    options: BuildOptions,
    import_options: ImportOptions,
    include_source: bool,
    progress: ProgressCallback | None,
    calibration: Calibration | None = None,
) -> Engine:
    result = backend.build(imported.model, imported.signature, options, progress, calibration)
    resolved = result.resolved_options
    manifest = Manifest(
        enginesmith_version=__version__,
        backend=backend.name,
        backend_version=backend.version(),
        precision=resolved.precision,
        signature=imported.signature,
        source_kind=imported.kind,
        source_name=Path(imported.source_filename).name,
        source_sha256=imported.source_sha256,
        # "requested" is what a rebuild starts from: values the backend derived from this machine
        # (threads, a workspace sized to this GPU, default profiles) are derived again on the next one.
        build_options={**resolved.to_dict(), "import_options": import_options.to_dict(), "requested": options.to_dict()},
        payload_name=result.payload_name,
        fingerprint=backend.fingerprint(resolved),
        fingerprint_must_match=backend.must_match(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        checks={"build": result.details},
        build_log=imported.log + result.log,
    )
    # The build's caches (ONNX Runtime's TensorRT engines) let the engine load without building again.
    session = backend.load_with_caches(result.payload, resolved, imported.signature, result.caches)
    contents = BundleContents(
        manifest=manifest,
        payload=result.payload,
        source=imported.source_bytes if include_source else None,
        caches=result.caches,
    )
    return Engine(manifest, session, contents=contents)


# --------------------------------------------------------------------------- load


def load(path: str | Path, *, check_platform: bool = True, trust_code: bool = False) -> Engine:
    """Open a bundle: verify checksums, check it was built for this platform, load the payload.

    Engines whose payload runs code when loaded (the PyTorch backend's compiler cache) are
    refused unless ``trust_code``: say so only for engines from builders you trust.
    """
    path = Path(path)
    manifest = read_bundle(path, payload=False).manifest
    backend = _backend_for(manifest, path)
    options = BuildOptions.from_dict(manifest.build_options)
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


def validation_batches(
    signature: Signature,
    data: str | Path | None = None,
    batch: int | None = None,
    batches: int = 3,
    seed: int = 0,
    preprocess: PreprocessSpec | None = None,
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Input batches from data (a file or folder), or generated from the signature with a seed."""
    fixed = signature.fixed_batch()
    if data is not None:
        feeds = load_dataset(data, signature, preprocess)
        size = batch or fixed or 8
        return split_samples(feeds, signature, size), f"data '{Path(data).name}'"
    size = batch or fixed or 2
    try:
        generated = [random_inputs(signature.inputs, batch=size, seed=seed + i) for i in range(batches)]
    except TypeError as exc:
        raise ValidationDataError(f"{exc}; give real inputs with --data") from None
    return generated, f"random (seed {seed}, {batches} batches of {size})"


def validate_engine(
    engine: Engine,
    reference: ReferenceRunner,
    batches: list[dict[str, np.ndarray]],
    inputs_label: str,
    *,
    reference_label: str,
    tolerance: Tolerance | None = None,
) -> ValidationReport:
    return run_validation(
        engine_run=engine.infer,
        reference_run=reference,
        batches=batches,
        tolerance=tolerance or tolerance_for(engine.precision),
        precision=engine.precision,
        reference_label=reference_label,
        inputs_label=inputs_label,
        output_names=engine.signature.output_names,
    )


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
        _check_same_inputs(engine, reference)
        spec = PreprocessSpec.from_dict(engine.manifest.preprocess) if engine.manifest.preprocess else None
        if data is not None:
            feeds, inputs_label = validation_batches(engine.signature, data, batch, batches, seed, spec)
            real = True
        else:
            feeds, inputs_label, real = _default_validation_batches(engine, batch, batches, seed)
        report = validate_engine(engine, reference, feeds, inputs_label, reference_label=label, tolerance=tolerance)
        if engine.precision == "int8" and not real:
            report.inconclusive = (
                f"inputs {inputs_label.split(' (')[0]} cannot judge an int8 engine: its ranges were calibrated on real "
                "data, so differences on other inputs say nothing; validate with --data DATA (real inputs)"
            )
    _attach_report(engine, "validation", report)
    if store and engine.path is not None:
        _store_report(engine.path, "validation", report)
    return report


def _check_same_inputs(engine: Engine, reference: ReferenceRunner) -> None:
    """Refuse before running when the reference takes other inputs than the engine (a wrong --against)."""
    names = getattr(reference, "input_names", None)
    if names is None:
        return
    missing = [n for n in engine.signature.input_names if n not in names]
    if missing:
        raise ValidationDataError(
            f"the engine's inputs ({', '.join(engine.signature.input_names)}) and the reference's inputs "
            f"({', '.join(names)}) do not match: validate against the model the engine was built from"
        )


def _default_validation_batches(
    engine: Engine, batch: int | None, batches: int, seed: int
) -> tuple[list[dict[str, np.ndarray]], str, bool]:
    """Without --data: the samples the bundle carries, else the build's input plan, else random; and whether real."""
    where = f"engine '{engine.path.name if engine.path else 'in memory'}'"
    found = stored_validation_batches(engine.signature, engine.stored_samples(), engine.manifest.checks.get("samples"),
                                      where, batch=batch, batches=batches, seed=seed)
    if found is not None:
        return found
    generated, label = validation_batches(engine.signature, None, batch, batches, seed)
    return generated, label, False


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
    target = tmp / Path(contents.manifest.source_name).name
    target.write_bytes(contents.source)
    return _materialize_source(target)


def _attach_report(engine: Engine, name: str, report: ValidationReport) -> None:
    engine.add_report(name, report.to_json(), _check_summary(report))


def _check_summary(report: ValidationReport) -> dict[str, Any]:
    summary = {"passed": report.passed, "summary": report.summary(), "at": report.created_at}
    if report.inconclusive:
        summary["inconclusive"] = report.inconclusive
    return summary


def _store_report(path: Path, name: str, report: ValidationReport) -> None:
    """Rewrite a saved bundle with the latest report (atomically, checksums renewed)."""
    contents = read_bundle(path, payload=True, source=True, reports=True, caches=True, samples=True)
    contents.reports[name] = report.to_json()
    contents.manifest.checks[name] = _check_summary(report)
    write_bundle(path, contents)


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
    """``batch`` rows of the data (cycled when it has fewer); else inputs the model runs on, from the
    build's input plan where it has one; else seeded random inputs."""
    if data is None:
        plan = plan_from_record(engine.manifest.checks.get("samples"))
        if plan is not None:
            return plan.generate(seed=seed, batch=batch)
        return random_inputs(engine.signature.inputs, batch=batch, seed=seed)
    spec = PreprocessSpec.from_dict(engine.manifest.preprocess) if engine.manifest.preprocess else None
    feeds = load_dataset(data, engine.signature, spec)
    return {name: np.take(value, np.arange(batch) % len(value), axis=0) for name, value in feeds.items()}


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
