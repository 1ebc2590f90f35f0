"""``--backend auto``: the fastest verified engine among the backends installed here.

The candidates are the backends that build in seconds (:data:`FAST_CANDIDATES`) plus the one
``auto_priority`` ranks first, where each is available; ``--candidates`` names them instead
(the torch backend's CPU build, an Inductor compile, takes minutes, so it is tried only when
named). Each is built at the asked precision, or with ``best`` at every precision it offers,
checked against the source and timed (:func:`~.best.try_candidates`); the selection strategy
keeps one. With one candidate available nothing is timed: the build is the plain one.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

from ..backends import Backend, get_backend, pick_backend
from ..errors import BackendUnavailableError, BuildError
from ..host import usable_cores
from ..runtime.engine import Engine
from .best import Candidate, try_candidates
from .state import BuildState

# Backends whose build takes seconds on a CPU; others join the candidates only when named.
FAST_CANDIDATES = ("onnxruntime", "openvino")


def candidate_backends(names: Sequence[str] | None) -> tuple[list[Backend], list[dict[str, Any]]]:
    """The backends ``auto`` builds here, highest ``auto_priority`` first, and table rows for named ones that are not here.

    Unnamed (the default) backends that are not available are left out silently; none at all
    raises :class:`BackendUnavailableError` with each one's reason.
    """
    named = names is not None
    if names is None:
        names = [pick_backend("auto").name, *FAST_CANDIDATES]
    backends: list[Backend] = []
    skipped: list[dict[str, Any]] = []
    reasons: list[str] = []
    for name in dict.fromkeys(names):  # unknown names raise here, with the list of known ones
        backend = get_backend(name)
        status = backend.available()
        if status:
            backends.append(backend)
            continue
        reasons.append(f"{name}: {status.reason}")
        if named:
            skipped.append(skipped_row(name, f"not available here: {status.reason}"))
    if not backends:
        raise BackendUnavailableError(f"none of the candidate backends is available here ({'; '.join(reasons)})")
    backends.sort(key=lambda b: -b.auto_priority)
    return backends, skipped


def skipped_row(backend: str, reason: str) -> dict[str, Any]:
    """A table row for a backend that was not built at all."""
    return {"backend": backend, "precision": "", "chosen": False, "reason": reason}


def build_auto(state: BuildState) -> Engine:
    """Every candidate backend (at every precision it offers, with ``best``) built, checked, timed; one kept.

    The table goes into ``checks["backend_candidates"]``; the chosen engine's backend becomes the state's.
    """
    precision = state.options.precision
    candidates = [
        Candidate(backend, p)
        for backend in state.candidates
        for p in (backend.precisions(state.options) if precision == "best" else [precision])
    ]
    candidates += one_thread_variants(candidates, state.options.threads)
    try:
        engine, rows = try_candidates(state, candidates, state.auto.strategy, state.timer, chosen_key="chosen")
    except BuildError as exc:
        if not state.skipped:
            raise
        others = "; ".join(f"{row['backend']}: {row['reason']}" for row in state.skipped)
        raise BuildError(f"{exc}; not built: {others}") from None
    engine.manifest.checks["backend_candidates"] = state.skipped + rows
    chosen = next(row for row in rows if row["chosen"])
    tried = ", ".join(dict.fromkeys(c.backend.name for c in candidates))
    engine.manifest.build_log.append(f"auto: {chosen['backend']} {chosen['precision']} chosen ({chosen['reason']}) "
                                     f"among {tried}{left_out_note(state.auto.candidates, tried)}")
    state.backend = get_backend(engine.manifest.backend)
    return engine


def one_thread_variants(candidates: Sequence[Candidate], threads: int | None) -> list[Candidate]:
    """ONNX Runtime's first candidate again with one intra-op thread, where the build leaves threads open and
    this process may use more than one core: on models of a fraction of a millisecond the thread pool's
    hand-offs cost more than a second core saves (4-7 % on the zoo's 0.1 ms models, benchmarks/engine_overhead.py
    notes). Timing decides, as for any candidate; the default engine stays unless it is beaten beyond the noise."""
    if threads is not None or usable_cores() < 2 or len(candidates) < 2:  # one candidate: nothing is timed
        return []
    first = next((c for c in candidates if c.backend.name == "onnxruntime"), None)
    return [Candidate(first.backend, first.precision, threads=1)] if first is not None else []


def left_out_note(named: Sequence[str] | None, tried: str) -> str:
    """Why an installed slow-building backend is not among the default candidates, or nothing."""
    if named is not None or "torch" in tried or importlib.util.find_spec("torch") is None:  # find_spec imports nothing
        return ""
    return ("; the torch backend is tried only when named (its CPU build, an Inductor compile, takes minutes): "
            "--candidates onnxruntime,openvino,torch")
