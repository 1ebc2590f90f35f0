"""enginesmith: turn a trained network into a fast, validated, platform-specific engine.

    import enginesmith as es
    engine = es.build("model.onnx")
    engine.save("model.engine")
    engine = es.load("model.engine")
    outputs = engine(x=batch)
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    BackendUnavailableError,
    BuildError,
    BundleError,
    EnginesmithError,
    InputError,
    MissingDependencyError,
    NotExportableError,
    PlatformMismatchError,
    UntrustedCodeError,
    SourceError,
    UnsupportedModelError,
    ValidationDataError,
)
from .api import bench, build, info, layerwise, load, validate  # noqa: E402
from .export import export_kserve, export_triton  # noqa: E402
from .importers import ImportOptions  # noqa: E402
from .runtime.engine import Engine  # noqa: E402
from .serve import ServeError, ServerHandle, serve  # noqa: E402
from .signature import Signature, TensorSpec  # noqa: E402
from .validate import Tolerance, ValidationReport  # noqa: E402

__all__ = [
    "__version__",
    "build",
    "load",
    "validate",
    "layerwise",
    "bench",
    "info",
    "serve",
    "export_triton",
    "export_kserve",
    "ServerHandle",
    "ServeError",
    "Engine",
    "ImportOptions",
    "Signature",
    "TensorSpec",
    "Tolerance",
    "ValidationReport",
    "EnginesmithError",
    "BackendUnavailableError",
    "BuildError",
    "BundleError",
    "InputError",
    "MissingDependencyError",
    "NotExportableError",
    "PlatformMismatchError",
    "UntrustedCodeError",
    "SourceError",
    "UnsupportedModelError",
    "ValidationDataError",
]
