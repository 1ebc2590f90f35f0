"""What a build was asked for, checked once, and how it is settled against a bundle being rebuilt.

:class:`BuildRequest` holds the keyword arguments of :func:`enginesmith.build`. Values that
can be wrong by themselves (an unknown precision or calibration method, a hold-out share
outside [0, 1), a preprocessing spec or accuracy budget that does not parse) are refused
when it is made, before anything is read or imported.

A bundle given as the source carries what it was built with (:class:`Rebuild`); the
functions below lay what was asked over what was recorded: a value given wins, a value
left out keeps the recorded one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..backends import BACKENDS, Backend, BuildOptions, pick_backend
from ..backends.base import CALIBRATION_METHODS, PRECISIONS
from ..bundle import looks_like_bundle, read_bundle
from ..errors import BackendUnavailableError, BuildError, BundleError, ValidationDataError
from ..importers import ImportOptions
from ..importers.archive import write_embedded_source
from ..manifest import Manifest
from ..precision_data import check_holdout
from ..runtime.preprocess import PreprocessSpec, parse_spec
from ..validate import AccuracyBudget, Tolerance, parse_budget
from .selection import AutoSelection, Strategy, parse_strategy

# The file name backends use for int8 calibration ranges inside a bundle's cache/ folder.
CALIBRATION_CACHE_NAME = "calibration_cache.json"

DataLike = str | Path | Mapping[str, np.ndarray]


@dataclass(frozen=True)
class BuildRequest:
    """The arguments of :func:`enginesmith.build`; see its docstring for what each one means.

    ``preprocess`` and ``accuracy_budget`` given as text are parsed here, so the stages see
    a :class:`PreprocessSpec` and an :class:`AccuracyBudget` (or None).
    """

    source: Any
    backend: str | None = None
    precision: str | None = None
    threads: int | None = None
    backend_options: Mapping[str, Any] | None = None
    import_options: ImportOptions | None = None
    include_source: bool = True
    verify: bool = True
    tolerance: Tolerance | None = None
    output: str | Path | None = None
    calibration_data: DataLike | None = None
    calibration_method: str | None = None
    calibration_random: bool = False
    calibration_cache: str | Path | None = None
    preprocess: PreprocessSpec | str | None = None
    holdout: float = 0.2
    accuracy_budget: AccuracyBudget | str | None = None
    force_precision: bool | None = None
    graph_passes: bool | None = None
    disabled_passes: Sequence[str] | None = None
    check_compatibility: bool = True
    data: DataLike | None = None
    candidates: Sequence[str] | None = None
    select: Strategy | str | None = None
    coco_annotations: str | Path | None = None
    coco_images: str | Path | None = None

    def __post_init__(self) -> None:
        if self.backend is None and (self.candidates is not None or self.select is not None):
            object.__setattr__(self, "backend", "auto")
        if self.backend != "auto" and (self.candidates is not None or self.select is not None):
            raise BuildError(f"candidates and a selection strategy apply to the backend 'auto', not '{self.backend}'")
        if self.candidates is not None:
            names = tuple(name.strip() for name in self.candidates if name.strip())
            unknown = [name for name in names if name not in BACKENDS]
            if unknown or not names:
                raise BuildError(f"unknown candidate backend '{unknown[0] if unknown else ''}': "
                                 f"choose among {', '.join(sorted(BACKENDS))}")
            object.__setattr__(self, "candidates", names)
        if self.select is not None:
            object.__setattr__(self, "select", parse_strategy(self.select))
        if self.precision is not None and self.precision not in PRECISIONS + ("best",):
            raise BuildError(f"unknown precision '{self.precision}': choose one of {', '.join(PRECISIONS)} or best")
        if self.calibration_method is not None and self.calibration_method not in CALIBRATION_METHODS:
            raise BuildError(
                f"unknown calibration method '{self.calibration_method}': choose one of {', '.join(CALIBRATION_METHODS)}"
            )
        check_holdout(self.holdout)
        # Text forms become records once, here (frozen, so through object.__setattr__).
        if isinstance(self.preprocess, str):
            object.__setattr__(self, "preprocess", parse_spec(self.preprocess))
        if isinstance(self.accuracy_budget, str):
            object.__setattr__(self, "accuracy_budget", parse_budget(self.accuracy_budget))
        if self.disabled_passes is not None:
            object.__setattr__(self, "disabled_passes", tuple(self.disabled_passes))

    @property
    def rebuilds_bundle(self) -> bool:
        """Whether the source is an engine bundle to rebuild from the source it carries."""
        source = self.source
        return isinstance(source, (str, Path)) and Path(source).is_file() and looks_like_bundle(source)


@dataclass(frozen=True)
class Rebuild:
    """What a bundle being rebuilt carries: its manifest, its caches, its samples and its source (written out)."""

    manifest: Manifest
    caches: dict[str, bytes] = field(repr=False)
    samples: bytes | None = field(repr=False)
    source: Path

    @property
    def import_options(self) -> ImportOptions:
        return ImportOptions.from_dict(self.manifest.build_options.get("import_options", {}))


def read_rebuild(path: Path, folder: Path) -> Rebuild:
    """Read a bundle to rebuild; its embedded source is written into ``folder``."""
    contents = read_bundle(path, payload=False, source=True, caches=True, samples=True)
    if contents.source is None:
        raise BundleError(
            f"'{path.name}' does not carry its source model (built with --no-source); "
            "rebuild from the original model file instead"
        )
    source = write_embedded_source(contents.manifest.source_name, contents.source, folder)
    return Rebuild(contents.manifest, contents.caches, contents.samples, source)


@dataclass(frozen=True)
class GraphSettings:
    """Which graph passes ``build`` runs; recorded in the manifest so a rebuild runs the same ones."""

    enabled: bool = True
    disabled: tuple[str, ...] = ()
    check_compatibility: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"passes": self.enabled, "disabled": list(self.disabled)}


def auto_selection(request: BuildRequest, previous: Manifest | None) -> AutoSelection | None:
    """What ``auto`` selects among, or None for a named backend.

    'auto' selects. No backend picks the highest ``auto_priority`` one without timing anything,
    or on a rebuild keeps the bundle's backend, unless the bundle was itself chosen by auto: then
    its candidates, strategy and precision apply again here (a value given wins).
    """
    recorded = previous.build_options.get("auto") if previous is not None else None
    if not (request.backend == "auto" or (request.backend is None and recorded is not None)):
        return None
    base = AutoSelection.from_dict(recorded) if recorded else AutoSelection()
    return AutoSelection(
        candidates=request.candidates if request.candidates is not None else base.candidates,  # type: ignore[arg-type]
        strategy=request.select if request.select is not None else base.strategy,  # type: ignore[arg-type]
        precision=request.precision if request.precision is not None else base.precision,
    )


def choose_backend(name: str | None, previous: Manifest | None) -> Backend:
    """The backend asked for; none on a rebuild keeps the bundle's backend where it is available here."""
    if name is None and previous is not None:
        try:
            return pick_backend(previous.backend)
        except BackendUnavailableError:
            pass  # the original backend is not here; fall back to the best available one
    return pick_backend(name or "auto")


def build_options(request: BuildRequest, previous: Manifest | None, same_backend: bool = True,
                  auto: AutoSelection | None = None) -> BuildOptions:
    """The options asked for, laid over those a rebuilt bundle recorded."""
    recorded = (previous.build_options.get("requested") or previous.build_options) if previous else None
    base = BuildOptions.from_dict(recorded) if recorded else BuildOptions()
    if not same_backend:
        # Options of another backend (providers, TensorRT profiles) mean nothing to this one.
        base.backend_options = {}
    if auto is not None and auto.precision is not None:
        # What auto was asked for ('best'), not the precision its winner happened to have.
        base.precision = auto.precision
    if request.precision is not None:
        base.precision = request.precision
    if request.threads is not None:
        base.threads = request.threads
    if request.force_precision is not None:
        base.force_precision = request.force_precision
    if request.calibration_method is not None:
        base.calibration_method = request.calibration_method
    if request.backend_options:
        base.backend_options = {**base.backend_options, **request.backend_options}
    return base


def graph_settings(request: BuildRequest, previous: Manifest | None) -> GraphSettings:
    recorded = (previous.build_options.get("graph") or {}) if previous is not None else {}
    disabled = request.disabled_passes
    return GraphSettings(
        enabled=bool(recorded.get("passes", True)) if request.graph_passes is None else request.graph_passes,
        disabled=tuple(recorded.get("disabled", ())) if disabled is None else tuple(disabled),
        check_compatibility=request.check_compatibility,
    )


def preprocess_spec(request: BuildRequest, previous: Manifest | None) -> PreprocessSpec | None:
    if request.preprocess is None and previous is not None and previous.preprocess:
        return PreprocessSpec.from_dict(previous.preprocess)
    return request.preprocess  # type: ignore[return-value]  # parsed in BuildRequest


def accuracy_budget(request: BuildRequest, previous: Manifest | None) -> AccuracyBudget | None:
    if request.accuracy_budget is None and previous is not None and previous.accuracy_budget:
        return AccuracyBudget.from_dict(previous.accuracy_budget)
    return request.accuracy_budget  # type: ignore[return-value]  # parsed in BuildRequest


def reusable_caches(caches: Mapping[str, bytes], same_backend: bool) -> dict[str, bytes]:
    """The rebuilt bundle's cache entries the new build may use.

    Cache names are per backend (a TensorRT timing cache, ONNX Runtime's TensorRT engines), so
    a build with another backend gets none of them, except the calibration ranges in ONNX
    Runtime's JSON format, which both the ONNX Runtime and the TensorRT backend read.
    """
    if same_backend:
        return dict(caches)
    ranges = caches.get(CALIBRATION_CACHE_NAME)
    return {CALIBRATION_CACHE_NAME: ranges} if ranges is not None and ranges.lstrip().startswith(b"{") else {}


def calibration_cache(given: str | Path | None, previous_caches: Mapping[str, bytes]) -> bytes | None:
    """A calibration cache from a file or an engine bundle; else the rebuilt bundle's own."""
    if given is None:
        return previous_caches.get(CALIBRATION_CACHE_NAME)
    path = Path(given)
    if path.is_file() and looks_like_bundle(path):
        cache = read_bundle(path, payload=False, caches=True).caches.get(CALIBRATION_CACHE_NAME)
        if cache is None:
            raise ValidationDataError(f"'{path.name}' holds no calibration cache (it was not built as int8)")
        return cache
    if not path.is_file():
        raise ValidationDataError(f"calibration cache not found: '{path}'")
    return path.read_bytes()
