"""What the build stages hand on to each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..backends import Backend, BuildOptions
from ..backends.base import ProgressCallback
from ..build_inputs import BuildInputs
from ..importers import ImportedModel, ImportOptions, ReferenceRunner
from ..manifest import Manifest
from ..precision_data import PrecisionData
from ..runtime.engine import Engine
from ..runtime.preprocess import PreprocessSpec
from ..validate import AccuracyBudget
from .request import BuildRequest, GraphSettings, Rebuild
from .selection import AutoSelection

if TYPE_CHECKING:
    from ..vision.evaluate import CocoScores
    from .map_budget import CocoSet


@dataclass
class BuildState:
    """What the stages hand on to each other; each field is set by the stage named beside it."""

    request: BuildRequest
    workdir: Path
    progress: ProgressCallback | None = None
    # times candidate engines (label -> run function, feeds, batch -> label -> p50 ms); None: really time them
    timer: Callable[..., dict[str, float]] | None = None
    # import: the bundle being rebuilt, the settled settings, the imported model
    rebuild: Rebuild | None = None
    source: Any = None
    import_options: ImportOptions = field(default_factory=ImportOptions)
    backend: Backend | None = None
    # ``--backend auto`` with more than one backend here: what was asked, the backends to try
    # (``backend`` is the first until one is chosen), and table rows for those not tried
    auto: AutoSelection | None = None
    candidates: list[Backend] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    options: BuildOptions = field(default_factory=BuildOptions)
    graph: GraphSettings = field(default_factory=GraphSettings)
    preprocess: PreprocessSpec | None = None
    budget: AccuracyBudget | None = None
    coco: CocoSet | None = None  # the labelled images a map budget is judged on
    imported: ImportedModel | None = None
    # check, passes: records for the manifest's checks
    checks: dict[str, Any] = field(default_factory=dict)
    # inputs
    inputs: BuildInputs | None = None
    # build
    data: PrecisionData | None = None
    reference: ReferenceRunner | None = None
    engine: Engine | None = None
    source_map: CocoScores | None = None  # the source's mAP, scored once for every candidate
    # stage name -> seconds, filled by the runner
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def previous(self) -> Manifest | None:
        return self.rebuild.manifest if self.rebuild else None
