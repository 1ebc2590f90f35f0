"""Importers: every supported source becomes an ONNX model plus a signature.

Each importer is a module in this package with two functions:

``import_source(source, options) -> ImportedModel``
    read the source (a path or an in-memory framework object) and convert it;
``reference(source, options) -> ReferenceRunner``
    a callable that runs the *original* model with its own framework, used by
    validation so an engine is compared against what the user trained, not
    against the converted graph.

Frameworks are imported inside those functions, never at module import.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from ..errors import SourceError
from ..native_source import NativeSource
from ..signature import Signature

ReferenceRunner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class ImportOptions:
    """Options shared by importers; each importer reads the ones it understands."""

    trust_code: bool = False
    # name -> fixed shape, e.g. {"x": (1, 3, 224, 224)}
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # name -> axes to mark dynamic
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)
    input_names: list[str] | None = None
    output_names: list[str] | None = None
    signature_key: str = "serving_default"
    opset: int | None = None
    # The opset converters use when ``opset`` is not set: the target backend's choice, set by
    # build(). Not recorded: a rebuild for another backend takes that backend's choice.
    default_opset: int | None = None
    # Example inputs for in-memory framework objects (e.g. a torch module).
    example_inputs: Any = None
    # Set by build() when the PyTorch backend builds from the torch source itself: the torch importer
    # then converts to ONNX in a child process (ImportedModel.pending_onnx) instead of before returning.
    # Not recorded.
    onnx_in_background: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The options worth recording (and replaying on rebuild); objects are left out."""
        return {
            "trust_code": self.trust_code,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "dynamic_axes": {k: list(v) for k, v in self.dynamic_axes.items()},
            "input_names": self.input_names,
            "output_names": self.output_names,
            "signature_key": self.signature_key,
            "opset": self.opset,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImportOptions":
        # trust_code is recorded but never replayed: a bundle (which may come from anyone)
        # must not be able to switch on code execution for its own embedded source. Whoever
        # rebuilds or validates it passes trust_code again if they trust it.
        return cls(
            trust_code=False,
            input_shapes={k: tuple(v) for k, v in (data.get("input_shapes") or {}).items()},
            dynamic_axes={k: list(v) for k, v in (data.get("dynamic_axes") or {}).items()},
            input_names=data.get("input_names"),
            output_names=data.get("output_names"),
            signature_key=data.get("signature_key", "serving_default"),
            opset=data.get("opset"),
        )

    def over(self, recorded: "ImportOptions") -> "ImportOptions":
        """These options laid over ``recorded`` ones: a field left at its default keeps the recorded value.

        Rebuilding or validating a bundle with, say, only ``trust_code=True`` must keep the
        shapes, names and opset the bundle was built with.
        """
        merged = {}
        for item in fields(self):
            mine = getattr(self, item.name)
            unset = mine is None if item.name == "example_inputs" else mine == getattr(_DEFAULT_OPTIONS, item.name)
            merged[item.name] = getattr(recorded, item.name) if unset else mine
        return ImportOptions(**merged)


_DEFAULT_OPTIONS = ImportOptions()


@dataclass
class PendingOnnx:
    """An ONNX conversion still running (a torch source's, see ``onnx_job.py``).

    ``finish()`` joins it and returns (the checked ONNX model, build-log lines), raising the
    importer's error when the model cannot be converted; ``cancel()`` stops it. Both may be
    called more than once.
    """

    finish: Callable[[], tuple[onnx.ModelProto, list[str]]]
    cancel: Callable[[], None]
    # The child process converting (tests look for it).
    pid: int | None = None
    # Wall seconds the conversion took, once finish() has joined it.
    seconds: float | None = None


@dataclass
class ImportedModel:
    # None while ``pending_onnx`` is still converting (see with_onnx).
    model: onnx.ModelProto | None
    signature: Signature
    kind: str
    # What the bundle embeds so the engine can be rebuilt elsewhere.
    source_filename: str
    source_bytes: bytes
    log: list[str] = field(default_factory=list)
    # The source in its own framework, for a backend of that framework to build from directly
    # (handed on as BuildOptions.native_source; never stored).
    native: NativeSource | None = field(default=None, compare=False, repr=False)
    # The precision the source itself computes in: "int8" for a quantized TFLite model. Engines of it
    # are judged by the looser of this and their own precision (validate.judged_precision).
    source_precision: str = "fp32"
    # The ONNX conversion running alongside the build, when ``ImportOptions.onnx_in_background`` asked for it
    # (``signature`` then comes from the torch program); ``model`` is None until :meth:`with_onnx`.
    pending_onnx: PendingOnnx | None = field(default=None, compare=False, repr=False)
    # What the source itself says of its integer inputs while the ONNX is pending: input -> (exclusive
    # upper bound of its values, why), e.g. the rows of the embedding table it indexes.
    input_limits: dict[str, tuple[int, str]] = field(default_factory=dict)

    def with_onnx(self) -> "ImportedModel":
        """This import with its ONNX model, joining a conversion still running (its failure raised as the importer's)."""
        if self.pending_onnx is None:
            return self
        model, lines = self.pending_onnx.finish()
        return replace(self, model=model, log=self.log + lines, pending_onnx=None)

    @property
    def source_sha256(self) -> str:
        return hashlib.sha256(self.source_bytes).hexdigest()


# kind -> module implementing import_source/reference
IMPORTERS: dict[str, str] = {
    "onnx": "enginesmith.importers.onnx_importer",
    # .keras / .h5 / .hdf5 files and keras.Model objects
    "keras": "enginesmith.importers.keras_importer",
    # a TensorFlow SavedModel folder (holds saved_model.pb)
    "savedmodel": "enginesmith.importers.tensorflow_importer",
    # a frozen TensorFlow GraphDef .pb (TF1-era export)
    "tf_graph": "enginesmith.importers.tensorflow_importer",
    "tflite": "enginesmith.importers.tflite_importer",
    # torch.nn.Module / torch.export.ExportedProgram objects and ExportedProgram .pt2 files
    "torch": "enginesmith.importers.torch_importer",
    # TorchScript .pt/.pth archives (pickles: need trust_code)
    "torchscript": "enginesmith.importers.torch_importer",
}

# File suffix -> kind.
SUFFIX_KINDS: dict[str, str] = {
    ".onnx": "onnx",
    ".keras": "keras",
    ".h5": "keras",
    ".hdf5": "keras",
    ".pb": "tf_graph",
    ".tflite": "tflite",
    ".pt2": "torch",
    ".pt": "torchscript",
    ".pth": "torchscript",
}


def _object_kind(source: Any) -> str | None:
    """The kind of an in-memory framework object, told from its class's modules (no framework import)."""
    classes = [(c.__module__ or "", c.__name__) for c in type(source).__mro__]
    roots = {module.split(".")[0] for module, _ in classes}
    if "keras" in roots and any(name in ("Model", "Functional", "Sequential") for _, name in classes):
        return "keras"
    if "torch" in roots:
        if any(name == "ExportedProgram" for _, name in classes):
            return "torch"
        if any(module.startswith("torch.jit") and name in ("ScriptModule", "RecursiveScriptModule") for module, name in classes):
            return "torchscript"
        if any(module.startswith("torch.nn") and name == "Module" for module, name in classes):
            return "torch"
    return None


def detect_kind(source: Any) -> str:
    """The importer kind for a path or in-memory object."""
    if isinstance(source, onnx.ModelProto):
        return "onnx"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise SourceError(f"model not found: '{path}': check the path")
        if path.is_dir():
            if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
                return "savedmodel"
            raise SourceError(
                f"'{path}' is a folder without saved_model.pb, so not a TensorFlow SavedModel; "
                "give a model file or a SavedModel folder"
            )
        suffix = path.suffix.lower()
        if path.name in ("saved_model.pb", "saved_model.pbtxt"):
            return "savedmodel"
        if suffix in SUFFIX_KINDS:
            return SUFFIX_KINDS[suffix]
        raise SourceError(
            f"cannot tell what kind of model '{path}' is: supported are "
            + ", ".join(sorted(SUFFIX_KINDS)) + " files and SavedModel folders"
        )
    kind = _object_kind(source)
    if kind is not None:
        return kind
    raise SourceError(
        f"unsupported model object of type {type(source).__name__}: pass an onnx.ModelProto, keras.Model, "
        "torch.nn.Module or torch.export.ExportedProgram, or a model file"
    )


def _module(kind: str):
    try:
        return importlib.import_module(IMPORTERS[kind])
    except KeyError:
        raise SourceError(f"unknown source kind '{kind}': supported are {', '.join(sorted(IMPORTERS))}") from None


def import_model(source: Any, options: ImportOptions | None = None, kind: str | None = None) -> ImportedModel:
    kind = kind or detect_kind(source)
    return _module(kind).import_source(source, options or ImportOptions())


def reference_runner(source: Any, options: ImportOptions | None = None, kind: str | None = None) -> ReferenceRunner:
    kind = kind or detect_kind(source)
    return _module(kind).reference(source, options or ImportOptions())
