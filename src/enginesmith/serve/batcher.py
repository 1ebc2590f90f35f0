"""Dynamic batching: requests for one engine merged along axis 0, run, and split back.

A :class:`DynamicBatcher` owns a bounded queue and ``instances`` worker threads that call the
engine. A worker takes the oldest request, then every queued request whose inputs have the same
shape apart from axis 0, until the batch holds ``max_batch`` items or ``max_queue_delay_us`` has
passed since it started gathering. The merged outputs are cut back into per-request pieces.

An engine compiled for fixed batch sizes (a CUDA engine of the torch backend) runs other sizes slowly, uncompiled:
with ``preferred_batches`` a batch is padded up to the smallest of them that holds it (copies of its last
row) and the padding's outputs are dropped, as Triton's preferred batch sizes do.

When a merged batch fails, each of its requests is run alone, so one bad request fails only
itself. A full queue refuses new requests at once (:class:`QueueFullError`) instead of growing;
a request still queued when its deadline passes is answered with :class:`QueueTimeoutError`
without being run.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

import numpy as np


class Runner(Protocol):
    """What the batcher calls: an engine's ``infer``."""

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class QueueFullError(Exception):
    """The queue holds ``max_queue`` requests already."""


class QueueTimeoutError(Exception):
    """The request waited in the queue past its deadline and was not run."""


class BatcherStoppedError(Exception):
    """The server is stopping; queued requests are not run."""


@dataclass(frozen=True)
class BatchingOptions:
    max_batch: int = 32
    max_queue_delay_us: int = 0
    max_queue: int = 256
    instances: int = 1
    preferred_batches: tuple[int, ...] = ()  # sizes the engine was compiled for; other batches are padded up

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if any(size < 1 for size in self.preferred_batches) or list(self.preferred_batches) != sorted(set(self.preferred_batches)):
            raise ValueError(f"preferred_batches must be increasing sizes of at least 1, got {self.preferred_batches}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be 0 or more, got {self.max_queue_delay_us}")


@dataclass(frozen=True)
class ExecutionRecord:
    """One call of the engine: how many requests and items it carried, how long it took."""

    requests: int
    items: int
    compute_ns: int


@dataclass
class _Pending:
    feeds: dict[str, np.ndarray]
    rows: int | None  # items along axis 0; None: the request cannot be merged with others
    merge_key: tuple
    future: Future
    enqueued_ns: int
    deadline_ns: int | None
    started_ns: int = 0
    queue_ns: int = field(default=0)
    answered: bool = False


def merge_key(feeds: Mapping[str, np.ndarray]) -> tuple[int | None, tuple]:
    """Rows along axis 0 shared by every input, and what must match to merge: names, dtypes, other dims."""
    rows = {value.shape[0] if value.ndim else None for value in feeds.values()}
    key = tuple(sorted((name, value.dtype.str, value.shape[1:] if value.ndim else None) for name, value in feeds.items()))
    common = rows.pop() if len(rows) == 1 else None
    return common, key


class DynamicBatcher:
    """Merges queued requests into batches for ``run`` on ``options.instances`` worker threads.

    ``on_execution`` is told about every engine call, ``on_dequeue`` about every request's time in
    the queue (nanoseconds); both are called from worker threads.
    """

    def __init__(
        self,
        run: Runner,
        options: BatchingOptions,
        name: str = "model",
        on_execution: Callable[[ExecutionRecord], None] | None = None,
        on_dequeue: Callable[[int], None] | None = None,
    ):
        self._run = run
        self.options = options
        self._on_execution = on_execution or (lambda record: None)
        self._on_dequeue = on_dequeue or (lambda ns: None)
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._running = 0
        self.last_call_ns = 0  # how long the latest engine call took (0: none yet)
        self._workers = [
            threading.Thread(target=self._work, name=f"enginesmith-serve-{name}-{i}", daemon=True)
            for i in range(options.instances)
        ]
        for worker in self._workers:
            worker.start()

    @property
    def pending(self) -> int:
        """Requests queued or running now."""
        with self._cond:
            return len(self._queue) + self._running

    def submit(self, feeds: dict[str, np.ndarray], timeout_s: float | None = None) -> Future:
        """Queue a request; its future gets the outputs or the error. Raises QueueFullError at once when full."""
        rows, key = merge_key(feeds)
        now = time.perf_counter_ns()
        pending = _Pending(feeds, rows, key, Future(), now, None if timeout_s is None else now + int(timeout_s * 1e9))
        with self._cond:
            if self._stopping:
                raise BatcherStoppedError("the server is stopping")
            if len(self._queue) >= self.options.max_queue:
                raise QueueFullError(f"the queue holds {self.options.max_queue} requests already")
            self._queue.append(pending)
            self._cond.notify()
        return pending.future

    def run_if_idle(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Run a request on the calling thread at once when nothing is queued or running; else None (submit it).

        The fast path for a lone request: no hand-off to a worker and back, no gathering window (there
        is nothing to merge it with). While it runs it counts as running, so the workers and ``pending``
        see it. The engine's errors are raised here.
        """
        with self._cond:
            if self._stopping:
                raise BatcherStoppedError("the server is stopping")
            if self._queue or self._running:
                return None
            self._running += 1
        try:
            self._on_dequeue(0)
            started = time.perf_counter_ns()
            rows = merge_key(feeds)[0]
            outputs = self._call(feeds, rows)
            self._executed(ExecutionRecord(1, rows or 1, time.perf_counter_ns() - started))
            return outputs
        finally:
            with self._cond:
                self._running -= 1

    def stop(self, timeout_s: float = 5.0) -> None:
        """Refuse new requests, fail the queued ones, let running batches finish, join the workers."""
        with self._cond:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for pending in left:
            if pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(BatcherStoppedError("the server is stopping"))
        for worker in self._workers:
            worker.join(timeout_s)

    # ------------------------------------------------------------------ workers

    def _work(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            try:
                self._execute(batch)
            finally:
                with self._cond:
                    self._running -= sum(not pending.answered for pending in batch)

    def _answer(self, pending: _Pending, outputs: dict[str, np.ndarray] | None = None,
                error: BaseException | None = None) -> None:
        """Stop counting the request as running, then resolve its future: a client that sends its next
        request as soon as it has this answer finds the batcher idle (and can take the fast path)."""
        with self._cond:
            self._running -= 1
            pending.answered = True
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(outputs)

    def _take(self, pending: _Pending, now: int) -> bool:
        """Claim a request for running (False: cancelled by its client, or expired and answered)."""
        pending.queue_ns = now - pending.enqueued_ns
        if not pending.future.set_running_or_notify_cancel():
            return False
        self._on_dequeue(pending.queue_ns)
        if pending.deadline_ns is not None and now > pending.deadline_ns:
            pending.future.set_exception(QueueTimeoutError(
                f"the request waited {pending.queue_ns / 1e6:.1f} ms in the queue, longer than its timeout"))
            return False
        return True

    def _gather(self) -> list[_Pending] | None:
        options = self.options
        with self._cond:
            batch: list[_Pending] = []
            while not batch:
                while not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                first = self._queue.popleft()
                if self._take(first, time.perf_counter_ns()):
                    batch.append(first)
            rows = first.rows
            if rows is not None and options.max_batch > 1:
                gather_until = time.perf_counter_ns() + options.max_queue_delay_us * 1000
                while rows < options.max_batch:
                    rows = self._take_compatible(first, batch, rows)
                    left_ns = gather_until - time.perf_counter_ns()
                    if rows >= options.max_batch or left_ns <= 0 or self._stopping:
                        break
                    self._cond.wait(left_ns / 1e9)
            self._running += len(batch)
            return batch

    def _take_compatible(self, first: _Pending, batch: list[_Pending], rows: int) -> int:
        """Move queued requests that merge with ``first`` into ``batch``, up to max_batch items (lock held)."""
        now = time.perf_counter_ns()
        kept: deque[_Pending] = deque()
        while self._queue:
            candidate = self._queue.popleft()
            fits = candidate.merge_key == first.merge_key and candidate.rows is not None
            if fits and rows + candidate.rows <= self.options.max_batch:
                if self._take(candidate, now):
                    batch.append(candidate)
                    rows += candidate.rows
            else:
                kept.append(candidate)
        self._queue.extendleft(reversed(kept))
        return rows

    def _executed(self, record: ExecutionRecord) -> None:
        self.last_call_ns = record.compute_ns
        self._on_execution(record)

    def _execute(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        names = list(batch[0].feeds)
        merged = {name: np.concatenate([p.feeds[name] for p in batch], axis=0) for name in names}
        total = sum(p.rows or 0 for p in batch)
        started = time.perf_counter_ns()
        try:
            outputs = self._call(merged, total)
            split = _split(outputs, [p.rows or 0 for p in batch], total)
        except Exception:  # noqa: BLE001 - one bad request must fail only itself: run each alone
            for pending in batch:
                self._run_alone(pending)
            return
        self._executed(ExecutionRecord(len(batch), total, time.perf_counter_ns() - started))
        for pending, result in zip(batch, split):
            self._answer(pending, result)

    def _run_alone(self, pending: _Pending) -> None:
        started = time.perf_counter_ns()
        try:
            outputs = self._call(pending.feeds, pending.rows)
        except Exception as exc:  # noqa: BLE001 - handed to the request's future, the worker keeps serving
            self._answer(pending, error=exc)
            return
        self._executed(ExecutionRecord(1, pending.rows or 1, time.perf_counter_ns() - started))
        self._answer(pending, outputs)

    def _call(self, feeds: dict[str, np.ndarray], rows: int | None) -> dict[str, np.ndarray]:
        """The engine on ``feeds``, padded up to a preferred batch size when one holds ``rows`` and is larger."""
        if rows is None or rows < 1:
            return self._run(feeds)
        size = next((size for size in self.options.preferred_batches if size >= rows), rows)
        if size == rows:
            return self._run(feeds)
        padded = {name: np.concatenate([value, np.repeat(value[-1:], size - rows, axis=0)]) for name, value in feeds.items()}
        outputs = self._run(padded)
        if any(value.ndim == 0 or value.shape[0] != size for value in outputs.values()):
            return self._run(feeds)  # an output without the batch axis: the padding cannot be cut off again
        return {name: value[:rows] for name, value in outputs.items()}


def _split(outputs: Mapping[str, np.ndarray], rows: list[int], total: int) -> list[dict[str, np.ndarray]]:
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != total:
            raise ValueError(f"output '{name}' has no batch axis of {total} rows to split")
    pieces: list[dict[str, np.ndarray]] = [{} for _ in rows]
    offsets = np.cumsum([0, *rows])
    for name, value in outputs.items():
        for index, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
            pieces[index][name] = value[start:end]
    return pieces
