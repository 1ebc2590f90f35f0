"""Capture, preprocessing, inference and post-processing as overlapping stages.

    source 1 ─capture thread─▶ queue ─┐
    source 2 ─capture thread─▶ queue ─┴▶ preprocess thread (one frame from each source = one batch)
        ─▶ queue ─▶ inference thread ─▶ queue ─▶ caller's thread: decode, NMS, sinks, status

Every queue is bounded. A live source's queue drops its oldest frame when full (the frame
that would be most out of date by the time it is seen) and counts it; a file source's queue
blocks instead, so files never lose a frame. Stopping (the frame limit, the end of every
source, Ctrl-C) closes the queues, which wakes every waiting thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .detector import Detector
from .records import Frame, FrameResult, StageTimes
from .sources import Source

LIVE_QUEUE = 2
FILE_QUEUE = 8
STAGE_QUEUE = 2
# Per-stage times kept for the percentiles: the most recent frames only, so a run of days holds no more
# memory than a run of minutes (means are over every frame).
STAGE_WINDOW = 10_000


class StageQueue:
    """A bounded queue that either drops its oldest item or blocks when full, and can be closed."""

    def __init__(self, size: int, drop_oldest: bool):
        self._items: deque = deque()
        self._size, self._drop = size, drop_oldest
        self._ready = threading.Condition()
        self._closed = False
        self.dropped = 0

    def put(self, item) -> bool:
        """False when the queue was closed (the item is discarded)."""
        with self._ready:
            while len(self._items) >= self._size and not self._closed:
                if self._drop:
                    self._items.popleft()
                    self.dropped += 1
                else:
                    self._ready.wait()
            if self._closed:
                return False
            self._items.append(item)
            self._ready.notify_all()
            return True

    def get(self):
        """The next item, or None once the queue is closed and empty."""
        with self._ready:
            while not self._items and not self._closed:
                self._ready.wait()
            item = self._items.popleft() if self._items else None
            self._ready.notify_all()
            return item

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def discard(self) -> None:
        """Close and forget what is queued (a stop: nothing more will be processed)."""
        with self._ready:
            self._closed = True
            self._items.clear()
            self._ready.notify_all()


@dataclass
class SourceCounts:
    name: str
    live: bool
    read: int = 0  # frames taken from the source
    dropped: int = 0  # live frames dropped because the pipeline fell behind
    corrupt: int = 0  # frames that could not be decoded and were skipped
    reconnects: int = 0  # times the live source stopped delivering and was opened again
    lost: bool = False  # it stopped delivering and every attempt to open it again failed
    reduced: int = 0  # frames of JPEG files or MJPEG videos decoded at a reduced size (vision.decode)
    processed: int = 0


@dataclass
class RunSummary:
    frames: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    sources: list[SourceCounts] = field(default_factory=list)
    # The last STAGE_WINDOW frames' seconds per stage (p50, p95), and every frame's total (the mean).
    stage_seconds: dict[str, deque] = field(
        default_factory=lambda: {s: deque(maxlen=STAGE_WINDOW) for s in StageTimes.STAGES})
    stage_totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(StageTimes.STAGES, 0.0))
    # Seconds the inference thread spent in engine calls; engine-only FPS is frames over this.
    inference_busy: float = 0.0
    batches: int = 0

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        def stats(stage: str) -> dict:
            values = self.stage_seconds[stage]
            if not values:
                return {"mean_ms": None, "p50_ms": None, "p95_ms": None}
            ms = np.asarray(values) * 1e3
            return {"mean_ms": round(self.stage_totals[stage] / self.frames * 1e3, 3),
                    "p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}

        return {
            "frames": self.frames,
            "seconds": round(self.seconds, 4),
            "fps": round(self.fps, 3),
            "engine_fps": round(self.frames / self.inference_busy, 3) if self.inference_busy > 0 else None,
            "batches": self.batches,
            "interrupted": self.interrupted,
            "dropped": sum(s.dropped for s in self.sources),
            "corrupt": sum(s.corrupt for s in self.sources),
            "stages": {name: stats(name) for name in self.stage_seconds},
            "sources": [vars(s).copy() for s in self.sources],
        }


ResultCallback = Callable[[Frame, FrameResult], None]
StatusCallback = Callable[[RunSummary], None]


def run_pipeline(
    detector: Detector,
    sources: Sequence[Source],
    on_result: ResultCallback,
    max_frames: int | None = None,
    on_status: StatusCallback | None = None,
    status_every: float = 0.5,
) -> RunSummary:
    """Run until every source ends, ``max_frames`` results are out, or Ctrl-C; the summary is returned
    in every case (``interrupted`` says whether Ctrl-C ended it). Errors of any stage are raised here."""
    summary = RunSummary(sources=[SourceCounts(s.name, s.live) for s in sources])
    frame_queues = [StageQueue(LIVE_QUEUE if s.live else FILE_QUEUE, drop_oldest=s.live) for s in sources]
    batch_queue = StageQueue(STAGE_QUEUE, drop_oldest=False)
    output_queue = StageQueue(STAGE_QUEUE, drop_oldest=False)
    # Input batch buffers go round: preprocessing fills a free one, inference hands it back after the engine
    # call. One per batch that can be in flight (queued, being filled, in the engine) so nobody waits on them.
    # (None: the detector makes its batches on the device.)
    free_buffers = StageQueue(STAGE_QUEUE + 2, drop_oldest=False)
    pooled = detector.batch_buffer(len(sources)) is not None
    for _ in range(STAGE_QUEUE + 2 if pooled else 0):
        free_buffers.put(detector.batch_buffer(len(sources)))
    queues = [*frame_queues, batch_queue, output_queue, free_buffers]
    errors: list[BaseException] = []

    def stop() -> None:
        for source in sources:
            source.request_stop()
        for q in queues:
            q.discard()

    def guarded(work: Callable[[], None], closes: StageQueue) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                errors.append(exc)
                stop()
            finally:
                closes.close()
        return run

    def capture(position: int, source: Source, queue: StageQueue, counts: SourceCounts) -> Callable[[], None]:
        def work() -> None:
            try:
                frames = iter(source.frames())
                while True:
                    start = time.perf_counter()
                    frame = next(frames, None)
                    if frame is None:
                        return
                    counts.read += 1
                    if not queue.put((frame, time.perf_counter() - start, position)):
                        return
            finally:
                counts.corrupt, counts.reconnects, counts.lost = source.corrupt, source.reconnects, source.lost
                counts.reduced = getattr(source, "reduced", 0)
                source.close()
        return work

    def preprocess() -> None:
        active = list(frame_queues)
        while active:
            taken = []
            for queue in list(active):
                item = queue.get()
                if item is None:
                    active.remove(queue)
                else:
                    taken.append(item)
            if not taken:
                continue
            buffer = free_buffers.get() if pooled else None
            if pooled and buffer is None:
                return
            start = time.perf_counter()
            feeds, placements = detector.preprocess([frame.pixels for frame, _, _ in taken], out=buffer)
            placements = [place if frame.reduction == 1 else place.of_full_size(frame.reduction, *frame.size)
                          for place, (frame, _, _) in zip(placements, taken)]
            if not batch_queue.put((taken, feeds, placements, buffer, time.perf_counter() - start)):
                return

    def infer() -> None:
        while (item := batch_queue.get()) is not None:
            taken, feeds, placements, buffer, pre = item
            start = time.perf_counter()
            outputs = detector.infer(feeds)
            if buffer is not None:
                free_buffers.put(buffer)
            if not output_queue.put((taken, outputs, placements, pre, time.perf_counter() - start)):
                return

    threads = [threading.Thread(target=guarded(capture(i, s, q, c), q), name=f"capture {s.name}", daemon=True)
               for i, (s, q, c) in enumerate(zip(sources, frame_queues, summary.sources))]
    threads.append(threading.Thread(target=guarded(preprocess, batch_queue), name="preprocess", daemon=True))
    threads.append(threading.Thread(target=guarded(infer, output_queue), name="inference", daemon=True))
    began = time.perf_counter()
    last_status = began
    try:
        for thread in threads:
            thread.start()
        while (item := output_queue.get()) is not None:
            taken, outputs, placements, pre, inference = item
            summary.batches += 1
            summary.inference_busy += inference
            start = time.perf_counter()
            detections = detector.postprocess(outputs, placements)
            post = (time.perf_counter() - start) / len(taken)
            for (frame, captured, position), found in zip(taken, detections):
                # End to end: from the start of reading the frame to its results handed to the sinks.
                times = StageTimes(captured, pre / len(taken), inference, post, captured + max(0.0, time.time() - frame.time))
                result = FrameResult(summary.frames, frame.source, frame.index, frame.time, frame.size,
                                     found, times)
                on_result(frame, result)
                for stage in StageTimes.STAGES:
                    seconds = getattr(times, stage)
                    summary.stage_seconds[stage].append(seconds)
                    summary.stage_totals[stage] += seconds
                summary.frames += 1
                summary.sources[position].processed += 1
                if max_frames is not None and summary.frames >= max_frames:
                    stop()
                    break
            summary.seconds = time.perf_counter() - began
            if on_status and time.perf_counter() - last_status >= status_every:
                last_status = time.perf_counter()
                _refresh_counts(summary, sources, frame_queues)
                on_status(summary)
    except KeyboardInterrupt:
        summary.interrupted = True
        stop()
    finally:
        stop()
        # One deadline for all the joins, not 10 s each: a Ctrl-C that lands while a stage holds a queue's lock can
        # leave that stage blocked for good (daemon threads, gone with the process), and the summary must still come.
        deadline = time.monotonic() + 10
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        summary.seconds = time.perf_counter() - began
        _refresh_counts(summary, sources, frame_queues)
    if errors and not summary.interrupted:
        raise errors[0]
    return summary


def _refresh_counts(summary: RunSummary, sources: Sequence[Source], queues: Sequence[StageQueue]) -> None:
    for counts, source, queue in zip(summary.sources, sources, queues):
        counts.dropped, counts.corrupt, counts.reconnects = queue.dropped, source.corrupt, source.reconnects
