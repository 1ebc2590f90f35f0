"""Importing TensorRT, and its logger: the one place its messages are kept for error reports.

TensorRT reports the reason of most failures (a build out of memory, a plan from
another version) only through its logger, while the call itself returns None.
The logger keeps the recent messages so a failing call can quote them.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Iterator

from ...errors import MissingDependencyError

MISSING_HINT = "use --backend onnxruntime, or install TensorRT from NVIDIA (JetPack on a Jetson, 'pip install tensorrt' elsewhere)"
_log = logging.getLogger("enginesmith.tensorrt")
_trt: ModuleType | None = None
_logger: Any = None
_logger_lock = threading.Lock()


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module; :class:`MissingDependencyError` that says what failed and what to do instead."""
    global _trt
    if _trt is None:
        try:
            import tensorrt
        except Exception as exc:  # noqa: BLE001 - ImportError, or OSError when libnvinfer is missing
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MissingDependencyError(f"TensorRT is not installed (import tensorrt failed: {reason}); {MISSING_HINT}") from None
        _trt = tensorrt
    return _trt


class _Messages:
    """The last messages TensorRT logged, numbered so a caller can read those logged during its call."""

    def __init__(self, keep: int = 500):
        self._lock = threading.Lock()
        self._items: deque[tuple[int, str, str]] = deque(maxlen=keep)
        self._count = 0

    def add(self, severity: str, text: str) -> None:
        with self._lock:
            self._count += 1
            self._items.append((self._count, severity, text))

    def mark(self) -> int:
        with self._lock:
            return self._count

    def since(self, mark: int, severities: tuple[str, ...]) -> list[str]:
        with self._lock:
            return [text for number, severity, text in self._items if number > mark and severity in severities]


MESSAGES = _Messages()


def trt_logger() -> Any:
    """One ``trt.ILogger`` for the process (TensorRT expects builders and runtimes to share one)."""
    global _logger
    with _logger_lock:
        if _logger is None:
            trt = import_tensorrt()

            class _Logger(trt.ILogger):  # type: ignore[name-defined, misc]
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)  # pybind trampolines must be initialized explicitly

                def log(self, severity: Any, msg: str) -> None:
                    name = getattr(severity, "name", str(severity).split(".")[-1])
                    if name in ("INTERNAL_ERROR", "ERROR"):
                        MESSAGES.add(name, msg)
                        _log.error("TensorRT: %s", msg)
                    elif name == "WARNING":
                        MESSAGES.add(name, msg)
                        _log.warning("TensorRT: %s", msg)
                    else:  # INFO and VERBOSE: thousands per build, kept only for debug logging
                        _log.debug("TensorRT: %s", msg)

            _logger = _Logger()
    return _logger


@contextmanager
def captured_errors() -> Iterator[list[str]]:
    """Collects the errors TensorRT logs inside the block (the list fills when the block ends)."""
    mark = MESSAGES.mark()
    errors: list[str] = []
    try:
        yield errors
    finally:
        errors.extend(MESSAGES.since(mark, ("INTERNAL_ERROR", "ERROR")))
