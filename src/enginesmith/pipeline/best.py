"""The build stage's ``best`` variant: every precision the backend has, validated, timed; the fastest within budget kept."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ..bench import measure
from ..build_inputs import BuildInputs
from ..errors import BuildError, EnginesmithError, ValidationDataError
from ..runtime.engine import Engine
from ..signature import Signature, random_inputs
from ..validate import failures_text, tolerance_for
from ..validate.engine_checks import attach_report
from .engines import build_engine, check_engine
from .state import BuildState



def build_best(state: BuildState) -> Engine:
    """Build each precision the backend supports; keep the fastest within the accuracy budget.

    Every candidate is checked on the held-out data (else the build's inputs) against the
    source, so the verify stage has nothing left to do. The table of candidates goes into
    ``checks["precision_candidates"]``.
    """
    backend, options, data, budget = state.backend, state.options, state.data, state.budget
    candidates: list[dict[str, Any]] = []
    kept: Engine | None = None
    kept_p50 = float("inf")
    for precision in backend.precisions(options):
        row: dict[str, Any] = {"precision": precision}
        candidates.append(row)
        if precision == "int8" and data.calibration is None:
            row.update(kept=False, reason="no calibration data (give --calib DATA)")
            continue
        try:
            engine = build_engine(state, replace(options, precision=precision),
                                  data.calibration if precision == "int8" else None)
        except EnginesmithError as exc:
            row.update(kept=False, reason=f"build failed: {exc}")
            continue
        tolerance = budget.tolerance(precision) if budget else tolerance_for(precision)
        report = check_engine(state, engine, tolerance)
        feeds = timing_feeds(engine.signature, state.inputs)
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
            attach_report(kept, "build_verification", report)
        elif row["reason"] == "within budget":
            row["reason"] = "within budget, but slower"
    if kept is None:
        table = "; ".join(f"{r['precision']}: {r['reason']}" for r in candidates)
        raise BuildError(f"no precision stays within the accuracy budget ({table})")
    kept.manifest.checks["precision_candidates"] = candidates
    return kept


def timing_feeds(signature: Signature, inputs: BuildInputs | None) -> dict[str, np.ndarray]:
    """One input to time candidates with: a build sample, else generated from the plan, else random."""
    if inputs is not None and inputs.plan is not None:
        return inputs.plan.generate(seed=0, batch=1)
    feeds = inputs.check_feeds(limit=1) if inputs is not None else None
    return feeds if feeds is not None else random_inputs(signature.inputs, batch=1, seed=0)
