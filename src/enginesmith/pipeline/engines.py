"""Engines made inside a build: the backend's result as an :class:`Engine`, and its check against the source."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import __version__
from ..backends import Backend, BuildOptions, Calibration
from ..bundle import BundleContents
from ..importers import ImportOptions, ReferenceRunner, reference_runner
from ..manifest import Manifest
from ..runtime.engine import Engine
from ..validate import Tolerance, ValidationReport
from ..validate.engine_checks import validate_engine, validation_batches
from .state import BuildState


def build_engine(state: BuildState, options: BuildOptions, calibration: Calibration | None,
                 backend: Backend | None = None) -> Engine:
    """``backend``'s build (default: the state's) of the imported model, as an engine with its manifest and bundle contents."""
    backend, imported = backend or state.backend, state.imported
    result = backend.build(imported.model, imported.signature, options, state.progress, calibration)
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
        build_options={**resolved.to_dict(), "import_options": state.import_options.to_dict(),
                       "requested": options.to_dict(),
                       **({"source_precision": imported.source_precision} if imported.source_precision != "fp32" else {})},
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
        source=imported.source_bytes if state.request.include_source else None,
        caches=result.caches,
    )
    return Engine(manifest, session, contents=contents)


def check_engine(state: BuildState, engine: Engine, tolerance: Tolerance | None) -> ValidationReport:
    """The engine against the source, on the best inputs the build has."""
    inputs, data = state.inputs, state.data
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
    return validate_engine(engine, state.reference, batches, label,
                           reference_label=f"{state.imported.kind} source (its own framework)", tolerance=tolerance)


def lazy_reference(source: Any, options: ImportOptions, kind: str) -> ReferenceRunner:
    """The source run by its own framework, loaded at the first call (after the first engine is built)."""
    runner: list[ReferenceRunner] = []

    def run(feeds: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        if not runner:
            runner.append(reference_runner(source, options, kind=kind))
        return runner[0](feeds)

    return run
