"""An engine checked against a reference: the batches it runs on, the report, and where the report is kept.

Used by ``build``'s verify stage and by :func:`enginesmith.validate`. Inputs come, in order of
preference, from data given, the samples a bundle carries, the build's input plan, and last
seeded random inputs; the report's ``inputs`` says which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..build_inputs import split_samples, stored_validation_batches
from ..bundle import read_bundle, write_bundle
from ..errors import ValidationDataError
from ..runtime.engine import Engine
from ..runtime.preprocess import PreprocessSpec
from ..signature import Signature, random_inputs
from . import Tolerance, ValidationReport, judged_precision, run_validation, tolerance_for
from .data import load_dataset

Batches = list[dict[str, np.ndarray]]
ReferenceRunner = Any  # callable(feeds) -> outputs, with ``input_names`` where the runner can tell them


def validation_batches(
    signature: Signature,
    data: str | Path | None = None,
    batch: int | None = None,
    batches: int = 3,
    seed: int = 0,
    preprocess: PreprocessSpec | None = None,
) -> tuple[Batches, str]:
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


def default_validation_batches(engine: Engine, batch: int | None, batches: int, seed: int) -> tuple[Batches, str, bool]:
    """Without data: the samples the bundle carries, else the build's input plan, else random; and whether real."""
    where = f"engine '{engine.path.name if engine.path else 'in memory'}'"
    found = stored_validation_batches(engine.signature, engine.stored_samples(), engine.manifest.checks.get("samples"),
                                      where, batch=batch, batches=batches, seed=seed)
    if found is not None:
        return found
    generated, label = validation_batches(engine.signature, None, batch, batches, seed)
    return generated, label, False


def engine_tolerance(engine: Engine, **overrides: float | None) -> Tolerance:
    """The default tolerance for ``engine``: its precision's, or its source's where the source is quantized."""
    source = engine.manifest.build_options.get("source_precision")
    return tolerance_for(judged_precision(engine.precision, source), **overrides)


def validate_engine(
    engine: Engine,
    reference: ReferenceRunner,
    batches: Batches,
    inputs_label: str,
    *,
    reference_label: str,
    tolerance: Tolerance | None = None,
) -> ValidationReport:
    """The engine and the reference run on the same batches; ``tolerance`` defaults to :func:`engine_tolerance`."""
    return run_validation(
        engine_run=engine.infer,
        reference_run=reference,
        batches=batches,
        tolerance=tolerance or engine_tolerance(engine),
        # The precision that judged it: a quantized source's where that is looser than the engine's own.
        precision=judged_precision(engine.precision, engine.manifest.build_options.get("source_precision")),
        reference_label=reference_label,
        inputs_label=inputs_label,
        output_names=engine.signature.output_names,
    )


def check_same_inputs(engine: Engine, reference: ReferenceRunner) -> None:
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


def check_summary(report: ValidationReport) -> dict[str, Any]:
    """The manifest's record of a report (``checks[name]``)."""
    summary: dict[str, Any] = {"passed": report.passed, "summary": report.summary(), "at": report.created_at}
    if report.inconclusive:
        summary["inconclusive"] = report.inconclusive
    return summary


def attach_report(engine: Engine, name: str, report: ValidationReport) -> None:
    """Record the report in the engine's manifest (and, before it is saved, in its bundle contents)."""
    engine.add_report(name, report.to_json(), check_summary(report))


def store_report(path: Path, name: str, report: ValidationReport) -> None:
    """Rewrite a saved bundle with the latest report (atomically, checksums renewed)."""
    contents = read_bundle(path, payload=True, source=True, reports=True, caches=True, samples=True)
    contents.reports[name] = report.to_json()
    contents.manifest.checks[name] = check_summary(report)
    write_bundle(path, contents)

