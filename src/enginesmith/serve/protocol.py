"""The Open Inference Protocol (v2) tensors and requests, independent of HTTP or gRPC.

Both front ends decode a request into an :class:`InferRequest` (named numpy arrays, the outputs
asked for) and encode the :class:`InferResponse` the model returns. Everything a client can get
wrong raises :class:`ProtocolError` carrying the HTTP status it maps to; the gRPC front end maps
the same status onto a gRPC code.

Datatypes are the protocol's names (``FP32``, ``INT64``, ``BYTES``, ...). ``BYTES`` tensors are
numpy object arrays of ``bytes``; in binary form each element is a 4-byte little-endian length
followed by the bytes (the layout ``tritonclient.utils.serialize_byte_tensor`` writes).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# protocol datatype -> numpy dtype (little-endian, the protocol's byte order)
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_BY_NUMPY_NAME = {dtype.name: name for name, dtype in DATATYPES.items() if name != "BYTES"}

HEADER_LENGTH = "Inference-Header-Content-Length"


class ProtocolError(Exception):
    """A request that cannot be served, with the HTTP status that says why (400, 404, 413, 503, ...)."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


def bad_request(message: str) -> ProtocolError:
    return ProtocolError(400, message)


def datatype_of(numpy_dtype: str) -> str:
    """The protocol datatype of a signature dtype (numpy name); strings and objects are BYTES."""
    if numpy_dtype in _BY_NUMPY_NAME:
        return _BY_NUMPY_NAME[numpy_dtype]
    if np.dtype(numpy_dtype).kind in "OSU":
        return "BYTES"
    raise ValueError(f"dtype {numpy_dtype} has no Open Inference Protocol datatype")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A decoded request: inputs as arrays in the declared datatype, and which outputs to return how."""

    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: list[RequestedOutput] | None = None  # None: every output
    binary_outputs: bool = False  # the default for outputs not listed (binary_data_output)
    id: str = ""
    timeout_us: int | None = None


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    binary: dict[str, bool] = field(default_factory=dict)
    id: str = ""


# --------------------------------------------------------------------------- tensors


def element_count(name: str, shape: Any) -> tuple[tuple[int, ...], int]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                       for d in shape):
        raise bad_request(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    dims = tuple(int(d) for d in shape)
    return dims, math.prod(dims)


def check_datatype(name: str, datatype: Any) -> np.dtype:
    if datatype not in DATATYPES:
        raise bad_request(f"input '{name}': datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    return DATATYPES[datatype]


def _flatten(data: Any) -> list:
    """JSON tensor data may be flat or nested row-major lists."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list = []
    for item in data:
        flat.extend(_flatten(item))
    return flat


# JSON values each datatype family takes: integers are not filled from floats, floats not from strings.
_JSON_KINDS = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float)}


def tensor_from_json(name: str, datatype: str, shape: Any, data: Any) -> np.ndarray:
    dtype = check_datatype(name, datatype)
    dims, count = element_count(name, shape)
    flat = _flatten(data)
    if len(flat) != count:
        raise bad_request(f"input '{name}': shape {list(dims)} needs {count} values, the data has {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise bad_request(f"input '{name}': BYTES data must be strings")
        array = np.empty(count, dtype=object)
        array[:] = [v.encode() for v in flat]
        return array.reshape(dims)
    kinds = _JSON_KINDS[dtype.kind]
    wrong = [v for v in flat if not isinstance(v, kinds) or (dtype.kind != "b" and isinstance(v, bool))]
    if wrong:
        raise bad_request(f"input '{name}': {datatype} data cannot hold the JSON value {json.dumps(wrong[0])}")
    if dtype.kind in "iu" and flat:
        info = np.iinfo(dtype)
        if min(flat) < info.min or max(flat) > info.max:
            raise bad_request(f"input '{name}': a value is outside the range of {datatype}")
    return np.array(flat, dtype=dtype).reshape(dims)


def tensor_from_bytes(name: str, datatype: str, shape: Any, raw: bytes | memoryview) -> np.ndarray:
    dtype = check_datatype(name, datatype)
    dims, count = element_count(name, shape)
    if datatype == "BYTES":
        return deserialize_bytes(name, raw, count).reshape(dims)
    if len(raw) != count * dtype.itemsize:
        raise bad_request(
            f"input '{name}': shape {list(dims)} of {datatype} is {count * dtype.itemsize} bytes, the binary data "
            f"is {len(raw)}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(dims)
    # A view into the request body, unless the data starts off its dtype's alignment (the JSON header
    # before it has any length): engines take misaligned arrays element by element, several times
    # slower than one copy.
    return array if array.flags.aligned else array.copy()


def deserialize_bytes(name: str, raw: bytes | memoryview, count: int) -> np.ndarray:
    items: list[bytes] = []
    view = memoryview(raw)
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise bad_request(f"input '{name}': BYTES data ends inside an element's length prefix")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise bad_request(f"input '{name}': a BYTES element says {length} bytes, fewer are left")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise bad_request(f"input '{name}': the shape needs {count} BYTES elements, the data has {len(items)}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def tensor_to_bytes(value: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in value.ravel():
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return np.ascontiguousarray(value, dtype=DATATYPES[datatype]).tobytes()


def tensor_buffer(value: np.ndarray, datatype: str) -> bytes | memoryview:
    """The tensor's bytes in the protocol's layout, without a copy when the array is already laid out so."""
    if datatype == "BYTES":
        return tensor_to_bytes(value, datatype)
    contiguous = np.ascontiguousarray(value, dtype=DATATYPES[datatype])
    return memoryview(contiguous.reshape(-1).view(np.uint8))


def tensor_to_json(value: np.ndarray, datatype: str) -> list:
    if datatype == "BYTES":
        return [item.decode(errors="replace") if isinstance(item, bytes) else str(item) for item in value.ravel()]
    return value.ravel().tolist()


# --------------------------------------------------------------------------- HTTP bodies


def _parameters(where: str, item: dict) -> dict:
    params = item.get("parameters", {})
    if not isinstance(params, dict):
        raise bad_request(f"{where}: 'parameters' must be an object")
    if any(key.startswith("shared_memory") for key in params):
        raise bad_request(f"{where}: shared-memory tensors are not supported by this server; send the data in the request")
    return params


def decode_http_request(body: bytes | bytearray | memoryview, header_length: str | None) -> InferRequest:
    """A JSON inference request, with the binary tensor data extension when ``header_length`` is given.

    Binary inputs are views into ``body`` (copied only when misaligned for their dtype).
    """
    view = memoryview(body)
    if header_length is None:
        json_part, binary = view, view[len(view):]
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise bad_request(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= length <= len(view):
            raise bad_request(f"{HEADER_LENGTH} is {length}, but the body has {len(view)} bytes")
        json_part, binary = view[:length], view[length:]
    try:
        document = json.loads(json_part.tobytes())  # the JSON header's copy; the binary part stays a view
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the request is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise bad_request("the request must be a JSON object with an 'inputs' list")
    params = _parameters("request", document)
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for item in document["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad_request("each input must be an object with a 'name'")
        name = item["name"]
        if name in inputs:
            raise bad_request(f"input '{name}' is given twice")
        item_params = _parameters(f"input '{name}'", item)
        size = item_params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad_request(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise bad_request(
                    f"input '{name}': binary_data_size says {size} bytes from offset {offset}, but the binary part of "
                    f"the body has {len(binary)} bytes ({HEADER_LENGTH} may be wrong)"
                )
            inputs[name] = tensor_from_bytes(name, item.get("datatype"), item.get("shape"), binary[offset : offset + size])
            offset += size
        elif "data" in item:
            inputs[name] = tensor_from_json(name, item.get("datatype"), item.get("shape"), item["data"])
        else:
            raise bad_request(f"input '{name}' has neither 'data' nor a binary_data_size parameter")
        datatypes[name] = item["datatype"]
    if offset != len(binary):
        raise bad_request(
            f"the body has {len(binary) - offset} bytes of binary data that no input's binary_data_size accounts for"
        )
    outputs = None
    if "outputs" in document:
        if not isinstance(document["outputs"], list):
            raise bad_request("'outputs' must be a list")
        outputs = []
        for item in document["outputs"]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise bad_request("each requested output must be an object with a 'name'")
            out_params = _parameters(f"output '{item['name']}'", item)
            if "classification" in out_params:
                raise bad_request(f"output '{item['name']}': the classification extension is not supported")
            outputs.append(RequestedOutput(item["name"], bool(out_params.get("binary_data", params.get("binary_data_output", False)))))
    return InferRequest(
        inputs=inputs, datatypes=datatypes, outputs=outputs, binary_outputs=bool(params.get("binary_data_output", False)),
        id=str(document.get("id", "")), timeout_us=_timeout(params),
    )


def _timeout(params: dict) -> int | None:
    value = params.get("timeout")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise bad_request("the 'timeout' parameter must be a non-negative number of microseconds")
    return value or None


def encode_http_response(response: InferResponse) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    outputs = []
    chunks: list[bytes | memoryview] = []
    for name, value in response.outputs.items():
        datatype = response.datatypes[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(value.shape)}
        if response.binary.get(name):
            raw = tensor_buffer(value, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = tensor_to_json(value, datatype)
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version,
                                "outputs": outputs}
    if response.id:
        document["id"] = response.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)  # the body's one copy of the output data
