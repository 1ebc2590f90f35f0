"""Backend registry. Backend modules are imported only when asked for."""

from __future__ import annotations

import importlib

from ..errors import BackendUnavailableError
from .base import Availability, Backend, BuildOptions, BuildResult, Calibration, Session

# name -> "module:Class"; each backend is one module that alone imports its library.
BACKENDS: dict[str, str] = {
    "onnxruntime": "enginesmith.backends.onnxruntime:OnnxRuntimeBackend",
    "torch": "enginesmith.backends.torch_compile:TorchCompileBackend",
    "tensorrt": "enginesmith.backends.tensorrt:TensorRTBackend",
    "openvino": "enginesmith.backends.openvino:OpenVinoBackend",
}

_instances: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises if it is unknown (not if it is unavailable)."""
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend '{name}': choose one of {', '.join(sorted(BACKENDS))} or 'auto'")
    if name not in _instances:
        module_name, class_name = BACKENDS[name].split(":")
        _instances[name] = getattr(importlib.import_module(module_name), class_name)()
    return _instances[name]


def backend_status() -> dict[str, Availability]:
    return {name: get_backend(name).available() for name in BACKENDS}


def pick_backend(name: str = "auto") -> Backend:
    """The named backend if it can run here, or for ``auto`` the best one that can."""
    if name != "auto":
        backend = get_backend(name)
        status = backend.available()
        if not status:
            raise BackendUnavailableError(f"backend '{name}' is not available here: {status.reason}")
        return backend
    ranked = sorted((get_backend(n) for n in BACKENDS), key=lambda b: -b.auto_priority)
    for backend in ranked:
        if backend.available():
            return backend
    reasons = "; ".join(f"{n}: {s.reason}" for n, s in backend_status().items())
    raise BackendUnavailableError(f"no backend is available here ({reasons})")


__all__ = [
    "Availability",
    "Backend",
    "BuildOptions",
    "BuildResult",
    "Calibration",
    "Session",
    "BACKENDS",
    "backend_status",
    "get_backend",
    "pick_backend",
]
