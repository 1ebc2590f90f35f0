"""Command-line interface: a thin layer over :mod:`enginesmith.api`.

Each command group lives in its own module and registers itself on ``app``.
"""

from __future__ import annotations

import sys

from . import demo_command, detect_command, engine_commands  # noqa: F401  (registers commands)
from . import export_command, graph_commands, map_command  # noqa: F401
from . import serve_command  # noqa: F401
from .app import app, main as _main

__all__ = ["app", "main"]


def main() -> None:
    sys.exit(_main())
