"""Engines in the formats other servers load: Triton model repositories and KServe manifests.

An engine bundle holds a payload that some servers can load without enginesmith:

- an ONNX Runtime engine's payload is an offline-optimized ONNX model: Triton's onnxruntime
  backend runs it (``platform: "onnxruntime_onnx"``), with the session options it was built with
  mapped to the backend's parameters and graph optimizations turned off where the payload already
  has them;
- a TensorRT engine's payload is a serialized TensorRT plan: Triton's ``tensorrt_plan`` platform;
- an OpenVINO engine's payload is a compiled blob (``CompiledModel.export_model``) that only the
  same OpenVINO version on the same CPU imports: Triton's openvino backend gets the ONNX source the
  bundle carries instead, where that source is the engine's model (an ONNX file built without shape
  or name changes, at a precision OpenVINO picks at load: fp32, bf16);
- a PyTorch engine's payload is a compiler cache read by enginesmith's own loader.

What has no model file a server reads is refused with the reason and what to do
(:class:`~enginesmith.errors.NotExportableError`).

:func:`export_triton` writes ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/1/<model file>`` (plus
``REPO/<name>/warmup/`` from the samples the bundle stores); :func:`export_kserve` writes KServe
``InferenceService`` manifests for such a repository and for ``enginesmith serve`` in a container.
Only the manifest, signature and payload bytes are read: no backend library is imported here.
"""

from __future__ import annotations

from .kserve import KServeOptions, KServeResult, export_kserve
from .triton import TritonModel, TritonOptions, export_triton, plan_triton_model

__all__ = [
    "KServeOptions",
    "KServeResult",
    "TritonModel",
    "TritonOptions",
    "export_kserve",
    "export_triton",
    "plan_triton_model",
]
