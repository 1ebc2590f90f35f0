"""The public Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import __version__
from .backends import Backend, BuildOptions, get_backend, pick_backend
from .backends.base import PRECISIONS, ProgressCallback
from .bench import BenchReport, machine_facts, measure
from .bundle import BundleContents, extract_verified_entry, looks_like_bundle, read_bundle, write_bundle
from .errors import BackendUnavailableError, BuildError, BundleError, PlatformMismatchError, ValidationDataError
from .importers import ImportedModel, ImportOptions, ReferenceRunner, import_model, reference_runner
from .manifest import Manifest
from .runtime.engine import Engine
from .signature import Signature, random_inputs
from .validate import Tolerance, ValidationReport, run_validation, tolerance_for
from .validate.data import load_feeds, split_batches

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
) -> Engine:
    """Build an engine for this machine from a model file, an in-memory model, or a bundle.

    Given a bundle, the engine is rebuilt from the source model it carries with
    the options it was built with, unless overridden here. With ``verify`` (the
    default) the new engine is compared with the source model on generated
    inputs and a failed comparison raises :class:`BuildError`.
    """
    rebuilt_from: Manifest | None = None
    with tempfile.TemporaryDirectory(prefix="enginesmith-build-") as tmp:
        if isinstance(source, (str, Path)) and Path(source).is_file() and looks_like_bundle(source):
            source, rebuilt_from, import_options = _source_from_bundle(Path(source), Path(tmp), import_options)
        import_options = import_options or ImportOptions()
        imported = import_model(source, import_options, kind=rebuilt_from.source_kind if rebuilt_from else None)
        options = _build_options(rebuilt_from, precision, threads, backend_options)
        chosen = _choose_backend(backend, rebuilt_from)
        engine = _build_engine(imported, chosen, options, import_options, include_source, progress)
        if verify:
            reference = reference_runner(source, import_options, kind=imported.kind)
            report = validate_engine(engine, reference, reference_label=f"{imported.kind} source (its own framework)",
                                     tolerance=tolerance)
            _attach_report(engine, "build_verification", report)
            if not report.passed:
                failures = "; ".join(f"{o.name}: {', '.join(o.failures)}" for o in report.outputs if not o.passed)
                raise BuildError(
                    f"the built engine does not match the source model ({failures}); "
                    "pass verify=False / --no-verify to keep it anyway"
                )
    if output is not None:
        engine.save(output, include_source=include_source)
    return engine


def _source_from_bundle(
    path: Path, tmp: Path, import_options: ImportOptions | None
) -> tuple[Path, Manifest, ImportOptions]:
    contents = read_bundle(path, payload=False, source=True)
    manifest = contents.manifest
    if contents.source is None:
        raise BundleError(
            f"'{path.name}' does not carry its source model (built with --no-source); "
            "rebuild from the original model file instead"
        )
    target = tmp / Path(manifest.source_name).name
    target.write_bytes(contents.source)
    materialized = _materialize_source(target)
    options = import_options or ImportOptions.from_dict(manifest.build_options.get("import_options", {}))
    return materialized, manifest, options


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
) -> BuildOptions:
    base = BuildOptions.from_dict(previous.build_options) if previous else BuildOptions()
    if precision is not None:
        if precision not in PRECISIONS:
            raise BuildError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")
        base.precision = precision
    if threads is not None:
        base.threads = threads
    if backend_options:
        base.backend_options = {**base.backend_options, **backend_options}
    return base


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
) -> Engine:
    result = backend.build(imported.model, imported.signature, options, progress)
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
        build_options={**resolved.to_dict(), "import_options": import_options.to_dict()},
        payload_name=result.payload_name,
        fingerprint=backend.fingerprint(resolved),
        fingerprint_must_match=backend.must_match(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        checks={"build": result.details},
        build_log=imported.log + result.log,
    )
    session = backend.load(result.payload, resolved, imported.signature)
    contents = BundleContents(
        manifest=manifest,
        payload=result.payload,
        source=imported.source_bytes if include_source else None,
    )
    return Engine(manifest, session, contents=contents)


# --------------------------------------------------------------------------- load


def load(path: str | Path, *, check_platform: bool = True) -> Engine:
    """Open a bundle: verify checksums, check it was built for this platform, load the payload."""
    path = Path(path)
    manifest = read_bundle(path, payload=False).manifest
    backend = _backend_for(manifest, path)
    options = BuildOptions.from_dict(manifest.build_options)
    if check_platform:
        check_platform_compatible(manifest, backend, path)
    with tempfile.TemporaryDirectory(prefix="enginesmith-load-") as tmp:
        payload = extract_verified_entry(path, manifest, manifest.payload_entry, Path(tmp) / manifest.payload_name)
        session = backend.load(payload, options, manifest.signature)
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


# --------------------------------------------------------------------------- validate


def validation_batches(
    signature: Signature,
    data: str | Path | None = None,
    batch: int | None = None,
    batches: int = 3,
    seed: int = 0,
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Input batches from a data file, or generated from the signature with a seed."""
    fixed = signature.fixed_batch()
    if data is not None:
        feeds = load_feeds(data, signature)
        size = batch or fixed or 8
        return list(split_batches(feeds, size)), f"data file '{Path(data).name}'"
    size = batch or fixed or 2
    try:
        generated = [random_inputs(signature.inputs, batch=size, seed=seed + i) for i in range(batches)]
    except TypeError as exc:
        raise ValidationDataError(f"{exc}; give real inputs with --data") from None
    return generated, f"random (seed {seed}, {batches} batches of {size})"


def validate_engine(
    engine: Engine,
    reference: ReferenceRunner,
    *,
    reference_label: str,
    data: str | Path | None = None,
    batch: int | None = None,
    batches: int = 3,
    seed: int = 0,
    tolerance: Tolerance | None = None,
) -> ValidationReport:
    feeds, inputs_label = validation_batches(engine.signature, data, batch, batches, seed)
    return run_validation(
        engine_run=engine.infer,
        reference_run=reference,
        batches=feeds,
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
) -> ValidationReport:
    """Compare an engine with a reference model (by default the source the bundle carries).

    With ``store`` and an engine on disk, the report is written into the bundle.
    """
    if not isinstance(engine, Engine):
        engine = load(engine)
    with tempfile.TemporaryDirectory(prefix="enginesmith-validate-") as tmp:
        if against is None:
            against, label = _embedded_source(engine, Path(tmp)), "embedded source"
        else:
            label = Path(against).name if isinstance(against, (str, Path)) else type(against).__name__
        options = import_options or ImportOptions.from_dict(engine.manifest.build_options.get("import_options", {}))
        reference = reference_runner(against, options)
        report = validate_engine(engine, reference, reference_label=label, data=data, batch=batch,
                                 batches=batches, seed=seed, tolerance=tolerance)
    _attach_report(engine, "validation", report)
    if store and engine.path is not None:
        _store_report(engine.path, "validation", report)
    return report


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
    return {"passed": report.passed, "summary": report.summary(), "at": report.created_at}


def _store_report(path: Path, name: str, report: ValidationReport) -> None:
    """Rewrite a saved bundle with the latest report (atomically, checksums renewed)."""
    contents = read_bundle(path, payload=True, source=True, reports=True)
    contents.reports[name] = report.to_json()
    contents.manifest.checks[name] = _check_summary(report)
    write_bundle(path, contents)


# --------------------------------------------------------------------------- bench


def bench(
    engine: Engine | str | Path,
    *,
    batches: Sequence[int] = (1,),
    vs: SourceLike | None = None,
    runs: int | None = 50,
    duration_s: float | None = None,
    warmup: int = 5,
    seed: int = 0,
    import_options: ImportOptions | None = None,
    baseline: Callable[[dict[str, np.ndarray]], Any] | None = None,
    baseline_label: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> BenchReport:
    """Latency and throughput per batch size, optionally against the source run by hand."""
    if not isinstance(engine, Engine):
        engine = load(engine)
    targets: dict[str, Callable] = {"engine": engine.infer}
    label = None
    if vs is not None:
        options = import_options or ImportOptions.from_dict(engine.manifest.build_options.get("import_options", {}))
        baseline = reference_runner(vs, options)
        baseline_label = baseline_label or (Path(vs).name if isinstance(vs, (str, Path)) else type(vs).__name__)
    if baseline is not None:
        label = baseline_label or "baseline"
        targets[label] = baseline
    results = []
    for batch in batches:
        feeds = random_inputs(engine.signature.inputs, batch=batch, seed=seed)
        results += measure(targets, feeds, batch, warmup=warmup, runs=runs, duration_s=duration_s, progress=progress)
    machine = {**machine_facts(), "backend": engine.backend, "precision": engine.precision}
    return BenchReport(results=results, baseline=label, machine=machine)


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
