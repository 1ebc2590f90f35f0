"""Latency and throughput measurement, engine against baseline in the same run.

Targets are timed in interleaved rounds (engine, baseline, engine, ...) so that
drift on a shared machine (thermal, other load) hits both alike, and the
statistics are computed over all rounds.
"""

from __future__ import annotations

import json
import os
import platform as _platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..files import atomic_writer, write_atomic
from ..host import cpu_model, physical_cores

Runner = Callable[[dict[str, np.ndarray]], Any]
# (label, done, total)
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class LatencyStats:
    label: str
    batch: int
    runs: int
    min_ms: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    # items per second at the median latency
    throughput: float
    # wall time spent in the timed runs
    seconds: float = 0.0

    @classmethod
    def from_samples(cls, label: str, batch: int, seconds: Sequence[float]) -> "LatencyStats":
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
        return cls(
            label=label,
            batch=batch,
            runs=len(ms),
            min_ms=float(ms.min()),
            mean_ms=float(ms.mean()),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p95_ms=float(p95),
            p99_ms=float(p99),
            max_ms=float(ms.max()),
            throughput=float(batch * 1e3 / p50) if p50 > 0 else float("inf"),
            seconds=float(ms.sum() / 1e3),
        )


def times_text(ratio: float) -> str:
    """A speed ratio for people: 1,702x, 17.2x, 1.35x."""
    if ratio >= 100:
        return f"{ratio:,.0f}x"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.2f}x"


def comparison_text(label: str, speedup: float, baseline: str) -> str:
    """'engine is 17.2x faster than model.onnx' (or slower, or about as fast: within 3%)."""
    if abs(speedup - 1) <= 0.03:
        return f"{label} is about as fast as {baseline} ({times_text(speedup)})"
    if speedup > 1:
        return f"{label} is {times_text(speedup)} faster than {baseline}"
    return f"{label} is {times_text(1 / speedup)} slower than {baseline}"


@dataclass
class BenchReport:
    results: list[LatencyStats]
    baseline: str | None
    machine: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    # how the baseline was run, e.g. "a default ONNX Runtime session", "Keras predict"
    baseline_how: str | None = None

    def ratios(self) -> list[dict[str, Any]]:
        """For each batch and non-baseline target: its p50 over the baseline's p50 (<1 is faster)."""
        if self.baseline is None:
            return []
        rows = []
        by_key = {(r.label, r.batch): r for r in self.results}
        for r in self.results:
            base = by_key.get((self.baseline, r.batch))
            if r.label == self.baseline or base is None:
                continue
            rows.append({
                "label": r.label,
                "batch": r.batch,
                "p50_ratio": r.p50_ms / base.p50_ms,
                "speedup": base.p50_ms / r.p50_ms,
                "text": comparison_text(r.label, base.p50_ms / r.p50_ms,
                                        f"{self.baseline} ({self.baseline_how})" if self.baseline_how else self.baseline),
            })
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "created_at": self.created_at,
            "machine": self.machine,
            "baseline": self.baseline,
            "baseline_how": self.baseline_how,
            "results": [asdict(r) for r in self.results],
            "ratios": self.ratios(),
        }

    def write_json(self, path: str | Path) -> Path:
        return write_atomic(path, json.dumps(self.to_dict(), indent=2).encode())

    def default_title(self, name: str = "engine") -> str:
        """What was compared, in which precision, on which machine, over how many runs."""
        what = f"{name} vs {self.baseline}" if self.baseline else f"{name} only"
        runs = sorted({r.runs for r in self.results})
        run_text = f"{runs[0]} runs" if len(runs) == 1 else f"{runs[0]}-{runs[-1]} runs"
        facts = [self.machine.get("precision"), self.machine.get("cpu"), f"{run_text} per bar"]
        return what + "\n" + ", ".join(str(f) for f in facts if f)

    def plot(self, path: str | Path, title: str | None = None, log_scale: bool = False) -> Path:
        return plot_results(self.results, path, title or self.default_title(), log_scale=log_scale)


def machine_facts() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "arch": _platform.machine(),
        "os": _platform.platform(),
        "python": _platform.python_version(),
    }


def measure(
    targets: Mapping[str, Runner],
    feeds: dict[str, np.ndarray],
    batch: int,
    *,
    warmup: int = 5,
    runs: int | None = 50,
    duration_s: float | None = None,
    min_runs: int = 10,
    rounds: int = 5,
    progress: ProgressCallback | None = None,
) -> list[LatencyStats]:
    """Time each target on the same inputs: ``runs`` times, or (with ``duration_s``) for that many
    seconds per target and at least ``min_runs`` times, like trtexec's ``--duration``."""
    for fn in targets.values():
        for _ in range(warmup):
            fn(feeds)
    samples: dict[str, list[float]] = {label: [] for label in targets}
    if duration_s is not None:
        budget = duration_s / max(rounds, 1)
        least = -(-max(min_runs, 1) // max(rounds, 1))  # per round, rounded up
        total = rounds * len(targets)
        for r in range(rounds):
            for i, (label, fn) in enumerate(targets.items()):
                end = time.perf_counter() + budget
                count = 0
                while True:
                    start = time.perf_counter()
                    fn(feeds)
                    stop = time.perf_counter()
                    samples[label].append(stop - start)
                    count += 1
                    if stop >= end and count >= least:
                        break
                if progress:
                    progress(f"batch {batch}", r * len(targets) + i + 1, total)
    else:
        runs = max(int(runs or 1), 1)
        per_round = [runs // rounds + (1 if k < runs % rounds else 0) for k in range(rounds)]
        total = runs * len(targets)
        done = 0
        for count in per_round:
            for label, fn in targets.items():
                for _ in range(count):
                    start = time.perf_counter()
                    fn(feeds)
                    samples[label].append(time.perf_counter() - start)
                    done += 1
                    if progress:
                        progress(f"batch {batch}", done, total)
    return [LatencyStats.from_samples(label, batch, s) for label, s in samples.items()]


def _bar_text(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def plot_results(results: Sequence[LatencyStats], path: str | Path, title: str, log_scale: bool = False) -> Path:
    """Grouped bars with their values: p50 latency (whiskers to p90) and throughput, per batch size and target.

    Linear axes unless ``log_scale``: a log axis makes a 100x difference look like a 2x one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.label for r in results))
    batches = sorted({r.batch for r in results})
    by_key = {(r.label, r.batch): r for r in results}
    width = 0.8 / max(len(labels), 1)
    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(11, 4.6))
    x = np.arange(len(batches))
    for i, label in enumerate(labels):
        rows = [by_key.get((label, b)) for b in batches]
        p50 = [r.p50_ms if r else 0 for r in rows]
        err = [max(r.p90_ms - r.p50_ms, 0) if r else 0 for r in rows]
        tp = [r.throughput if r else 0 for r in rows]
        bars = ax_lat.bar(x + i * width, p50, width, yerr=[[0] * len(err), err], capsize=3, label=label)
        ax_lat.bar_label(bars, labels=[_bar_text(v) for v in p50], fontsize=7, padding=2)
        bars = ax_tp.bar(x + i * width, tp, width, label=label)
        ax_tp.bar_label(bars, labels=[_bar_text(v) for v in tp], fontsize=7, padding=2)
    for ax, ylabel in ((ax_lat, "p50 latency, ms (whisker: p90)"), (ax_tp, "throughput, items/s at p50")):
        ax.set_xticks(x + width * (len(labels) - 1) / 2, [f"batch {b}" for b in batches])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        if log_scale:
            ax.set_yscale("log")
        else:
            ax.margins(y=0.12)  # room for the numbers above the bars
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_writer(path) as handle:
            fig.savefig(handle, dpi=110, format="png")
    finally:
        plt.close(fig)
    return Path(path)
