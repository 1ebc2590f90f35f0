"""The small interface every backend implements.

A backend turns an ONNX model into an opaque *payload* (bytes stored in the
bundle) for this machine, and turns a payload back into a runnable
:class:`Session`. It also says whether it can run here and which facts about
the platform an engine built by it depends on. Each backend lives in one module
under ``enginesmith.backends`` and is the only place that imports its library.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import onnx

from ..signature import Signature

# Every precision some backend builds; each backend refuses (or says it keeps fp32 for) the ones it
# does not: bf16 is the OpenVINO and PyTorch backends' reduced precision on CPUs that have it.
PRECISIONS = ("fp32", "fp16", "bf16", "int8")

# Called with (stage, done, total); total is None when unknown.
ProgressCallback = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass
class BuildOptions:
    """What the user asked for; backends read the fields they understand.

    ``backend_options`` holds backend-specific settings (ONNX Runtime's
    execution providers, TensorRT's workspace size) so the generic layers need
    not know about them; they are stored in the manifest and reused when a
    bundle is rebuilt on another machine.

    ``sample_feeds`` holds inputs the model runs on, for backends that run it while building.

    ``native_source`` holds the source in its own framework (a torch module) for the backend
    of that framework to build from directly.

    ``previous_caches`` holds the cache entries of the bundle being rebuilt (TensorRT
    timing caches, ONNX Runtime's TensorRT engines), so a rebuild reuses them. Each
    backend reads only the names it writes. It is never stored in the manifest.
    """

    precision: str = "fp32"
    threads: int | None = None
    # Build a precision even where the backend says it does not pay (e.g. fp16 on a CPU).
    force_precision: bool = False
    calibration_method: str = "minmax"
    backend_options: dict[str, Any] = field(default_factory=dict)
    previous_caches: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)
    # Inputs the source model is known to run on (the build's samples or generated plan), for backends
    # that run the model once while building (ONNX Runtime's node-placement profile). Never stored.
    sample_feeds: dict[str, np.ndarray] | None = field(default=None, compare=False, repr=False)
    # The source in its own framework (an enginesmith.native_source.NativeSource, from ImportedModel.native),
    # for a backend of that framework to build from instead of the ONNX. Never stored.
    native_source: Any = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "threads": self.threads,
            "force_precision": self.force_precision,
            "calibration_method": self.calibration_method,
            "backend_options": dict(self.backend_options),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BuildOptions":
        return cls(
            precision=str(data.get("precision", "fp32")),
            threads=data.get("threads"),
            force_precision=bool(data.get("force_precision", False)),
            calibration_method=str(data.get("calibration_method", "minmax")),
            backend_options=dict(data.get("backend_options") or {}),
        )


CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass
class Calibration:
    """Inputs for int8 calibration, and ranges from an earlier build of the same model."""

    batches: list[dict[str, np.ndarray]]
    method: str = "minmax"
    # A backend-specific calibration cache; when given, calibration is skipped.
    cache: bytes | None = None


@dataclass
class BuildResult:
    payload: bytes
    payload_name: str
    # The options as the backend resolved them (providers picked, threads chosen).
    resolved_options: BuildOptions
    log: list[str] = field(default_factory=list)
    # Backend-specific facts worth keeping in the manifest (e.g. node placement).
    details: dict[str, Any] = field(default_factory=dict)
    # Files later builds of the same model can reuse (calibration, timing caches): name -> bytes.
    caches: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageGeometry:
    """Where one picture goes in an input image: resized to (height, width), placed at (top, left)."""

    height: int
    width: int
    top: int
    left: int


class DeviceOps(ABC):
    """Array work next to an engine whose tensors live on a device (a GPU), done with the backend's own
    library, for callers above ``backends/`` that must not import it (live detection, ``vision/``).

    Tensors in and out are the backend's device tensors, which :meth:`Engine.infer_device` takes and
    returns; numpy comes out only where a method says so.
    """

    device: str

    @abstractmethod
    def images_to_batch(self, frames: Sequence[np.ndarray], places: Sequence[ImageGeometry], size: tuple[int, int],
                        *, pad_value: float, swap_rb: bool, scale: float, mean: Sequence[float], std: Sequence[float],
                        layout: str, dtype: str) -> Any:
        """HWC uint8 host pictures -> one [N, C, H, W] (or NHWC) batch on the device: each resized (bilinear,
        antialiased when shrinking) into its place on a ``pad_value`` canvas, channels reversed when
        ``swap_rb``, then ``x * scale``, ``(x - mean) / std`` per channel, cast to ``dtype``."""

    @abstractmethod
    def select_boxes(self, output: Any, layout: str, min_score: float, iou: float, max_boxes: int,
                     top_k: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image of a box-and-scores output: (boxes [K, 4] x1,y1,x2,y2, scores [K], classes [K]) as numpy,
        best first, after the score floor, the ``top_k`` best, and class-aware NMS at ``iou`` (at most
        ``max_boxes``). Layouts: ``"channels_cxcywh"``, [N, 4 + C, A]: centre x, y, width, height, then one
        score per class (YOLOv8's)."""

    @abstractmethod
    def to_host(self, value: Any) -> np.ndarray:
        """A device tensor as a numpy array."""

    @abstractmethod
    def concat(self, values: Sequence[Any]) -> Any:
        """Device tensors joined along their first axis (outputs of a batch run in pieces)."""


class Session(ABC):
    """A loaded engine ready to run. Must be safe to call from several threads."""

    # Whether :meth:`run_device` takes device-resident tensors (torch/cupy through DLPack).
    supports_device_io: ClassVar[bool] = False
    # Batch sizes compiled ahead, which run fastest while other sizes run slower; () where every size runs alike.
    compiled_batches: tuple[int, ...] = ()

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on numpy inputs already checked against the signature."""

    def run_device(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run on device tensors without host copies; only where ``supports_device_io`` is true."""
        raise NotImplementedError(f"{type(self).__name__} runs on host memory only")

    def device_ops(self) -> DeviceOps | None:
        """Pre- and post-processing on the device this session's tensors live on; None where there is none."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free resources early; the default relies on garbage collection."""


class Backend(ABC):
    name: ClassVar[str]
    display_name: ClassVar[str]
    # Higher wins when ``--backend auto`` picks among available backends.
    auto_priority: ClassVar[int] = 0
    # The ONNX opset converters (Keras, TensorFlow, TFLite, PyTorch) target for this backend
    # unless the user asks for another: the newest one its parser or runtime runs fully.
    converter_opset: ClassVar[int] = 17
    # Cache entries (BuildResult.caches) from which this backend rebuilds an int8 engine with no
    # calibration data, besides ONNX Runtime's JSON ranges ("calibration_cache.json") every int8 backend reads.
    int8_cache_names: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def available(self) -> Availability:
        """Whether this backend can build and run here, and why not."""

    @abstractmethod
    def version(self) -> str:
        """The version of the backend's library."""

    @abstractmethod
    def fingerprint(self, options: BuildOptions) -> dict[str, str]:
        """Facts identifying the platform an engine built with ``options`` depends on."""

    @abstractmethod
    def must_match(self) -> list[str]:
        """Keys of the fingerprint that must be equal for an engine to run."""

    def describe_platform(self, fingerprint: Mapping[str, str]) -> str:
        """A short human description, e.g. ``x86_64 / ONNX Runtime 1.31 CPU``."""
        return f"{fingerprint.get('arch', '?')} / {self.display_name} {fingerprint.get('backend_version', '?')}"

    def precisions(self, options: BuildOptions) -> list[str]:
        """The precisions that pay off with these options, fastest last; ``best`` tries these."""
        return ["fp32"]

    @abstractmethod
    def build(
        self,
        model: onnx.ModelProto,
        signature: Signature,
        options: BuildOptions,
        progress: ProgressCallback | None = None,
        calibration: Calibration | None = None,
    ) -> BuildResult:
        """Optimize ``model`` for this machine and return the payload.

        ``calibration`` is given for int8 builds; a backend that cannot calibrate raises.
        """

    @abstractmethod
    def load(self, payload: bytes | Path, options: BuildOptions, signature: Signature) -> Session:
        """Turn a payload built by :meth:`build` (its bytes, or a file holding them) into a session.

        A file may be deleted once this returns: sessions must not keep reading it.
        """

    def payload_runs_code(self, options: BuildOptions) -> str | None:
        """Why loading a payload built with ``options`` executes code carried in the file, or None.

        ``load`` refuses such engines unless the caller trusts their builder (``trust_code``):
        a bundle can come from anyone, and checksums only prove it was not changed after it was made.
        """
        return None

    def needs_caches_at_load(self, options: BuildOptions) -> bool:
        """Whether :meth:`load_with_caches` wants the bundle's cache entries (they are read only then)."""
        return False

    def load_with_caches(
        self, payload: bytes | Path, options: BuildOptions, signature: Signature, caches: Mapping[str, bytes]
    ) -> Session:
        """:meth:`load`, given the bundle's cache entries too (ONNX Runtime restores TensorRT engines from them)."""
        return self.load(payload, options, signature)

    # Statuses ``op_support`` reports for a node.
    OP_STATUSES: ClassVar[tuple[str, ...]] = ("supported", "conditional", "unsupported")

    def op_support(self, model: onnx.ModelProto, options: BuildOptions) -> dict[str, tuple[str, str]]:
        """Per-node support with ``options``: node label (see :func:`node_names`) -> (status, reason).

        ``status`` is ``supported``, ``conditional`` (runs, with a caveat such as a CPU fallback)
        or ``unsupported``. The key ``""`` carries a failure of the model as a whole that no
        single node explains. Optional: backends that cannot tell raise ``NotImplementedError``.
        """
        raise NotImplementedError(f"{self.display_name} cannot report per-node operator support")


def node_names(model: onnx.ModelProto) -> list[str]:
    """A unique label per top-level node: its name, ``<unnamed #i>`` when empty, ``name#i`` when repeated."""
    labels: list[str] = []
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        label = node.name or f"<unnamed #{i}>"
        if label in seen:
            label = f"{label}#{i}"
        seen.add(label)
        labels.append(label)
    return labels
