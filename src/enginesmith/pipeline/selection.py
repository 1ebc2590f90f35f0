"""How a build with several candidate engines picks one: the strategies of ``--select``.

Pure functions of the candidates' timings, so they are tested without timing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def select(rows: list[dict[str, Any]], strategy: Strategy) -> int | None:
    """The index of the row ``strategy`` picks (rows carry ``p50_ms`` and, for throughput, ``throughput``)."""
    if not rows:
        return None
    indices = range(len(rows))
    if strategy.kind == "latency":
        return min(indices, key=lambda i: rows[i]["p50_ms"])
    if strategy.kind == "throughput-within":
        indices = [i for i in indices if rows[i]["p50_ms"] <= strategy.latency_budget_ms]
        if not indices:
            return None
    return max(indices, key=lambda i: (rows[i]["throughput"], -rows[i]["p50_ms"]))




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
