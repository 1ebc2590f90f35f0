"""How a build with several candidate engines picks one: the strategies of ``--select``.

Pure functions of the candidates' timings, so they are tested without timing anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import BuildError

# The batch throughput is measured at, where the engine's batch axis is not fixed.
THROUGHPUT_BATCH = 8
STRATEGIES = ("latency", "throughput", "throughput-within:MS")


@dataclass(frozen=True)
class Strategy:
    """How a candidate is chosen among those that pass: ``latency`` (lowest p50 at batch 1),
    ``throughput`` (most items per second), ``throughput-within`` (most items per second whose
    p50 at batch 1 stays within ``latency_budget_ms``)."""

    kind: str = "latency"
    latency_budget_ms: float | None = None

    @property
    def needs_throughput(self) -> bool:
        return self.kind != "latency"

    def __str__(self) -> str:
        return f"throughput-within:{self.latency_budget_ms:g}" if self.kind == "throughput-within" else self.kind

    def describe(self) -> str:
        if self.kind == "latency":
            return "lowest p50"
        if self.kind == "throughput":
            return "highest throughput"
        return f"highest throughput, p50 <= {self.latency_budget_ms:g} ms"


def parse_strategy(text: str | Strategy | None) -> Strategy:
    """``latency``, ``throughput`` or ``throughput-within:MS``; anything else is refused."""
    if text is None:
        return Strategy()
    if isinstance(text, Strategy):
        return text
    kind, _, value = text.strip().lower().partition(":")
    if kind in ("latency", "throughput") and not value:
        return Strategy(kind)
    if kind == "throughput-within":
        try:
            budget = float(value.removesuffix("ms"))
        except ValueError:
            budget = -1.0
        if budget > 0:
            return Strategy(kind, budget)
        raise BuildError(f"selection '{text}' needs a latency budget in milliseconds above 0, e.g. throughput-within:20")
    raise BuildError(f"unknown selection '{text}': choose one of {', '.join(STRATEGIES)}")


def select(rows: list[dict[str, Any]], strategy: Strategy, baseline: int | None = None) -> int | None:
    """The index of the row ``strategy`` picks (rows carry ``p50_ms`` and, for throughput, ``throughput``).

    With a ``baseline`` (the default engine: ONNX Runtime fp32 under ``auto``, fp32 under ``best``),
    the latency strategy replaces it only by a row that is faster beyond the timing noise (see
    :func:`clearly_faster`), so noise cannot flip the choice to an engine that is not faster.
    """
    if not rows:
        return None
    indices = range(len(rows))
    if strategy.kind == "latency":
        if baseline is None:
            return min(indices, key=lambda i: rows[i]["p50_ms"])
        faster = [i for i in indices if i != baseline and clearly_faster(rows[i], rows[baseline])]
        return min(faster, key=lambda i: rows[i]["p50_ms"]) if faster else baseline
    if strategy.kind == "throughput-within":
        indices = [i for i in indices if rows[i]["p50_ms"] <= strategy.latency_budget_ms]
        if not indices:
            return None
    return max(indices, key=lambda i: (rows[i]["throughput"], -rows[i]["p50_ms"]))


def clearly_faster(row: dict[str, Any], baseline: dict[str, Any]) -> bool:
    """``row`` is faster than the baseline beyond the timing noise.

    Where both were timed in the same interleaved rounds (``vs_baseline``: the median over rounds of
    row / baseline, ``vs_baseline_noise`` its spread, ``faster_rounds`` [rounds faster, rounds]), the rounds
    are compared pairwise, so a load that slows both alike in a round cancels out: the row wins when its
    median ratio is below 1 by more than the ratios' spread and it was faster in at least 80% of the rounds
    (5 of 6, 8 of 10). Otherwise the p50s are compared against the larger of the two rows' ``p50_noise``
    (relative spread of their per-round p50s; 0 where not measured)."""
    if "vs_baseline" in row:
        return _faster_round_by_round(row)
    noise = max(row.get("p50_noise", 0.0), baseline.get("p50_noise", 0.0))
    return row["p50_ms"] < baseline["p50_ms"] * (1.0 - noise)


def _faster_round_by_round(row: dict[str, Any]) -> bool:
    faster, rounds = row["faster_rounds"]
    return row["vs_baseline"] < 1.0 - row["vs_baseline_noise"] and faster >= math.ceil(0.8 * rounds)


def undecided(row: dict[str, Any]) -> bool:
    """Timed round by round with the baseline and neither clearly faster nor clearly slower: a close call that a
    second, longer timing may settle (short blocks on a shared CPU flipped such calls from build to build)."""
    if "vs_baseline" not in row:
        return False
    return not _faster_round_by_round(row) and row["vs_baseline"] < 1.0 + row["vs_baseline_noise"]


def paired_with_baseline(rounds: Sequence[float], baseline_rounds: Sequence[float]) -> dict[str, Any]:
    """The row fields :func:`clearly_faster` compares by: per-round ratios of a candidate's p50s to the baseline's."""
    ratios = np.asarray(rounds, dtype=np.float64) / np.asarray(baseline_rounds, dtype=np.float64)
    return {"vs_baseline": float(np.median(ratios)), "vs_baseline_noise": timing_noise(ratios),
            "faster_rounds": [int((ratios < 1.0).sum()), int(ratios.size)]}


def timing_noise(round_p50: Sequence[float]) -> float:
    """Half the interquartile range of per-round p50s over their median: one timing's noise, relative."""
    values = np.asarray(round_p50, dtype=np.float64)
    if values.size < 2 or not np.median(values) > 0:
        return 0.0
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return float((q3 - q1) / 2 / median)


@dataclass(frozen=True)
class AutoSelection:
    """What ``--backend auto`` was asked for: which backends may be tried (None: the default set),
    how one is picked, at which precision. Recorded in the manifest (``build_options["auto"]``)
    so a rebuild elsewhere selects again instead of keeping this machine's winner."""

    candidates: tuple[str, ...] | None = None
    strategy: Strategy = Strategy()
    precision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": list(self.candidates) if self.candidates is not None else None,
                "select": str(self.strategy), "precision": self.precision}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AutoSelection":
        names = data.get("candidates")
        return cls(tuple(names) if names is not None else None, parse_strategy(data.get("select")), data.get("precision"))
