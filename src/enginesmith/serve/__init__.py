"""Serving engines over KServe's Open Inference Protocol (v2), REST and gRPC, with dynamic batching.

    import enginesmith as es
    with es.serve(["model.engine"], http_port=0, grpc_port=0, metrics_port=0) as server:
        server.url            # http://127.0.0.1:PORT   (POST /v2/models/model/infer)
        server.grpc_address   # 127.0.0.1:PORT          (inference.GRPCInferenceService)
        server.metrics_url    # http://127.0.0.1:PORT/metrics (Prometheus text, Triton's names)

The pieces, each usable alone:

- ``protocol``: the protocol's tensors (datatypes, JSON and binary encodings) and requests, as
  :class:`InferRequest` / :class:`InferResponse` records; client mistakes are :class:`ProtocolError`
  with the HTTP status they map to.
- ``batcher``: :class:`DynamicBatcher`, a bounded queue and worker threads that merge requests
  along axis 0, run the engine and split the outputs back.
- ``models``: :class:`ServedModel`, one engine with its batcher and counters and the checks a
  request passes before it is queued; :class:`Repository`, the models by name.
- ``metrics``: per-model counters and their Prometheus text.
- ``http_frontend`` (aiohttp) and ``grpc_frontend`` (grpc.aio, with the protocol's generated
  messages from ``tritonclient``): the wire formats only; both hand decoded requests to a model.
- ``server``: :func:`serve` starts everything on an event loop in its own thread and returns a
  :class:`ServerHandle`.
- ``ray_backend`` (``serve(..., ray=RayOptions(...))``, ``enginesmith serve --ray``): the same front
  ends with each engine in a Ray Serve deployment, batching in each replica (optional ``ray`` extra).

Depends on ``runtime`` (the Engine and its input checks) and on the optional ``serve`` extra
(aiohttp, grpcio, tritonclient's generated protocol modules).
"""

from .batcher import BatchingOptions, DynamicBatcher, QueueFullError, QueueTimeoutError
from .protocol import InferRequest, InferResponse, ProtocolError
from .ray_backend import RayOptions
from .server import ServeError, ServeOptions, ServerHandle, serve

__all__ = [
    "serve",
    "ServerHandle",
    "ServeOptions",
    "ServeError",
    "RayOptions",
    "BatchingOptions",
    "DynamicBatcher",
    "QueueFullError",
    "QueueTimeoutError",
    "InferRequest",
    "InferResponse",
    "ProtocolError",
]
