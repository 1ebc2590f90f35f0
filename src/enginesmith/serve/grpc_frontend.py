"""The protocol's gRPC service (``inference.GRPCInferenceService``) on grpc.aio.

The message classes and the service registration are the ones generated from the protocol's
``grpc_service.proto`` that ``tritonclient`` ships (``tritonclient.grpc.service_pb2``), so the
server and Triton's clients read the same definitions. Implemented: ServerLive, ServerReady,
ModelReady, ServerMetadata, ModelMetadata, ModelInfer; the other RPCs answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np

from .. import __version__
from .http_frontend import EXTENSIONS, SERVER_NAME
from .models import Repository
from .protocol import (
    DATATYPES,
    InferRequest,
    ProtocolError,
    RequestedOutput,
    bad_request,
    element_count,
    tensor_from_bytes,
    tensor_from_json,
    tensor_to_bytes,
)


def _stubs():
    """The generated protocol modules; tritonclient is installed with the 'serve' extra."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    return service_pb2, service_pb2_grpc


# HTTP status of a ProtocolError -> gRPC status code
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    500: grpc.StatusCode.INTERNAL,
}

# InferTensorContents field holding each datatype's values when raw_input_contents is not used
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _parameter(params: Any, key: str) -> Any:
    if key not in params:
        return None
    value = params[key]
    return getattr(value, value.WhichOneof("parameter_choice")) if value.WhichOneof("parameter_choice") else None


def decode_grpc_request(message: Any) -> InferRequest:
    """A ModelInferRequest as an InferRequest: raw_input_contents (one per input, in order) or typed contents."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise bad_request(f"the request has {len(message.inputs)} inputs but {len(raw)} raw_input_contents")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        if name in inputs:
            raise bad_request(f"input '{name}' is given twice")
        if any(key.startswith("shared_memory") for key in tensor.parameters):
            raise bad_request(f"input '{name}': shared-memory tensors are not supported by this server")
        shape = list(tensor.shape)
        if raw:
            inputs[name] = tensor_from_bytes(name, tensor.datatype, shape, raw[index])
        else:
            if tensor.datatype not in _CONTENTS_FIELD:
                hint = " (FP16 goes in raw_input_contents)" if tensor.datatype in DATATYPES else ""
                raise bad_request(f"input '{name}': datatype {tensor.datatype!r} has no typed contents field{hint}")
            element_count(name, shape)
            values = list(getattr(tensor.contents, _CONTENTS_FIELD[tensor.datatype]))
            if tensor.datatype == "BYTES":
                array = np.empty(len(values), dtype=object)
                array[:] = values
                if array.size != int(np.prod(shape)):
                    raise bad_request(f"input '{name}': shape {shape} needs {int(np.prod(shape))} values, got {array.size}")
                inputs[name] = array.reshape(shape)
            else:
                if tensor.datatype == "BOOL":
                    values = [bool(v) for v in values]
                inputs[name] = tensor_from_json(name, tensor.datatype, shape, values)
        datatypes[name] = tensor.datatype
    timeout = _parameter(message.parameters, "timeout")
    return InferRequest(
        inputs=inputs,
        datatypes=datatypes,
        outputs=[RequestedOutput(o.name, True) for o in message.outputs] or None,
        binary_outputs=True,
        id=message.id,
        timeout_us=int(timeout) if timeout else None,
    )


def make_servicer(repository: Repository) -> Any:
    """The service over ``repository``; the class is made here because its generated base is imported lazily."""
    pb, pb_grpc = _stubs()

    class Servicer(pb_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request, context):  # noqa: N802 - the protocol's RPC names
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request, context):  # noqa: N802
            return pb.ServerReadyResponse(ready=True)

        async def ModelReady(self, request, context):  # noqa: N802
            try:
                repository.get(request.name, request.version)
            except ProtocolError:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        async def ServerMetadata(self, request, context):  # noqa: N802
            return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

        async def ModelMetadata(self, request, context):  # noqa: N802
            try:
                metadata = repository.get(request.name, request.version).metadata()
            except ProtocolError as exc:
                await context.abort(GRPC_CODES.get(exc.status, grpc.StatusCode.INTERNAL), str(exc))
            tensors = lambda items: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in items]  # noqa: E731
            return pb.ModelMetadataResponse(
                name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"],
                inputs=tensors(metadata["inputs"]), outputs=tensors(metadata["outputs"]),
            )

        async def ModelInfer(self, request, context):  # noqa: N802
            try:
                model = repository.get(request.model_name, request.model_version)
                with model.in_flight:
                    result = await model.infer(decode_grpc_request(request))
            except ProtocolError as exc:
                if exc.retry_after_s is not None:
                    context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
                await context.abort(GRPC_CODES.get(exc.status, grpc.StatusCode.INTERNAL), str(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug answers INTERNAL for this request only
                await context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(exc).__name__}: {exc}")
            response = pb.ModelInferResponse(model_name=result.model_name, model_version=result.model_version,
                                             id=result.id)
            for name, value in result.outputs.items():
                datatype = result.datatypes[name]
                response.outputs.add(name=name, datatype=datatype, shape=list(value.shape))
                response.raw_output_contents.append(tensor_to_bytes(value, datatype))
            return response

    return Servicer()


def add_to_server(server: Any, repository: Repository) -> None:
    _, pb_grpc = _stubs()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(make_servicer(repository), server)
