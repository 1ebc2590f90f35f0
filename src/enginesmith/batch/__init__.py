"""Batch inference over datasets on Ray Data: ``enginesmith map`` (docs/scaling-out.md).

Ray is imported only when a run starts; planning and the part files need pyarrow alone.
"""

from .plan import MapError
from .run import MapReport, map_dataset

__all__ = ["MapError", "MapReport", "map_dataset"]
