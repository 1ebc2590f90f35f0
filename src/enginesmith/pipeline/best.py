"""Candidate engines inside one build: each built, checked against the source, timed, one kept.

A candidate is a (backend, precision) pair. ``--precision best`` tries every precision of one
backend (:func:`build_best`, table ``checks["precision_candidates"]``); ``--backend auto`` tries
several backends, each at the asked precision or, with ``best``, at every precision it offers
(``auto.py``, table ``checks["backend_candidates"]``). Both go through :func:`try_candidates`:
every candidate is built and checked on the held-out data (else the build's inputs) against the
source, so the verify stage has nothing left to do; those that pass are timed together, in
interleaved rounds, and a :class:`Strategy` picks one.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..backends import Backend
from ..build_inputs import BuildInputs
from ..errors import BuildError, EnginesmithError, ValidationDataError, VerificationFailedError
from ..runtime.engine import Engine
from ..signature import Signature, random_inputs
from ..validate import ValidationReport, failures_text
from ..validate.engine_checks import attach_report
from .engines import build_engine, check_engine
from .map_budget import map_check
from .selection import THROUGHPUT_BATCH, Strategy, paired_with_baseline, select, timing_noise, undecided
from .state import BuildState

# label -> a function running the engine on feeds; the timer returns label -> p50 in milliseconds, or
# label -> the p50 of each timing round (ms), from which the timing's noise is read too.
Runner = Callable[[Mapping[str, np.ndarray]], Any]
Timer = Callable[[Mapping[str, Runner], dict[str, np.ndarray], int], Mapping[str, float | Sequence[float]]]

@dataclass
class Candidate:
    """One (backend, precision) pair: its table row, and its engine while it is still in the running."""

    backend: Backend
    precision: str
    threads: int | None = None  # None: the build's own setting
    row: dict[str, Any] = field(default_factory=dict)
    engine: Engine | None = None
    report: ValidationReport | None = None

    @property
    def label(self) -> str:
        return f"{self.backend.name} {self.precision}" + (f" {self.threads} thread(s)" if self.threads else "")


# The candidates' timing: interleaved rounds, each candidate run for about BLOCK_S per round (at
# least MIN_BLOCK_RUNS calls, at most MAX_BLOCK_RUNS), after SETTLE_S of quiet and one untimed call.
# Ten rounds: the choice compares candidates round by round (selection.clearly_faster), and with six rounds
# of 30 ms a 6 ms model's OpenVINO engine, 11% faster, came out faster in 4 rounds one build and 6 the next.
ROUNDS, BLOCK_S, MIN_BLOCK_RUNS, MAX_BLOCK_RUNS, SETTLE_S = 10, 0.05, 5, 200, 0.02
# A close call (selection.undecided) is timed again with blocks four times as long, and decided by that timing
# alone: in benchmarks/cpu_backends.py's corpus two models' builds kept the engine that their 0.2 s blocks then
# measured 1.12x and 1.22x slower (a 12 ms OCR detector, a 13 ms pitch tracker: five calls a block).
SECOND_LOOK_BLOCK_S, SECOND_LOOK_MAX_RUNS = 0.2, 800


def measure_p50(targets: Mapping[str, Runner], feeds: dict[str, np.ndarray], batch: int) -> dict[str, float]:
    """p50 of each target on ``feeds`` (ms): the median of its per-round medians (:func:`measure_rounds`)."""
    return {label: float(np.median(values)) for label, values in measure_rounds(targets, feeds, batch).items()}


def measure_rounds(targets: Mapping[str, Runner], feeds: dict[str, np.ndarray], batch: int, block_s: float = BLOCK_S,
                   max_runs: int = MAX_BLOCK_RUNS) -> dict[str, list[float]]:
    """Each target's median latency on ``feeds`` (ms) in each of ``ROUNDS`` interleaved rounds.

    Short rounds: on a shared CPU the load changes within seconds, so every candidate gets a share
    of each moment. The order rotates from round to round, and each block starts after a pause and
    one untimed call: ONNX Runtime's worker threads keep spinning after a call, and on a 2-core
    machine they slowed the first calls of whichever candidate came next, with a fixed order always
    the same one's (a plain session, as users time it, shares its cores with no other runtime).
    Runs per block follow each candidate's speed, so a model of a tenth of a millisecond is timed
    over hundreds of calls rather than a burst of a few, and a slow one still over a few per round.
    """
    labels = list(targets)
    runs = {}
    for label in labels:
        fn = targets[label]
        for _ in range(2):  # warm-up: first calls allocate and pick kernels
            fn(feeds)
        start = time.perf_counter()
        fn(feeds)
        runs[label] = int(min(max_runs, max(MIN_BLOCK_RUNS, block_s / max(time.perf_counter() - start, 1e-7))))
    round_p50: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(ROUNDS):
        shift = r % len(labels)
        for label in labels[shift:] + labels[:shift]:
            fn = targets[label]
            time.sleep(SETTLE_S)
            fn(feeds)
            times = []
            for _ in range(runs[label]):
                start = time.perf_counter()
                fn(feeds)
                times.append(time.perf_counter() - start)
            round_p50[label].append(float(np.median(times)) * 1e3)
    return round_p50


def try_candidates(state: BuildState, candidates: list[Candidate], strategy: Strategy,
                   timer: Timer | None = None, chosen_key: str = "kept") -> tuple[Engine, list[dict[str, Any]]]:
    """Build, check and time ``candidates``; the one ``strategy`` picks among those that pass, and the table.

    Each row says why its candidate was or was not chosen (under ``chosen_key``: yes/no), and the
    seconds its build, check and share of the timing took. None passing raises a
    :class:`BuildError` listing every candidate's reason.
    """
    passing = [c for c in candidates if _build_and_check(state, c)]
    # One engine left has nothing to be compared with: it is not timed, unless a latency budget must be checked.
    timed = len(passing) > 1 or (len(passing) == 1 and strategy.kind == "throughput-within")
    if timed:
        _time(state, passing, strategy, timer or measure_rounds)
        # The first candidate is the default engine (highest-priority backend, fp32): another one
        # replaces it only when faster beyond the timing's noise.
        chosen = select([c.row for c in passing], strategy, baseline=0 if passing[0] is candidates[0] else None)
    else:
        chosen = 0 if passing else None
    for candidate in candidates:
        row = candidate.row
        row[chosen_key] = candidate is (passing[chosen] if chosen is not None else None)
        if row[chosen_key]:
            row["reason"] = strategy.describe() if timed else "the only one that passed"
            if timed and strategy.kind == "latency" and any(c.row["p50_ms"] < row["p50_ms"] for c in passing):
                row["reason"] += " within the timing noise"
            if candidate.report is not None:
                attach_report(candidate.engine, "build_verification", candidate.report)
        elif candidate in passing:
            row["reason"] = _not_chosen_reason(row, strategy, passing[chosen].row if chosen is not None else None)
        if row.get("verified") is False:
            row["reason"] += "; not verified"
    rows = [c.row for c in candidates]
    if chosen is None:
        table = "; ".join(f"{c.label}: {c.row['reason']}" for c in candidates)
        if passing:
            raise BuildError(f"no candidate has p50 <= {strategy.latency_budget_ms:g} ms at batch 1 ({table}); "
                             "raise the budget or select by latency")
        if any("worst_rel_l2" in c.row for c in candidates):
            raise VerificationFailedError(f"no candidate passed verification against the source ({table})")
        raise BuildError(f"no candidate could be built ({table})")
    return passing[chosen].engine, rows


def _not_chosen_reason(row: dict[str, Any], strategy: Strategy, chosen: dict[str, Any] | None) -> str:
    if strategy.kind == "throughput-within" and row["p50_ms"] > strategy.latency_budget_ms:
        return f"p50 over {strategy.latency_budget_ms:g} ms"
    if strategy.kind == "latency" and chosen is not None and row["p50_ms"] < chosen["p50_ms"]:
        if "vs_baseline" in row and "vs_baseline" not in chosen:  # compared round by round with the default
            faster, rounds = row["faster_rounds"]
            return (f"faster by {1 - row['vs_baseline']:.1%} (median of {rounds} rounds, faster in {faster}), within "
                    f"the timing noise ({row['vs_baseline_noise']:.1%}): the default engine is kept")
        noise = max(row.get("p50_noise", 0.0), chosen.get("p50_noise", 0.0))
        return (f"faster by {1 - row['p50_ms'] / chosen['p50_ms']:.1%}, within the timing noise ({noise:.1%}): "
                "the default engine is kept")
    return "slower" if strategy.kind == "latency" else "lower throughput"


def _build_and_check(state: BuildState, candidate: Candidate) -> bool:
    """Build ``candidate`` and check it against the source; its row says what happened."""
    budget, data, precision = state.budget, state.data, candidate.precision
    row = candidate.row
    row.update(backend=candidate.backend.name, precision=precision)
    options = replace(state.options, precision=precision)
    if candidate.threads:
        row["threads"] = candidate.threads
        options = replace(options, threads=candidate.threads)
    if precision == "int8" and data.calibration is None:
        row.update(reason="no calibration data (give --calib DATA)")
        return False
    started = time.perf_counter()
    try:
        engine = build_engine(state, options, data.calibration if precision == "int8" else None,
                              backend=candidate.backend)
    except EnginesmithError as exc:
        row.update(reason=f"build failed: {exc}", build_s=round(time.perf_counter() - started, 3))
        return False
    row["build_s"] = round(time.perf_counter() - started, 3)
    if candidate.threads:
        # A rebuild starts from what was asked, not from auto's pick: the thread count is chosen again there.
        engine.manifest.build_options["requested"]["threads"] = state.options.threads
    if engine.precision != precision:
        # The backend kept another precision (fp16 on a CPU provider): that engine is another candidate's.
        row.update(reason=f"the backend built {engine.precision} instead (see the build log)")
        return False
    started = time.perf_counter()
    if not state.request.verify and state.auto is not None:
        # auto without verification (--no-verify): built engines compete on speed alone; the row says so.
        row.update(verified=False)
        candidate.engine = engine
        return True
    # None: the engine's precision's default tolerance, as the verify stage uses.
    tolerance = state.request.tolerance or (budget.tolerance(precision) if budget else None)
    report = check_engine(state, engine, tolerance)
    row["verify_s"] = round(time.perf_counter() - started, 3)
    row.update(
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
        row.update(reason="over the accuracy budget: " + failures_text(report))
        return False
    if state.coco is not None:
        record = map_check(state, engine)
        engine.manifest.checks["map_budget"] = record
        row.update(source_map=record["source"], engine_map=record["engine"], map_drop_points=record["drop_points"],
                   verify_s=round(time.perf_counter() - started, 3))
        if not record["passed"]:
            row.update(reason=f"over the accuracy budget: {record['drop_points']:.2f} points of {record['metric']} "
                              f"lost > {record['budget_points']:g}")
            return False
    candidate.engine, candidate.report = engine, report
    return True


def _time(state: BuildState, passing: list[Candidate], strategy: Strategy, timer: Timer) -> None:
    """p50 at batch 1 for every passing candidate (and throughput where ``strategy`` needs it), interleaved."""
    started = time.perf_counter()
    signature = passing[0].engine.signature
    feeds = timing_feeds(signature, state.inputs)
    targets = {c.label: c.engine.infer for c in passing}
    timings = timer(targets, feeds, 1)
    _record_timings(passing, timings)
    close = [c for c in passing[1:] if undecided(c.row)]
    if close and strategy.kind == "latency":
        again = [passing[0], *close]
        second = timer if timer is not measure_rounds else functools.partial(
            measure_rounds, block_s=SECOND_LOOK_BLOCK_S, max_runs=SECOND_LOOK_MAX_RUNS)
        for c in close:
            c.row["first_look"] = {k: c.row[k] for k in ("vs_baseline", "vs_baseline_noise", "faster_rounds")}
        _record_timings(again, second({c.label: targets[c.label] for c in again}, feeds, 1))
    batch = throughput_batch(signature)
    if strategy.needs_throughput and batch > 1:
        batched = {name: np.repeat(value, batch, axis=0) for name, value in feeds.items()}
        at_batch = timer(targets, batched, batch)
        for c in passing:
            c.row.update(throughput=batch * 1000.0 / _p50_and_noise(at_batch[c.label])[0], throughput_batch=batch)
    share = round((time.perf_counter() - started) / len(passing), 3)
    for c in passing:
        c.row["time_s"] = share


def _record_timings(candidates: list[Candidate], timings: Mapping[str, float | Sequence[float]]) -> None:
    """p50 (and noise) into each row; per-round timings also compared round by round with the first candidate's."""
    first = timings[candidates[0].label]
    for c in candidates:
        p50, noise = _p50_and_noise(timings[c.label])
        c.row.update(p50_ms=p50, throughput=1000.0 / p50, throughput_batch=1)
        if noise is not None:
            c.row["p50_noise"] = noise
        mine = timings[c.label]
        if c is not candidates[0] and not isinstance(mine, (int, float)) and not isinstance(first, (int, float)) \
                and len(mine) == len(first):
            c.row.update(paired_with_baseline(mine, first))  # the same rounds: compared pairwise


def _p50_and_noise(timing: float | Sequence[float]) -> tuple[float, float | None]:
    """A timer's value for one candidate: a p50 (noise unknown), or per-round p50s."""
    if isinstance(timing, (int, float)):
        return float(timing), None
    return float(np.median(timing)), timing_noise(timing)


def throughput_batch(signature: Signature) -> int:
    """:data:`THROUGHPUT_BATCH` where every input's first axis is free, else 1 (the batch is fixed)."""
    free = all(spec.shape and not isinstance(spec.shape[0], int) for spec in signature.inputs)
    return THROUGHPUT_BATCH if free else 1


def build_best(state: BuildState, timer: Timer | None = None) -> Engine:
    """Build each precision the backend supports; keep the fastest within the accuracy budget.

    The table of candidates goes into ``checks["precision_candidates"]``.
    """
    candidates = [Candidate(state.backend, p) for p in state.backend.precisions(state.options)]
    for c in candidates:
        c.row["precision"] = c.precision
    try:
        engine, rows = try_candidates(state, candidates, Strategy(), timer)
    except BuildError as exc:
        if not str(exc).startswith("no candidate"):
            raise
        table = "; ".join(f"{c.precision}: {c.row['reason']}" for c in candidates)
        raise BuildError(f"no precision stays within the accuracy budget ({table})") from None
    for row in rows:
        row.pop("backend", None)
        if row["kept"] and "p50_ms" in row:
            row["reason"] = "fastest within the budget"
        elif row["reason"] == "slower":
            row["reason"] = "within budget, but slower"
    engine.manifest.checks["precision_candidates"] = rows
    return engine


def timing_feeds(signature: Signature, inputs: BuildInputs | None) -> dict[str, np.ndarray]:
    """One input to time candidates with: a build sample, else generated from the plan, else random."""
    if inputs is not None and inputs.plan is not None:
        return inputs.plan.generate(seed=0, batch=1)
    feeds = inputs.check_feeds(limit=1) if inputs is not None else None
    return feeds if feeds is not None else random_inputs(signature.inputs, batch=1, seed=0)
