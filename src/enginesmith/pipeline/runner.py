"""Run named stages in order: progress per stage, timings, and failures that say which stage they came from.

An :class:`~enginesmith.errors.EnginesmithError` raised inside a stage keeps its type and
message and gets the stage's name in its ``stage`` attribute (the CLI prints "build failed at
stage 'verify': ..."). Anything else (a bug, a library's own failure) becomes a
:class:`~enginesmith.errors.StageFailedError` naming the stage, with the original chained as
its cause. Interrupts (``KeyboardInterrupt``) pass through untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

from ..backends.base import ProgressCallback
from ..errors import EnginesmithError, StageFailedError

State = TypeVar("State")


@dataclass(frozen=True)
class Stage(Generic[State]):
    """One step of a pipeline: a name users see and a function that advances the state."""

    name: str
    run: Callable[[State], None]


def run_stages(
    stages: Sequence[Stage[State]],
    state: State,
    timings: dict[str, float],
    progress: ProgressCallback | None = None,
) -> None:
    """Run ``stages`` on ``state`` in order; the seconds each took go into ``timings`` as it finishes."""
    for index, stage in enumerate(stages, 1):
        label = f"{stage.name} ({index}/{len(stages)})"
        if progress:
            progress(label, 0, 1)
        started = time.perf_counter()
        try:
            stage.run(state)
        except EnginesmithError as exc:
            if exc.stage is None:
                exc.stage = stage.name
                exc.add_note(f"(raised in build stage '{stage.name}')")
            raise
        except Exception as exc:  # noqa: BLE001 - named and chained, never swallowed
            raise StageFailedError(stage.name, exc) from exc
        timings[stage.name] = round(time.perf_counter() - started, 4)
        if progress:
            progress(label, 1, 1)
