"""Per-model counters in Triton's names, their Prometheus text, and the once-a-minute log line.

The names and meanings follow Triton Inference Server's metrics (docs/user_guide/metrics.md):
request counts, inference (item) and execution counts, and cumulative durations in microseconds,
labelled ``model`` and ``version``. The text is written here rather than with prometheus_client
because that library adds ``_total`` to every counter's name, and dashboards built for Triton
query the names without it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from typing import Callable, Iterable


@dataclass
class ModelCounters:
    """Cumulative since the server started; durations in nanoseconds (exposed in microseconds)."""

    request_success: int = 0
    request_failure: int = 0
    inference_count: int = 0
    exec_count: int = 0
    request_duration_ns: int = 0
    queue_duration_ns: int = 0
    compute_infer_duration_ns: int = 0


# metric name, counter field (None: a gauge read from the model), help text
METRICS: tuple[tuple[str, str | None, str], ...] = (
    ("nv_inference_request_success", "request_success", "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", "request_failure", "Number of failed inference requests, all batch sizes"),
    ("nv_inference_count", "inference_count", "Number of inferences performed (a batch of n counts n)"),
    ("nv_inference_exec_count", "exec_count", "Number of model executions performed (a merged batch counts 1)"),
    ("nv_inference_request_duration_us", "request_duration_ns", "Cumulative inference request duration in microseconds"),
    ("nv_inference_queue_duration_us", "queue_duration_ns", "Cumulative inference queuing duration in microseconds"),
    ("nv_inference_compute_infer_duration_us", "compute_infer_duration_ns",
     "Cumulative compute inference duration in microseconds"),
    ("nv_inference_pending_request_count", None, "Instantaneous number of pending requests awaiting execution"),
)


class ModelStats:
    """Thread-safe counters of one served model; the front ends and the batcher's workers update them."""

    def __init__(self, model: str, version: str, pending: Callable[[], int]):
        self.model = model
        self.version = version
        self._pending = pending
        self._lock = threading.Lock()
        self._counters = ModelCounters()

    def request_done(self, ok: bool, duration_ns: int) -> None:
        with self._lock:
            if ok:
                self._counters.request_success += 1
            else:
                self._counters.request_failure += 1
            self._counters.request_duration_ns += duration_ns

    def queued(self, duration_ns: int) -> None:
        with self._lock:
            self._counters.queue_duration_ns += duration_ns

    def executed(self, items: int, compute_ns: int) -> None:
        with self._lock:
            self._counters.exec_count += 1
            self._counters.inference_count += items
            self._counters.compute_infer_duration_ns += compute_ns

    def snapshot(self) -> ModelCounters:
        with self._lock:
            return ModelCounters(**{f.name: getattr(self._counters, f.name) for f in fields(ModelCounters)})

    @property
    def pending(self) -> int:
        return self._pending()


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(models: Iterable[ModelStats]) -> str:
    """The Prometheus text exposition format (version 0.0.4) of every model's counters."""
    models = list(models)
    snapshots = [(stats, stats.snapshot()) for stats in models]
    lines: list[str] = []
    for metric, counter, help_text in METRICS:
        lines.append(f"# HELP {metric} {help_text}")
        lines.append(f"# TYPE {metric} {'gauge' if counter is None else 'counter'}")
        for stats, snap in snapshots:
            labels = f'model="{_label(stats.model)}",version="{_label(stats.version)}"'
            if counter is None:
                value = stats.pending
            else:
                value = getattr(snap, counter)
                if counter.endswith("_ns"):
                    value //= 1000
            lines.append(f"{metric}{{{labels}}} {value}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RateLine:
    """What changed between two snapshots of one model, for the periodic log line."""

    model: str
    seconds: float
    requests: int
    failures: int
    inferences: int
    executions: int
    queue_ns: int
    compute_ns: int
    request_ns: int

    def text(self) -> str:
        rate = self.requests / self.seconds if self.seconds else 0.0
        if not self.requests:
            return f"{self.model}: no requests in the last {self.seconds:.0f} s"
        batch = self.inferences / self.executions if self.executions else 0.0
        return (
            f"{self.model}: {rate:,.1f} requests/s ({self.requests:,} in {self.seconds:.0f} s, {self.failures:,} failed), "
            f"{self.inferences / self.seconds:,.1f} inferences/s, average batch {batch:.1f}, "
            f"mean request {self.request_ns / self.requests / 1e6:.2f} ms "
            f"(queue {self.queue_ns / self.requests / 1e6:.2f} ms, "
            f"compute {self.compute_ns / max(self.executions, 1) / 1e6:.2f} ms per execution)"
        )


def rate_line(model: str, before: ModelCounters, after: ModelCounters, seconds: float) -> RateLine:
    return RateLine(
        model=model,
        seconds=seconds,
        requests=(after.request_success + after.request_failure) - (before.request_success + before.request_failure),
        failures=after.request_failure - before.request_failure,
        inferences=after.inference_count - before.inference_count,
        executions=after.exec_count - before.exec_count,
        queue_ns=after.queue_duration_ns - before.queue_duration_ns,
        compute_ns=after.compute_infer_duration_ns - before.compute_infer_duration_ns,
        request_ns=after.request_duration_ns - before.request_duration_ns,
    )
