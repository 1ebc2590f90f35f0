"""Where backends keep what builds on one machine share (TensorRT timing caches, Inductor caches).

One folder for all of them: ``$ENGINESMITH_CACHE_DIR``, else ``$XDG_CACHE_HOME/enginesmith``,
else ``~/.cache/enginesmith``; each backend uses a subfolder named after itself.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """enginesmith's cache folder: $ENGINESMITH_CACHE_DIR, else $XDG_CACHE_HOME/enginesmith, else ~/.cache/enginesmith."""
    if os.environ.get("ENGINESMITH_CACHE_DIR"):
        return Path(os.environ["ENGINESMITH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "enginesmith"
