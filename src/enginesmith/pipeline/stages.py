"""The build as named stages: import, check, inputs, passes, build, verify, package.

Each stage is a small function of :class:`BuildState` that calls the module owning the job
(``importers``, ``graph.compat``, ``build_inputs``, ``graph.passes``, the backend,
``validate``, the bundle) and leaves its result in the state for the next one.
:func:`run_build` runs them through :func:`~.runner.run_stages`, so a failure names its
stage, and records the seconds each took in ``checks["stages"]``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..backends.base import ProgressCallback
from ..build_inputs import StoredSamples, resolve_build_inputs, samples_to_store
from ..errors import BuildError, EnginesmithError, VerificationFailedError
from ..host import usable_cores
from ..importers import ImportOptions, import_model
from ..precision_data import prepare_precision_data
from ..runtime.engine import Engine
from ..validate import failures_text
from ..validate.engine_checks import attach_report
from . import request as req
from .auto import build_auto, candidate_backends, skipped_row
from .best import Timer, build_best
from .engines import build_engine, check_engine, lazy_reference
from .map_budget import check_map_budget, coco_set
from .request import BuildRequest
from .runner import Stage, run_stages
from .state import BuildState

# Passes that exist because the user asked for them (failing one must stop the build, not be skipped), and the
# option that asked (CLI flag, import option), named in the error.
REQUESTED_PASSES = {"fix_shapes": "--input (input_shapes)", "make_dynamic": "--dynamic (dynamic_axes)",
                    "convert_opset": "--opset (opset)"}


# --------------------------------------------------------------------------- the stages


def import_stage(state: BuildState) -> None:
    """The source (or the source a rebuilt bundle carries), the backend, and the ONNX model with its signature."""
    request = state.request
    source, options = request.source, request.import_options
    if request.rebuilds_bundle:
        state.rebuild = req.read_rebuild(Path(source), state.workdir)
        source = state.rebuild.source
        options = options.over(state.rebuild.import_options) if options is not None else state.rebuild.import_options
    options = options or ImportOptions()
    previous = state.previous
    state.auto = req.auto_selection(request, previous)
    if state.auto is not None:
        state.candidates, state.skipped = candidate_backends(state.auto.candidates)
        backend = state.candidates[0]
    else:
        backend = req.choose_backend(request.backend, previous)
    if options.opset is None:
        options = replace(options, default_opset=backend.converter_opset)
    # An auto-built bundle recorded the options given for every candidate, not one backend's.
    same_backend = previous is not None and (previous.backend == backend.name or
                                             (state.auto is not None and "auto" in previous.build_options))
    state.options = req.build_options(request, previous, same_backend=same_backend, auto=state.auto)
    if builds_from_torch_source(state, backend):
        options = replace(options, onnx_in_background=True)  # only the torch importer reads it
    state.imported = import_model(source, options, kind=previous.source_kind if previous else None)
    state.source, state.import_options, state.backend = source, options, backend
    state.options.previous_caches = req.reusable_caches(state.rebuild.caches if state.rebuild else {}, same_backend)
    # Set here, not with sample_feeds, because the check stage's operator report depends on it too.
    state.options.native_source = state.imported.native
    state.graph = req.graph_settings(request, previous)
    state.preprocess = req.preprocess_spec(request, previous)
    state.budget = req.accuracy_budget(request, previous)
    state.coco = coco_set(state.budget, request.coco_annotations, request.coco_images)


# The torch backend's ``onnx_export`` option: where a torch source's ONNX export runs when the engine is built from the source.
ONNX_EXPORT_CHOICES = ("auto", "alongside", "before")
# ``auto`` runs it alongside from this many usable CPU cores: with two, the child process (its torch import
# included) takes the core Inductor compiles on, and builds/torch_source_build.py measured it slower there.
ALONGSIDE_MIN_CORES = 4


def builds_from_torch_source(state: BuildState, backend) -> bool:
    """Whether the engine is built from a torch source itself with its ONNX conversion running alongside.

    For the PyTorch backend asked for by name (not among ``auto``'s candidates, which build from
    the ONNX), unless its ``source=onnx`` option asks for the converted graph, and as its
    ``onnx_export`` option says: ``alongside``, ``before`` (in the import stage, as other
    backends have it), or ``auto``: alongside where :data:`ALONGSIDE_MIN_CORES` cores are
    usable. The torch importer then converts in a child process (``importers/onnx_job.py``),
    and the stages up to the build work without the ONNX: no operator check (nothing of the
    ONNX is built), inputs probed on the torch source, no graph passes (they rewrite the ONNX
    only). ``package`` joins the conversion.
    """
    options = state.options.backend_options
    if state.auto is not None or backend.name != "torch" or str(options.get("source", "auto")).lower() == "onnx":
        return False
    choice = str(options.get("onnx_export", "auto")).lower()
    if choice not in ONNX_EXPORT_CHOICES:
        raise BuildError(f"onnx_export must be {', '.join(ONNX_EXPORT_CHOICES)}, not {choice!r}")
    return choice == "alongside" or (choice == "auto" and usable_cores() >= ALONGSIDE_MIN_CORES)


def check_stage(state: BuildState) -> None:
    """The model against the backend's operator support; stops with IncompatibleModelError carrying the report."""
    from ..graph.compat import IncompatibleModelError, check_buildable
    from ..graph.passes import build_passes

    if not state.graph.check_compatibility:
        return
    if state.imported.pending_onnx is not None:
        return  # the engine is built from the torch program; the report is made when package joins the ONNX
    specs = build_passes(state.import_options, state.graph.disabled) if state.graph.enabled else []
    names = [spec if isinstance(spec, str) else spec[0] for spec in specs]
    if len(state.candidates) > 1:
        # auto: a backend that cannot build the model leaves the candidates, with its report's summary.
        buildable, reports, first_error = [], [], None
        for backend in state.candidates:
            try:
                reports.append(check_buildable(state.imported.model, backend.name, state.options, passes=names))
                buildable.append(backend)
            except IncompatibleModelError as exc:
                first_error = first_error or exc
                state.skipped.append(skipped_row(backend.name, f"cannot build the model: {exc.report.summary()}"))
        if not buildable:
            raise first_error
        state.candidates, state.backend, report = buildable, buildable[0], reports[0]
    else:
        report = check_buildable(state.imported.model, state.backend.name, state.options, passes=names)
    state.checks["compatibility"] = {"target": report.target_label, "source": report.source,
                                     "counts": report.counts, "summary": report.summary()}


def inputs_stage(state: BuildState) -> None:
    """The inputs the checks run on: given data, a rebuilt bundle's samples, or a plan the source runs on."""
    request, rebuild = state.request, state.rebuild
    stored = None
    if rebuild is not None and rebuild.samples is not None:
        stored = StoredSamples(rebuild.samples, (rebuild.manifest.checks.get("samples") or {}).get("label", "build samples"))
    needed = request.verify or state.graph.enabled

    def resolve(probe=None):
        imported = state.imported
        return resolve_build_inputs(imported.model, imported.signature, state.import_options.input_shapes,
                                    request.data, state.preprocess, stored, needed=needed, strict=request.verify,
                                    run=probe, limits=imported.input_limits)

    if state.imported.pending_onnx is None:
        state.inputs = resolve()
    else:
        # No ONNX yet: the torch source itself says which inputs it takes.
        state.reference = lazy_reference(state.source, state.import_options, state.imported.kind)
        generated = request.data is None and stored is None
        try:
            state.inputs = resolve(state.reference)
        except BuildError:
            if not generated:
                raise  # the source itself fails on the inputs given
            state.inputs = None
        if generated and needed and (state.inputs is None or state.inputs.plan is None):
            # No plan ran on the source without the hints its graph gives: wait for the ONNX and plan as before.
            join_onnx(state, early="no generated inputs ran on the torch source without its ONNX graph's hints")
            state.inputs = resolve()
    state.options.sample_feeds = state.inputs.check_feeds()


def passes_stage(state: BuildState) -> None:
    """The graph passes, each checked on the build's inputs and rolled back if it changes the outputs."""
    from ..graph.passes import build_passes, optimize
    from ..importers.onnx_importer import signature_of

    specs = build_passes(state.import_options, state.graph.disabled) if state.graph.enabled else []
    if not specs:
        return
    imported = state.imported
    if imported.pending_onnx is not None:
        # The passes rewrite the ONNX conversion, which this engine is not built from; the torch
        # export applied the shapes and dynamic axes asked for already.
        imported.log.append("graph passes not run: the engine is built from the torch program, not its ONNX conversion")
        return
    model, summary = optimize(imported.model, specs, progress=state.progress, feeds=state.options.sample_feeds)
    failed = [r for r in summary.rolled_back if r.name in REQUESTED_PASSES]
    if failed:
        asked_by = REQUESTED_PASSES[failed[0].name]
        raise BuildError(f"could not apply {failed[0].name} {failed[0].args}: {failed[0].reason}; "
                         f"build without {asked_by} to keep the model as it is, or ask for other values")
    state.checks["graph_passes"] = summary.to_dict()
    reshaped = any(r.name in ("fix_shapes", "make_dynamic") and r.status == "applied" for r in summary.results)
    signature = signature_of(model) if reshaped else imported.signature
    state.imported = replace(imported, model=model, signature=signature, log=imported.log + summary.lines())


def build_stage(state: BuildState) -> None:
    """Calibration data, then the backend's build; ``best`` builds every precision and keeps the fastest that passes."""
    request, options = state.request, state.options
    rebuild_caches = state.options.previous_caches
    backends = state.candidates or [state.backend]
    state.data = prepare_precision_data(
        state.imported.signature, options, request.calibration_data, request.calibration_random, state.preprocess,
        request.holdout, req.calibration_cache(request.calibration_cache, rebuild_caches),
        budget=state.budget,
        best_tries_int8=any("int8" in backend.precisions(options) for backend in backends),
        stored_int8=any(name in rebuild_caches for backend in backends for name in backend.int8_cache_names),
    )
    # Made at first use, after the first engine is built, so an unbuildable model reports the backend's error.
    state.reference = state.reference or lazy_reference(state.source, state.import_options, state.imported.kind)
    if len(state.candidates) > 1 or state.skipped:
        state.engine = build_auto(state)  # with one candidate left, nothing is timed; the table says why
    elif options.precision == "best":
        state.engine = build_best(state, state.timer)
    else:
        state.engine = build_engine(state, options, state.data.calibration)
    if state.auto is not None:
        # A rebuild elsewhere selects again (request.auto_selection), even with one candidate here.
        state.engine.manifest.build_options["auto"] = state.auto.to_dict()


def verify_stage(state: BuildState) -> None:
    """The engine against the source run by its own framework; a failure stops the build."""
    engine, data, inputs = state.engine, state.data, state.inputs
    if not state.request.verify or {"precision_candidates", "backend_candidates"} & set(engine.manifest.checks):
        return  # not asked for, or ``best`` / ``auto`` verified every candidate while choosing
    budget = state.budget
    if engine.precision == "int8" and not data.holdout and not inputs.real and not state.coco:
        # Random inputs fall outside the calibrated ranges, so comparing on them says nothing.
        engine.manifest.build_log.append(
            f"int8 engine not verified: {data.unverified_reason}; "
            "run 'enginesmith validate ENGINE --data DATA' on real inputs"
        )
        return
    tolerance = state.request.tolerance or (budget.tolerance(engine.precision) if budget else None)
    report = check_engine(state, engine, tolerance)
    attach_report(engine, "build_verification", report)
    if not report.passed:
        raise VerificationFailedError(
            f"the built {engine.precision} engine does not match the source model ({failures_text(report)}); "
            "build without verification to keep it anyway"
        )
    if state.coco is not None:
        check_map_budget(state, engine)


def package_stage(state: BuildState) -> None:
    """The manifest's records (inputs, samples, settings, stage times) and the bundle file, when asked for."""
    started = time.perf_counter()
    engine, inputs, data = state.engine, state.inputs, state.data
    manifest = engine.manifest
    join_onnx(state)
    manifest.build_log.extend(inputs.log)
    raw, record, line = samples_to_store(inputs, data.holdout, data.holdout_label, bool(data.check.get("random")))
    engine.set_samples(raw)
    if record:
        manifest.checks["samples"] = record
    if line:
        manifest.build_log.append(line)
    manifest.checks.update(state.checks)
    manifest.build_options["graph"] = state.graph.to_dict()
    manifest.preprocess = state.preprocess.to_dict() if state.preprocess else None
    manifest.accuracy_budget = state.budget.to_dict() if state.budget else None
    if data.check:
        manifest.checks["calibration"] = data.check
    # The file holds this record, so its own write cannot be in it: "package" is the time up to the write.
    manifest.checks["stages"] = {**state.timings, "package": round(time.perf_counter() - started, 4)}
    if state.request.output is not None:
        engine.save(state.request.output, include_source=state.request.include_source)


def join_onnx(state: BuildState, early: str | None = None) -> None:
    """Wait for the ONNX conversion running alongside the build; record it (and the operator report).

    At the package stage (``early`` None) the engine is built from the torch program and the
    bundle carries that program (``.pt2``), so a failed conversion does not fail the build: the
    log and ``checks["onnx_export"]`` say so, and a build for another backend (which needs the
    ONNX) reports the error again. Joined ``early`` because a stage needs the ONNX after all
    (``early`` says why), a failure stops the build as it would have in the import stage.
    """
    imported = state.imported
    pending = imported.pending_onnx if imported is not None else None
    if pending is None:
        return
    waited = time.perf_counter()
    if state.progress:
        state.progress("waiting for the ONNX export", 0, 1)
    record: dict[str, object] = {"alongside_build": early is None, **({"joined_early": early} if early else {})}
    try:
        state.imported = imported.with_onnx()
        lines = state.imported.log[len(imported.log):]
        record["ok"] = True
    except EnginesmithError as exc:
        pending.cancel()
        if early:
            raise
        state.imported = replace(imported, pending_onnx=None)
        record.update(ok=False, error=str(exc))
        lines = [f"warning: the ONNX export failed ({exc}); the engine is built from the torch program and the bundle "
                 "carries it, but building this model with another backend fails until it converts"]
    record.update(seconds=round(pending.seconds or 0.0, 3), waited_s=round(time.perf_counter() - waited, 3))
    if state.progress:
        state.progress("waiting for the ONNX export", 1, 1)
    state.checks["onnx_export"] = record
    if state.engine is not None:  # before the build, the lines are in the import's log, which the build log starts with
        state.engine.manifest.build_log.extend(lines)
    if record["ok"] and state.graph.check_compatibility:
        check_stage(state)  # the operator report the check stage left for now


def cancel_onnx(state: BuildState) -> None:
    """Stop an ONNX conversion still running alongside a build that ends early (an error, Ctrl-C)."""
    if state.imported is not None and state.imported.pending_onnx is not None:
        state.imported.pending_onnx.cancel()


BUILD_STAGES: tuple[Stage[BuildState], ...] = (
    Stage("import", import_stage),
    Stage("check", check_stage),
    Stage("inputs", inputs_stage),
    Stage("passes", passes_stage),
    Stage("build", build_stage),
    Stage("verify", verify_stage),
    Stage("package", package_stage),
)


def run_build(request: BuildRequest, progress: ProgressCallback | None = None, timer: Timer | None = None) -> Engine:
    """Run :data:`BUILD_STAGES` for ``request``; the engine is written to ``request.output`` when given.

    ``timer`` times candidate engines (``best``, ``auto``); the default measures them here.
    """
    with tempfile.TemporaryDirectory(prefix="enginesmith-build-") as tmp:
        state = BuildState(request, Path(tmp), progress, timer)
        try:
            run_stages(BUILD_STAGES, state, state.timings, progress)
        finally:
            cancel_onnx(state)
    return state.engine
