"""Running engines on a Ray cluster: the connection shared by ``serve --ray`` and ``map``.

Needs the optional ``ray`` extra; nothing here imports Ray at module level.
"""

from .ray_session import RAY_EXTRA, RayConnectionError, RaySession, connect, disconnect, import_ray

__all__ = ["RAY_EXTRA", "RayConnectionError", "RaySession", "connect", "disconnect", "import_ray"]
