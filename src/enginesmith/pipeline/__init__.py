"""The build as named stages, each calling the module whose job it is.

```
BuildRequest (the arguments, checked once)
  import   importers/        the source (or a rebuilt bundle's), the backend, ONNX + Signature
  check    graph/compat.py   operator support on the backend; IncompatibleModelError with the report
  inputs   build_inputs.py   given data, a rebuilt bundle's samples, or a plan the source runs on
  passes   graph/passes.py   the graph passes, each checked on those inputs
  build    backends/         calibration data, the backend's build (``best``: every precision, the fastest kept)
  verify   validate/         the engine against the source run by its own framework
  package  bundle.py         the manifest's records, stored samples, stage times; the .engine file
```

``request.py`` holds :class:`BuildRequest` and how it is laid over a bundle being rebuilt,
``state.py`` the :class:`BuildState` the stages hand on, ``runner.py`` the loop that runs
them (progress, timings, failures named by stage), ``stages.py`` the stages themselves,
``engines.py`` and ``best.py`` what the build and verify stages share.
"""

from .request import BuildRequest, reusable_caches
from .stages import BUILD_STAGES, run_build

__all__ = ["BUILD_STAGES", "BuildRequest", "reusable_caches", "run_build"]
